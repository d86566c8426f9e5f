"""Firebase ID token verification for WebSocket Direct mode (specification §8, §10).

Pinned to RS256; the key is chosen by `kid` among Google's securetoken certificates
(URL configurable, so tests serve their own), cached as long as the response's
`Cache-Control: max-age` allows. Claims: `aud` = the Firebase project id, `iss` =
`https://securetoken.google.com/<project>`, `exp`, `iat` and `auth_time` within a small
clock skew, and a non-empty `sub` (the uid). Every refusal has its own reason and close
code, so a client and an operator can tell them apart. The signature is checked with
google-auth's RSA verifier before any claim is trusted.
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

GOOGLE_CERTS_URL = "https://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com"
MAX_TOKEN_BYTES = 8192
_MAX_AGE = re.compile(r"max-age=(\d+)")
_REFETCH_AFTER = 60.0  # an unknown kid refetches the certificates at most this often


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
        self._project = project_id
        self._issuer = f"https://securetoken.google.com/{project_id}"
        self._certs_url = certs_url
        self._skew = clock_skew_seconds
        self._http = http or httpx.AsyncClient(timeout=10.0)
        self._certs: dict[str, str] = {}
        self._fresh_until = 0.0
        self._fetched_at = 0.0
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
        if not isinstance(uid, str) or not uid or len(uid) > 128:
            raise TokenRejected("no subject", NO_SUBJECT)
        return VerifiedToken(uid=uid, expires_at=float(exp), claims=claims)

    async def _certificate(self, kid: str, now: float) -> str:
        async with self._lock:
            stale = now >= self._fresh_until
            unknown = kid not in self._certs and now - self._fetched_at >= _REFETCH_AFTER
            if stale or unknown:
                await self._fetch(now)
        certificate = self._certs.get(kid)
        if certificate is None:
            raise TokenRejected("unknown key id", UNKNOWN_KEY)
        return certificate

    async def _fetch(self, now: float) -> None:
        try:
            response = await self._http.get(self._certs_url)
            response.raise_for_status()
            certs = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            self._fetched_at = now
            if not self._certs:
                raise TokenRejected(f"certificates unavailable ({type(exc).__name__})", UNKNOWN_KEY) from None
            self._fresh_until = now + _REFETCH_AFTER  # keep the ones we have; ask again later
            return
        if isinstance(certs, dict) and all(isinstance(v, str) for v in certs.values()):
            self._certs = certs
        match = _MAX_AGE.search(response.headers.get("cache-control", ""))
        self._fetched_at = now
        self._fresh_until = now + (int(match.group(1)) if match else 0)
