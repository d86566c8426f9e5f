"""A user's events from Redis, exact SUBSCRIBE only (ElastiCache Serverless has no PSUBSCRIBE).

One `Bridge` per backend process holds one Pub/Sub connection (the broker's subscriber, which
reconnects and notices a dead connection by its heartbeat), whatever the number of users
and tabs iterating `events()`: each iterator adds its channels to that connection and reads
from a queue of its own.

Pub/Sub keeps nothing, so whenever an iterator starts, and after every reconnection, it asks
the service for a resync and repeats the request until a sync arrives: whatever happened
while it was away, the next sync carries the current state. So does an iterator whose queue
overflowed because its reader was too slow, and one that sees a gap in an event stream (a
missing `seq`, or an epoch it has no sync of: `ordering`). Events older than the last sync
and duplicates are dropped, so each event yielded moves the reducers to a state the service
had.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

from listeners_bridge.broker import Broker, BrokerUnavailable
from listeners_bridge.channels import Channels
from listeners_bridge.events import KNOWN_TYPES, UnsupportedVersion, check_version
from listeners_bridge.inputs import InvalidInput, parse_json
from listeners_bridge.ordering import Follower
from listeners_bridge.redis import RedisBroker
from listeners_bridge.registry import ChatThread
from listeners_bridge.resync import resync_request
from listeners_bridge.settings import RedisSettings
from listeners_bridge.waits import wait_event

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 16 * 2**20  # a sync of a long list is the largest event; far below this
RETRY_AFTER_FAILED_ASK = 0.5  # seconds
ASK_TIMEOUT = 2.0  # seconds
MAX_QUEUED = 10_000  # events waiting for one iterator; past that it drops them and resyncs


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
    if not isinstance(event["type"], str) or event["type"] not in KNOWN_TYPES:
        log.warning("event skipped: unknown type", extra={"uid": uid, "type": str(event["type"])[:40]})
        return None
    try:
        check_version(event)  # before the order rules: an unknown major must not move a position
    except UnsupportedVersion as exc:
        log.error("event skipped: unsupported contract version", extra={"uid": uid, "reason": str(exc)})
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


class _Reader:
    """One `events()` iterator: its user, channels and queue, and whether it holds a sync."""

    def __init__(
        self, uid: str, channels: list[str], threads: tuple[ChatThread, ...], follower: Follower
    ) -> None:
        self.uid = uid
        self.channels = channels
        self.threads = threads
        self.follower = follower
        self.asked = float("-inf")  # monotonic time of the last resync request
        self._events: deque[dict[str, Any]] = deque()
        self._wakeup = asyncio.Event()

    def put(self, event: dict[str, Any]) -> None:
        if len(self._events) >= MAX_QUEUED:  # the reader is too slow: a sync brings it back
            log.warning("events dropped for a slow reader; resyncing", extra={"uid": self.uid})
            self.lost()
            return
        self._events.append(event)
        self._wakeup.set()

    @property
    def needs_resync(self) -> bool:
        return self.follower.needs_resync

    def admit(self, event: dict[str, Any]) -> bool:
        """Whether to hand this event on; a gap makes the reader ask for a resync now."""
        asking = self.follower.needs_resync
        if self.follower.admit(event):
            return True
        if self.follower.needs_resync and not asking:
            log.info("gap in the event stream; asking for a resync", extra={"uid": self.uid})
            self.asked = float("-inf")
        return False

    def lost(self) -> None:
        """Events were missed: ask for a resync now, and until a sync arrives."""
        self.follower.lost()
        self.asked = float("-inf")
        self._wakeup.set()

    async def next(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None after `timeout` or when woken to ask for a resync."""
        if not self._events:
            self._wakeup.clear()
            await wait_event(self._wakeup, timeout)
        return self._events.popleft() if self._events else None


