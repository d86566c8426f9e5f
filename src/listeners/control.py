"""Resync requests from consumers, on the Redis control channel (exact SUBSCRIBE).

Pub/Sub keeps nothing: a consumer that (re)subscribes has missed whatever was published
while it was away, so it asks the service for the current state of its user, and the
service answers on the user's own channel with fresh syncs.

Requests are signed with HMAC-SHA256 under the control token that the service and its
consumers share (`control_token` in the Redis secret, or LISTENERS_CONTROL_TOKEN), and
carry a time: a request more than `MAX_SKEW` seconds off is refused. A replay inside
that window only causes one more sync, which is harmless.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from listeners.backoff import Backoff
from listeners.config import RedisSettings
from listeners.publish.redis import close_quietly, redis_client
from listeners.source.registry import ChatThread

log = logging.getLogger(__name__)

MAX_SKEW = 60.0
MAX_REQUEST_BYTES = 4096


@dataclass(frozen=True, slots=True)
class ResyncRequest:
    uid: str
    threads: tuple[ChatThread, ...] = ()


class InvalidRequest(ValueError):
    pass


def _signature(token: str, fields: dict[str, Any]) -> str:
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
    return json.dumps({**fields, "sig": _signature(token, fields)}).encode()


def verify(token: str, raw: bytes, now: float | None = None) -> ResyncRequest:
    if len(raw) > MAX_REQUEST_BYTES:
        raise InvalidRequest(f"request larger than {MAX_REQUEST_BYTES} bytes")
    try:
        message = json.loads(raw)
    except ValueError:
        raise InvalidRequest("not JSON") from None
    if not isinstance(message, dict):
        raise InvalidRequest("not a JSON object")
    signature = message.pop("sig", None)
    if not isinstance(signature, str) or not hmac.compare_digest(signature, _signature(token, message)):
        raise InvalidRequest("bad signature")
    ts, uid, threads = message.get("ts"), message.get("uid"), message.get("threads", [])
    if message.get("type") != "resync" or not isinstance(uid, str) or not uid:
        raise InvalidRequest("not a resync request for a uid")
    if not isinstance(ts, int | float) or abs((time.time() if now is None else now) - ts) > MAX_SKEW:
        raise InvalidRequest("stale or future request")
    if not isinstance(threads, list) or not all(
        isinstance(t, list) and len(t) == 3 and all(isinstance(p, str) and p for p in t) for t in threads
    ):
        raise InvalidRequest("threads must be [space_code, thread_key, mode] triples")
    return ResyncRequest(uid, tuple(ChatThread(*t) for t in threads))


class ControlListener:
    """Subscribes to the control channel for as long as the service runs, through Redis outages."""

    def __init__(self, settings: RedisSettings, on_resync: Callable[[ResyncRequest], None]) -> None:
        self._settings = settings
        self._on_resync = on_resync
        self._backoff = Backoff()
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        token = self._settings.control_token
        if token is None:
            log.warning("no control token (LISTENERS_CONTROL_TOKEN): consumer resync requests are disabled")
            return
        attempt = 0
        while True:
            client = redis_client(self._settings, timeout=10.0)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self._settings.control_channel)
                self.subscribed.set()
                attempt = 0
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is not None:
                        self._handle(token.reveal(), message["data"])
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("control channel lost; resubscribing", extra={"reason": type(exc).__name__})
            finally:
                await asyncio.shield(close_quietly(pubsub, client))
            await asyncio.sleep(self._backoff.delay(attempt))
            attempt += 1

    def _handle(self, token: str, raw: bytes) -> None:
        try:
            request = verify(token, raw)
        except InvalidRequest as exc:
            log.warning("control request refused", extra={"reason": str(exc)})
            return
        self._on_resync(request)
