"""Google OAuth2 access tokens for the APIs the sources call: the `TokenProvider` interface
and service-account (or Application Default) credentials refreshed before they expire.

Shared by the Firestore Listen client (`listen/`) and the Realtime Database client
(`rtdb/`), each with its own scopes; neither imports the other. (Not the Firebase ID tokens
that WebSocket clients present: those are `deliver/tokens.py`.)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol, Self


class TokenProvider(Protocol):
    """An OAuth2 access token for the next request, or None for unauthenticated requests.

    `refresh=True` means the server rejected the last token: get a new one.
    """

    async def __call__(self, *, refresh: bool = False) -> str | None: ...


async def emulator_token(*, refresh: bool = False) -> str:
    return "owner"  # what the Firebase emulators take as an administrator's token


class ServiceAccountTokens:
    """Google OAuth2 access tokens from service-account credentials, refreshed before expiry.

    google-auth refreshes with a blocking HTTPS call to the token endpoint; it runs in a
    worker thread so the loop never waits on it. A lock makes concurrent callers share one
    refresh, and forced refreshes within `min_refresh_interval` of the last one reuse its
    token: when the server revokes a token, every stream asks for a new one at once.

    Credentials that require scopes are given `scopes` (by default the class's
    `default_scopes`: none here, the API's own in a subclass such as the Realtime Database's).
    """

    default_scopes: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        credentials: Any,
        *,
        scopes: Sequence[str] | None = None,
        refresh_margin: float = 300.0,
        min_refresh_interval: float = 5.0,
        request_factory: Callable[[], Any] | None = None,
    ) -> None:
        scopes = self.default_scopes if scopes is None else tuple(scopes)
        if scopes and getattr(credentials, "requires_scopes", False):
            credentials = credentials.with_scopes(list(scopes))
        self.credentials = credentials
        self.refresh_margin = refresh_margin
        self.min_refresh_interval = min_refresh_interval
        self.refreshes = 0
        self._request_factory = request_factory
        self._lock = asyncio.Lock()
        self._last_refresh = -math.inf

    @classmethod
    def from_service_account_info(
        cls, info: Mapping[str, Any], *, scopes: Sequence[str] | None = None, **kwargs: Any
    ) -> Self:
        from google.oauth2 import service_account

        scopes = cls.default_scopes if scopes is None else tuple(scopes)
        credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            dict(info), scopes=list(scopes)
        )
        return cls(credentials, scopes=scopes, **kwargs)

    @classmethod
    def from_service_account_file(
        cls, path: str, *, scopes: Sequence[str] | None = None, **kwargs: Any
    ) -> Self:
        from google.oauth2 import service_account

        scopes = cls.default_scopes if scopes is None else tuple(scopes)
        credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
            path, scopes=list(scopes)
        )
        return cls(credentials, scopes=scopes, **kwargs)

    async def __call__(self, *, refresh: bool = False) -> str:
        async with self._lock:
            recent = time.monotonic() - self._last_refresh < self.min_refresh_interval
            if self._expiring() or (refresh and not recent):
                await asyncio.to_thread(self._refresh_blocking)
                self._last_refresh = time.monotonic()
                self.refreshes += 1
            token = self.credentials.token
            if not token:
                raise RuntimeError("the credentials produced no access token")
            return str(token)

    def _expiring(self) -> bool:
        if not self.credentials.token:
            return True
        expiry = self.credentials.expiry
        if expiry is None:
            return False
        # google-auth keeps expiry as a naive UTC datetime
        now = datetime.now(UTC) if expiry.tzinfo is not None else datetime.now(UTC).replace(tzinfo=None)
        return bool((expiry - now).total_seconds() <= self.refresh_margin)

    def _refresh_blocking(self) -> None:
        if self._request_factory is not None:
            request = self._request_factory()
        else:
            from google.auth.transport.requests import Request

            request = Request()
        self.credentials.refresh(request)
