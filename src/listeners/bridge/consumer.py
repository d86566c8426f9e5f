"""A user's events from Redis, exact SUBSCRIBE only (ElastiCache Serverless has no PSUBSCRIBE).

Pub/Sub keeps nothing, so after every (re)subscribe the consumer asks the service for a
resync and repeats the request until a sync arrives: whatever happened while it was away,
the next sync carries the current state. Events seen twice (same `event_id`) are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import Any

from redis.exceptions import RedisError

from listeners.backoff import Backoff, reraise_if_cancelled
from listeners.config import RedisSettings
from listeners.control import resync_request
from listeners.events import KNOWN_TYPES
from listeners.inputs import InvalidInput, parse_json
from listeners.publish.redis import close_quietly, redis_client
from listeners.source.registry import ChatThread

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 16 * 2**20  # a sync of a long list is the largest event; far below this
_SYNC_TYPES = frozenset({"notif.sync", "msg.sync", "chat.sync"})


def parse_event(raw: bytes | str, uid: str) -> dict[str, Any] | None:
    """The event, or None (logged) when it is not one this consumer should apply."""
    try:
        event = parse_json(raw, max_bytes=MAX_EVENT_BYTES)
    except InvalidInput as exc:
        log.warning("event skipped", extra={"uid": uid, "reason": str(exc)})
        return None
    if not isinstance(event, dict):
        log.warning("event skipped: not a JSON object", extra={"uid": uid})
        return None
    missing = [k for k in ("type", "uid", "event_id", "payload") if k not in event]
    if missing:
        log.warning("event skipped: missing fields", extra={"uid": uid, "missing": missing})
        return None
    if event["type"] not in KNOWN_TYPES:
        log.warning("event skipped: unknown type", extra={"uid": uid, "type": str(event["type"])[:40]})
        return None
    if (
        event["uid"] != uid
        or not isinstance(event["payload"], dict)
        or not isinstance(event["event_id"], str)
    ):
        log.warning(
            "event skipped: wrong uid, payload or event_id", extra={"uid": uid, "type": event["type"]}
        )
        return None
    return event


class _Recent:
    """The last `size` event ids, to drop re-deliveries without growing forever."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, event_id: str) -> bool:
        if event_id in self._ids:
            return False
        self._ids[event_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)
        return True


class Bridge:
    def __init__(
        self,
        settings: RedisSettings,
        *,
        backoff: Backoff | None = None,
        resync_retry_seconds: float = 5.0,
        dedup_size: int = 4096,
    ) -> None:
        self._settings = settings
        self._backoff = backoff or Backoff(base=0.2, cap=10.0)
        self._resync_retry = resync_retry_seconds
        self._dedup_size = dedup_size

    def channels(self, uid: str, threads: Sequence[ChatThread] = ()) -> list[str]:
        prefix, chat = self._settings.channel_prefix, self._settings.chat_channel_prefix
        return [f"{prefix}{uid}", *(f"{chat}{uid}:{t.space_code}:{t.thread_key}" for t in threads)]

    async def events(self, uid: str, threads: Sequence[ChatThread] = ()) -> AsyncIterator[dict[str, Any]]:
        """Every event of this user (and these chat threads), for as long as it is iterated.

        Never raises on Redis trouble: it reconnects with backoff and resyncs. Cancelling
        the task, or leaving the `async for`, closes the connection.
        """
        seen = _Recent(self._dedup_size)
        channels = self.channels(uid, threads)
        attempt = 0
        while True:
            client = redis_client(self._settings, timeout=10.0)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(*channels)
                attempt = 0
                synced = False
                asked = await self._ask_resync(client, uid, threads)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None:
                        if not synced and time.monotonic() - asked > self._resync_retry:
                            asked = await self._ask_resync(client, uid, threads)
                        continue
                    event = parse_event(message["data"], uid)
                    if event is None or not seen.add(event["event_id"]):
                        continue
                    synced = synced or event["type"] in _SYNC_TYPES
                    yield event
            except (RedisError, OSError) as exc:
                reraise_if_cancelled()
                log.warning("redis lost; resubscribing", extra={"uid": uid, "reason": type(exc).__name__})
            finally:
                await asyncio.shield(close_quietly(pubsub, client))
            await asyncio.sleep(self._backoff.delay(attempt))
            attempt += 1

    async def _ask_resync(self, client: Any, uid: str, threads: Sequence[ChatThread]) -> float:
        token = self._settings.control_token
        if token is None:
            log.warning("no control token: cannot ask for a resync", extra={"uid": uid})
            return float("inf")
        await client.publish(
            self._settings.control_channel, resync_request(token.reveal(), uid, tuple(threads))
        )
        return time.monotonic()
