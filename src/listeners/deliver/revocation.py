"""Revoked ID tokens (`LISTENERS_TOKEN_CHECK_REVOKED`, off by default; issue 28).

As Firebase Admin's `verify_id_token(check_revoked=True)`: the Identity Toolkit's
`accounts:lookup` gives a user's `validSince` (epoch seconds; revoking a user's refresh
tokens moves it to now) and `disabled`; a token issued before `validSince` is revoked, and a
disabled or deleted user has no valid token. The answer is cached per uid for
`LISTENERS_TOKEN_REVOCATION_TTL_SECONDS` (a revocation takes up to that long to be seen), in
at most `MAX_CACHED` entries; concurrent checks of one uid share one lookup. A lookup that
fails refuses the token with 1013 (try again later): fail closed, as Firebase Admin raises.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from listeners.deliver.tokens import TokenRejected

IDENTITY_TOOLKIT = "https://identitytoolkit.googleapis.com/v1"
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
TOKEN_REVOKED = 4016  # docs/websocket.md; final in the JS module: the user must sign in again
LOOKUP_UNAVAILABLE = 1013
MAX_CACHED = 100_000
LOOKUP_SECONDS = 5.0

INTERRUPTED = "revocation check interrupted"
AccessToken = Callable[..., Awaitable[str | None]]  # source.access_tokens.TokenProvider


class _User:
    __slots__ = ("disabled", "until", "valid_since")

    def __init__(self, valid_since: float | None, disabled: bool, until: float) -> None:
        self.valid_since = valid_since  # None: no such user
        self.disabled = disabled
        self.until = until


class RevocationCheck:
    def __init__(
        self,
        project_id: str,
        *,
        base_url: str = IDENTITY_TOOLKIT,
        ttl_seconds: float = 300.0,
        access_token: AccessToken | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._url = f"{base_url.rstrip('/')}/projects/{project_id}/accounts:lookup"
        self._ttl = ttl_seconds
        self._access_token = access_token
        self._http = http or httpx.AsyncClient(timeout=LOOKUP_SECONDS)
        self._cache: OrderedDict[str, _User] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[_User]] = {}
        self.lookups = 0

    async def aclose(self) -> None:
        await self._http.aclose()

    async def check(self, uid: str, issued_at: float) -> None:
        """Raises TokenRejected if a token of `uid` issued at `issued_at` is revoked."""
        user = await self._user(uid)
        if user.valid_since is None:
            raise TokenRejected("no such user", TOKEN_REVOKED)
        if user.disabled:
            raise TokenRejected("user disabled", TOKEN_REVOKED)
        if issued_at < user.valid_since:
            raise TokenRejected("token revoked", TOKEN_REVOKED)

    async def _user(self, uid: str) -> _User:
        now = time.monotonic()
        cached = self._cache.get(uid)
        if cached is not None and cached.until > now:
            self._cache.move_to_end(uid)
            return cached
        pending = self._inflight.get(uid)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[_User] = asyncio.get_running_loop().create_future()
        self._inflight[uid] = future
        try:
            user = await self._lookup(uid, now)
        except BaseException as exc:
            # The sockets sharing this lookup get an answer of their own: a cancellation of this
            # one (its auth timeout) is not theirs, so they are told to try again.
            shared = exc if isinstance(exc, TokenRejected) else TokenRejected(INTERRUPTED, LOOKUP_UNAVAILABLE)
            future.set_exception(shared)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            self._inflight.pop(uid, None)
        future.set_result(user)
        self._cache[uid] = user
        self._cache.move_to_end(uid)
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)
        return user

    async def _lookup(self, uid: str, now: float) -> _User:
        self.lookups += 1
        headers = {}
        try:
            token = await self._access_token() if self._access_token is not None else None
            if token:
                headers["Authorization"] = f"Bearer {token}"
            response = await self._http.post(self._url, json={"localId": [uid]}, headers=headers)
            response.raise_for_status()
            body: Any = response.json()
            users = body.get("users") or [] if isinstance(body, dict) else None
            if not isinstance(users, list):
                raise ValueError("no users list")
        except Exception as exc:  # the token provider's errors too: never a socket left without a code
            raise TokenRejected(
                f"revocation check unavailable ({type(exc).__name__})", LOOKUP_UNAVAILABLE
            ) from None
        until = now + self._ttl
        found = next((u for u in users if isinstance(u, dict) and u.get("localId") == uid), None)
        if found is None:
            return _User(None, False, until)
        valid_since = _epoch_seconds(found.get("validSince", "0"))
        if valid_since is None:  # fail closed, and not cached: the next connect asks again
            raise TokenRejected("revocation check unavailable (malformed validSince)", LOOKUP_UNAVAILABLE)
        return _User(valid_since, bool(found.get("disabled")), until)  # any truthy value: disabled


def _epoch_seconds(value: object) -> float | None:
    """`validSince` (epoch seconds, a string of digits in the API), or None when malformed: a
    NaN would pass every `issued_at < valid_since` test, and a list is no time."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
