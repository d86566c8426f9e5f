"""The operator's admin token (`LISTENERS_ADMIN_TOKEN`): one check for every operator route
(`/ops/state`, `/v1/users/{uid}`)."""

from __future__ import annotations

import hmac

from starlette.requests import Request


def bearer_matches(request: Request, expected: str) -> bool:
    """`Authorization: Bearer <token>`, as documented: the scheme is required and, as HTTP
    has it (RFC 9110 §11.1), matched in any case; the token is compared in constant time."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), expected.encode())
