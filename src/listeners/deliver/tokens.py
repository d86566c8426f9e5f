"""Firebase ID token verification for WebSocket Direct mode (specification §8, §10).

Pinned to RS256; the key is chosen by `kid` among Google's securetoken certificates
(URL configurable, so tests serve their own), cached as long as the response's
`Cache-Control: max-age` allows. Claims: `aud` = the Firebase project id, `iss` =
`https://securetoken.google.com/<project>`, `exp`, `iat` and `auth_time` within a small
clock skew, and a non-empty `sub` (the uid). Every refusal has its own reason and close
code, so a client and an operator can tell them apart. The signature is checked with
google-auth's RSA verifier before any claim is trusted.

The certificates decide whose tokens are accepted, so they come over https only (http to a
loopback address for the local issuer of the tests and the demo). While none could be
fetched, the fetch is retried with exponential backoff, and tokens are refused at once in
between, rather than each connection waiting on its own fetch of a failing endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from dataclasses import dataclass
from typing import Any

import httpx
from google.auth import crypt

from listeners.config import LOOPBACK_ONLY, https_or_loopback
from listeners_bridge.backoff import Backoff
from listeners_bridge.inputs import MAX_UID_LENGTH

GOOGLE_CERTS_URL = "https://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com"
MAX_TOKEN_BYTES = 8192
_MAX_AGE = re.compile(r"max-age=(\d+)")
_REFETCH_AFTER = 60.0  # an unknown kid refetches the certificates at most this often
# With no certificates at all, failed fetches are retried after 0.5-1 s, then twice as long
# each time, up to 15-30 s: an outage of Google's endpoint costs few requests, and a short
# blip at start-up is over within a second.
_FETCH_BACKOFF = Backoff(base=1.0, cap=30.0)


class TokenRejected(Exception):
    """Why a token was refused: `reason` for logs and clients, `code` for the close frame."""

    def __init__(self, reason: str, code: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


# Close codes of refused tokens (application range 4000-4999), documented in docs/websocket.md.
MALFORMED = 4002
BAD_ALGORITHM = 4003
UNKNOWN_KEY = 4004
BAD_SIGNATURE = 4005
WRONG_AUDIENCE = 4006
WRONG_ISSUER = 4007
EXPIRED = 4008
NOT_YET_VALID = 4009
# Not the token's fault: the certificates could not be fetched. 1013 ("try again later") tells
# the client to reconnect with backoff, where 4004 would tell it the token is bad for good.
CERTIFICATES_UNAVAILABLE = 1013
NO_SUBJECT = 4010


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    uid: str
    expires_at: float  # epoch seconds
    claims: dict[str, Any]


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class TokenVerifier:
    def __init__(
        self,
        project_id: str,
        *,
        certs_url: str = GOOGLE_CERTS_URL,
        clock_skew_seconds: float = 30.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        if not https_or_loopback(certs_url):
            raise ValueError(f"certificate URL must be https:// ({LOOPBACK_ONLY})")
        self._project = project_id
        self._issuer = f"https://securetoken.google.com/{project_id}"
        self._certs_url = certs_url
        self._skew = clock_skew_seconds
        self._http = http or httpx.AsyncClient(timeout=10.0)
        self._certs: dict[str, str] = {}
        self._fresh_until = 0.0
        self._fetched_at = 0.0
        self._failures = 0  # fetches failed in a row while no certificate is known
        self._retry_at = 0.0  # until then, with no certificate known, refuse without fetching
        self._lock = asyncio.Lock()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def verify(self, token: str, now: float | None = None) -> VerifiedToken:
        now = time.time() if now is None else now
        header, claims, signed, signature = self._split(token)
        if header.get("alg") != "RS256":
            raise TokenRejected(f"algorithm {str(header.get('alg'))[:16]!r} is not RS256", BAD_ALGORITHM)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("no key id", UNKNOWN_KEY)
        certificate = await self._certificate(kid, now)
        verifier = crypt.RSAVerifier.from_string(certificate)  # type: ignore[no-untyped-call]
        if not verifier.verify(signed, signature):
            raise TokenRejected("bad signature", BAD_SIGNATURE)
        return self._check_claims(claims, now)

    def _split(self, token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
            raise TokenRejected("not a JWT", MALFORMED)
        head, body, signature = token.split(".")
        try:
            header, claims = json.loads(_b64(head)), json.loads(_b64(body))
            raw_signature = _b64(signature)
        except (ValueError, UnicodeDecodeError):
            raise TokenRejected("not a JWT", MALFORMED) from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise TokenRejected("not a JWT", MALFORMED)
        return header, claims, f"{head}.{body}".encode(), raw_signature

    def _check_claims(self, claims: dict[str, Any], now: float) -> VerifiedToken:
        if claims.get("aud") != self._project:
            raise TokenRejected("wrong audience", WRONG_AUDIENCE)
        if claims.get("iss") != self._issuer:
            raise TokenRejected("wrong issuer", WRONG_ISSUER)
        exp, iat, auth_time = claims.get("exp"), claims.get("iat"), claims.get("auth_time")
        for name, value in (("exp", exp), ("iat", iat), ("auth_time", auth_time)):
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise TokenRejected(f"{name} missing or not a number", MALFORMED)
        assert (
            isinstance(exp, int | float)
            and isinstance(iat, int | float)
            and isinstance(auth_time, int | float)
        )
        if exp + self._skew < now:
            raise TokenRejected("expired", EXPIRED)
        if iat - self._skew > now or auth_time - self._skew > now:
            raise TokenRejected("issued in the future", NOT_YET_VALID)
        uid = claims.get("sub")
        # Only Firebase's own rule here (4010); whether the uid is usable as a key is the
        # gateway's check (inputs.valid_uid), with its own close code (4012).
        if not isinstance(uid, str) or not uid or len(uid) > MAX_UID_LENGTH:
            raise TokenRejected("no subject", NO_SUBJECT)
        return VerifiedToken(uid=uid, expires_at=float(exp), claims=claims)

    async def _certificate(self, kid: str, now: float) -> str:
        self._refuse_while_backing_off(now)  # before the lock: no queueing behind a slow fetch
        async with self._lock:
            self._refuse_while_backing_off(now)  # the fetch we waited for may just have failed
            stale = now >= self._fresh_until
            unknown = kid not in self._certs and now - self._fetched_at >= _REFETCH_AFTER
            if stale or unknown:
                await self._fetch(now)
        certificate = self._certs.get(kid)
        if certificate is None:
            raise TokenRejected("unknown key id", UNKNOWN_KEY)
        return certificate

    def _refuse_while_backing_off(self, now: float) -> None:
        if not self._certs and now < self._retry_at:
            raise TokenRejected("certificates unavailable (retrying later)", CERTIFICATES_UNAVAILABLE)

    async def _fetch(self, now: float) -> None:
        try:
            response = await self._http.get(self._certs_url)
            response.raise_for_status()
            certs = response.json()
            if not isinstance(certs, dict) or not all(isinstance(v, str) for v in certs.values()):
                raise ValueError("not a map of key ids to certificates")
        except (httpx.HTTPError, ValueError) as exc:
            self._fetched_at = now
            if not self._certs:
                self._retry_at = now + _FETCH_BACKOFF.delay(self._failures)
                self._failures += 1
                raise TokenRejected(
                    f"certificates unavailable ({type(exc).__name__})", CERTIFICATES_UNAVAILABLE
                ) from None
            self._fresh_until = now + _REFETCH_AFTER  # keep the ones we have; ask again later
            return
        self._certs = certs
        self._failures = 0
        match = _MAX_AGE.search(response.headers.get("cache-control", ""))
        self._fetched_at = now
        self._fresh_until = now + (int(match.group(1)) if match else 0)
