"""One Redis Pub/Sub connection for any number of channels, that notices when it dies.

Every pub/sub consumer (the hub, the control listener, the membership, the Bridge) runs one
of these. It connects, subscribes every channel it holds, reconnects with backoff and
subscribes them all again, and tells its owner after each reconnection (Pub/Sub keeps
nothing: whoever was away must ask for a resync).

A connection can die without closing: a NAT or load-balancer entry dropped, a failover, a
cable cut. Reads then return nothing for ever, exactly as on a quiet channel. So the
connection is probed: a PING every `heartbeat_seconds` (Redis answers `pong` even in
subscribed mode), and if neither the pong nor any other message arrives within
`heartbeat_timeout` the connection is torn down and made again (a busy process may read the
pong seconds late, behind a burst of messages: the messages show the connection alive). A
dead connection is noticed within the sum of the two (6 s by default). The ACL users of
deploy/redis-acl.json may all run PING.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from redis.exceptions import RedisError

from listeners.backoff import Backoff, reraise_if_cancelled
from listeners.config import RedisSettings
from listeners.publish.broker import Handler
from listeners.publish.connection import close_quietly, redis_client

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 3.0
HEARTBEAT_TIMEOUT = 3.0


class HalfOpen(Exception):
    """No pong in time: the connection is dead although it did not close."""


class RedisSubscriber:
    def __init__(
        self,
        settings: RedisSettings,
        name: str,
        handler: Handler,
        *,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        backoff: Backoff | None = None,
        on_reconnect_count: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self.name = name
        self._handler = handler
        self._heartbeat = heartbeat_seconds
        self._timeout = heartbeat_timeout
        self._backoff = backoff or Backoff()
        self._count_reconnect = on_reconnect_count or (lambda: None)
        self._channels: set[str] = set()
        self._confirmed: set[str] = set()
        self._callbacks: set[Callable[[bool], None]] = set()
        self._pubsub: Any = None
        self._connected_before = False  # across restarts of `run` too: a restart lost messages
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()  # pulsed on every confirmation, and on connect/loss

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(self._channels)

    def on_connect(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        self._callbacks.add(callback)
        return lambda: self._callbacks.discard(callback)

    async def subscribe(self, channel: str) -> None:
        """Holds the channel from now on; sent at once when connected, else on connection."""
        if channel in self._channels:
            return
        self._channels.add(channel)
        if self._ready.is_set():
            await self._command("subscribe", channel)

    async def unsubscribe(self, channel: str) -> None:
        if channel not in self._channels:
            return
        self._channels.discard(channel)
        self._confirmed.discard(channel)
        if self._ready.is_set():
            await self._command("unsubscribe", channel)

    def is_confirmed(self, channel: str) -> bool:
        return self._ready.is_set() and channel in self._confirmed

    async def confirmed(self, channel: str, timeout: float) -> bool:
        """Whether Redis confirms the channel within `timeout`; False at once while there is no
        connection (a subscription then would only be a promise)."""
        try:
            async with asyncio.timeout(timeout):
                while self._ready.is_set() and channel not in self._confirmed:
                    await self._changed.wait()
        except TimeoutError:
            return False
        return self.is_confirmed(channel)

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _command(self, name: str, channel: str) -> None:
        try:
            await getattr(self._pubsub, name)(channel)
        # redis-py raises AttributeError or RuntimeError when the command meets a connection
        # being torn down (measured at 10,000 sockets). Whatever it was, the reader notices
        # the loss too and subscribes every held channel again; the caller must not fail.
        except (RedisError, OSError, AttributeError, RuntimeError) as exc:
            log.warning(
                "redis %s failed", name, extra={"connection": self.name, "reason": type(exc).__name__}
            )

    async def run(self) -> None:
        attempt = 0
        while True:
            client = redis_client(self._settings, timeout=10.0)
            pubsub = client.pubsub()
            try:
                await self._connect(pubsub)
                attempt = 0
                reconnected, self._connected_before = self._connected_before, True
                if reconnected:
                    self._count_reconnect()
                    log.info("redis pub/sub reconnected", extra={"connection": self.name})
                for callback in list(self._callbacks):
                    self._call(callback, reconnected)
                await self._read(pubsub)
            except (RedisError, OSError, HalfOpen) as exc:
                reraise_if_cancelled()
                log.warning(
                    "redis pub/sub lost; reconnecting",
                    extra={"connection": self.name, "reason": f"{type(exc).__name__}: {exc}"[:200]},
                )
            finally:
                self._ready.clear()
                self._confirmed.clear()
                self._pubsub = None
                self._pulse()
                await asyncio.shield(close_quietly(pubsub, client))
            await asyncio.sleep(self._backoff.delay(attempt))
            attempt += 1

    async def _connect(self, pubsub: Any) -> None:
        # A connection that hangs while it is made is as dead as one that hangs later.
        async with asyncio.timeout(self._timeout + self._heartbeat):
            await pubsub.ping()  # connects, and gives the reader something to expect
            if self._channels:
                await pubsub.subscribe(*self._channels)
            # Channels may have been added while that subscribe was in flight.
            while missing := [c for c in self._channels if c.encode() not in pubsub.channels]:
                await pubsub.subscribe(*missing)
        self._pubsub = pubsub
        self._ready.set()
        self._pulse()

    async def _read(self, pubsub: Any) -> None:
        """Hands on every message; a PING every heartbeat, and HalfOpen when its pong is late."""
        loop = asyncio.get_running_loop()
        waiting_since: float | None = loop.time()  # the PING sent while connecting
        next_ping = loop.time() + self._heartbeat
        while True:
            now = loop.time()
            if waiting_since is not None and now - waiting_since > self._timeout:
                raise HalfOpen(f"no pong within {self._timeout:g} s")
            if waiting_since is None and now >= next_ping:
                await pubsub.ping()
                waiting_since, next_ping = now, now + self._heartbeat
            deadline = waiting_since + self._timeout if waiting_since is not None else next_ping
            message = await pubsub.get_message(timeout=max(0.0, deadline - now) + 0.01)
            if message is None:
                continue
            if message.get("type") == "pong":
                waiting_since = None
                continue
            if waiting_since is not None:
                # The pong is queued behind what Redis sent before it: a connection that keeps
                # delivering is alive, however long a burst takes this process to read.
                waiting_since = loop.time()
            self._on_message(message)

    def _on_message(self, message: Mapping[str, Any]) -> None:
        raw = message.get("channel")
        # Only channels this connection encoded itself are subscribed: their names decode.
        channel = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        kind = message.get("type")
        if kind in ("subscribe", "unsubscribe"):
            if kind == "subscribe" and channel in self._channels:
                self._confirmed.add(channel)
            else:
                self._confirmed.discard(channel)
            self._pulse()
            return
        data = message.get("data")
        if kind != "message" or channel not in self._channels or not isinstance(data, bytes):
            return  # e.g. a message in flight when its channel was let go
        try:
            self._handler(channel, data)
        except Exception as exc:  # no message can end the connection
            log.error("pub/sub handler failed", extra={"connection": self.name, "reason": type(exc).__name__})

    def _call(self, callback: Callable[[bool], None], reconnected: bool) -> None:
        try:
            callback(reconnected)
        except Exception as exc:
            log.error(
                "on_connect callback failed", extra={"connection": self.name, "reason": type(exc).__name__}
            )