class Bridge:
    def __init__(
        self,
        settings: RedisSettings,
        *,
        broker: Broker | None = None,
        resync_retry_seconds: float = 5.0,
        dedup_size: int = 4096,
    ) -> None:
        self._settings = settings
        self._channels = Channels.of(settings)
        self._broker = broker or RedisBroker(settings)
        self._resync_retry = resync_retry_seconds
        self._dedup_size = dedup_size
        self._readers: dict[str, set[_Reader]] = {}  # channel -> the iterators reading it
        self._subscriber = self._broker.subscriber("bridge", self._on_message)
        self._subscriber.on_connect(self._on_connect)
        self._task: asyncio.Task[None] | None = None

    def channels(self, uid: str, threads: Sequence[ChatThread] = ()) -> list[str]:
        return self._channels.of_user(uid, threads)

    async def events(self, uid: str, threads: Sequence[ChatThread] = ()) -> AsyncIterator[dict[str, Any]]:
        """Every event of this user (and these chat threads), for as long as it is iterated.

        Never raises on Redis trouble: the connection comes back by itself and this iterator
        resyncs. Leaving the `async for` (or cancelling its task) lets its channels go; the
        connection closes when no iterator is left.
        """
        reader = _Reader(uid, self.channels(uid, threads), tuple(threads), Follower(self._dedup_size))
        await self._join(reader)
        try:
            while True:
                self._keep_subscriber()
                if reader.needs_resync and time.monotonic() - reader.asked > self._resync_retry:
                    await self._ask_resync(reader)
                event = await reader.next(timeout=1.0)
                if event is not None and reader.admit(event):
                    yield event
        finally:
            await asyncio.shield(self._leave(reader))

    async def _join(self, reader: _Reader) -> None:
        for channel in reader.channels:
            self._readers.setdefault(channel, set()).add(reader)
            await self._subscriber.subscribe(channel)
        self._keep_subscriber()

    def _keep_subscriber(self) -> None:
        """The subscriber's task, started, or restarted if it ended (a bug: it never gives up on
        Redis): the new connection makes every reader resync. At most once a second per
        iterator, so a task that fails at once does not spin."""
        task = self._task
        if task is not None and not task.done():
            return
        if task is not None and not task.cancelled() and task.exception() is not None:
            log.error(
                "bridge subscriber ended; restarting it", extra={"reason": repr(task.exception())[:200]}
            )
        self._task = asyncio.create_task(self._subscriber.run(), name="bridge-subscriber")

    async def _leave(self, reader: _Reader) -> None:
        for channel in reader.channels:
            readers = self._readers.get(channel, set())
            readers.discard(reader)
            if not readers:
                self._readers.pop(channel, None)
                await self._subscriber.unsubscribe(channel)
        if not self._readers and self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def aclose(self) -> None:
        """Closes the connection now (iterators still running get it back on their next join)."""
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _on_connect(self, reconnected: bool) -> None:
        for readers in list(self._readers.values()):
            for reader in readers:
                reader.lost()  # whatever was published meanwhile is lost: resync

    def _on_message(self, channel: str, data: bytes) -> None:
        readers = self._readers.get(channel)
        if not readers:
            return
        event = parse_event(data, next(iter(readers)).uid)
        if event is None:
            return
        for reader in readers:
            reader.put(event)

    async def _ask_resync(self, reader: _Reader) -> None:
        token = self._settings.control_token
        reader.asked = time.monotonic()
        if token is None:
            reader.asked = float("inf")
            log.warning("no control token: cannot ask for a resync", extra={"uid": reader.uid})
            return
        # Asked before Redis confirms the user's channel, the answer could come before it.
        if not await self._subscriber.confirmed(reader.channels[0], timeout=self._resync_retry):
            return
        message = resync_request(token.reveal(), reader.uid, reader.threads)
        try:
            # Bounded well below the connection's own timeout: after a reconnect of the
            # subscriber, the publishing connection may be as dead as the old one was.
            async with asyncio.timeout(ASK_TIMEOUT):
                await self._broker.publish_many([(self._settings.control_channel, message)])
        except (BrokerUnavailable, TimeoutError):
            # That connection was dead (the next one is new): ask again in a moment, not in 5 s.
            reader.asked = time.monotonic() - self._resync_retry + RETRY_AFTER_FAILED_ASK
