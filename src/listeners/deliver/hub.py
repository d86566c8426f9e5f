"""The hub: this instance's WebSocket connections, fed from Redis through one connection.

Every socket subscribes to its user's channels; the hub holds one Pub/Sub connection for
the whole instance, subscribes each channel once (reference-counted), and hands every
message to the sinks of that channel. Delivery goes through Redis, so a socket can land
on any instance, whichever instance serves its user. When Redis comes back after a loss
the hub subscribes everything again and tells its sockets, which ask for a resync.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable

from redis.exceptions import RedisError

from listeners.backoff import Backoff
from listeners.config import RedisSettings
from listeners.publish.redis import close_quietly, redis_client

log = logging.getLogger(__name__)

Sink = Callable[[str], None]  # called on the loop with each message's text; must not block


class Hub:
    def __init__(self, settings: RedisSettings, instance_id: str) -> None:
        self._settings = settings
        self._sinks: dict[str, set[Sink]] = defaultdict(set)
        self._on_reconnect: set[Callable[[], None]] = set()
        self._pubsub: object | None = None
        self._ready = asyncio.Event()
        self._home = f"listeners:hub:{instance_id}"  # keeps the connection open with no socket
        self._backoff = Backoff()

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    @property
    def channels(self) -> int:
        return len(self._sinks)

    def on_reconnect(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._on_reconnect.add(callback)
        return lambda: self._on_reconnect.discard(callback)

    async def subscribe(self, channel: str, sink: Sink) -> None:
        first = not self._sinks[channel]
        self._sinks[channel].add(sink)
        if first and self._ready.is_set():
            await self._command("subscribe", channel)

    async def unsubscribe(self, channel: str, sink: Sink) -> None:
        sinks = self._sinks.get(channel)
        if sinks is None:
            return
        sinks.discard(sink)
        if not sinks:
            del self._sinks[channel]
            if self._ready.is_set():
                await self._command("unsubscribe", channel)

    async def _command(self, name: str, channel: str) -> None:
        try:
            await getattr(self._pubsub, name)(channel)
        except (RedisError, OSError) as exc:  # the reader notices too, and resubscribes all
            log.warning("hub subscription failed", extra={"reason": type(exc).__name__})

    async def run(self) -> None:
        attempt, first = 0, True
        while True:
            client = redis_client(self._settings, timeout=10.0)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self._home, *self._sinks)
                # Sockets may have added channels while that subscribe was in flight.
                while missing := [c for c in self._sinks if c.encode() not in pubsub.channels]:
                    await pubsub.subscribe(*missing)
                self._pubsub = pubsub
                self._ready.set()
                attempt = 0
                if not first:
                    for callback in list(self._on_reconnect):
                        callback()
                first = False
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is None:
                        continue
                    channel = message["channel"].decode()
                    data = message["data"]
                    text = data.decode() if isinstance(data, bytes) else str(data)
                    for sink in list(self._sinks.get(channel, ())):
                        sink(text)
            except (RedisError, OSError) as exc:
                self._ready.clear()
                log.warning("hub lost redis; resubscribing", extra={"reason": type(exc).__name__})
            finally:
                self._ready.clear()
                await asyncio.shield(close_quietly(pubsub, client))
            await asyncio.sleep(self._backoff.delay(attempt))
            attempt += 1
