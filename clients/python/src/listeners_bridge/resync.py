"""A consumer's request for a resync, signed: what the bridge publishes on the control channel
and the service's `control` verifies (docs/bridge.md, "Resync requests")."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from typing import Any

from listeners_bridge.registry import ChatThread


def request_signature(token: str, fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hmac.new(token.encode(), canonical.encode(), hashlib.sha256).hexdigest()


def resync_request(
    token: str, uid: str, threads: tuple[ChatThread, ...] = (), now: float | None = None
) -> bytes:
    """The signed message a consumer publishes on the control channel."""
    fields: dict[str, Any] = {
        "type": "resync",
        "uid": uid,
        "threads": [[t.space_code, t.thread_key, t.mode] for t in threads],
        "ts": time.time() if now is None else now,
        "nonce": secrets.token_hex(8),
    }
    return json.dumps({**fields, "sig": request_signature(token, fields)}).encode()
