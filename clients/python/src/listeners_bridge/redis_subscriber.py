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

The connection is made by redis-py (TLS, AUTH, SELECT) and then read raw (`publish.resp`):
every message that has arrived is read and handed on in one go, so that a busy channel
(5,000 events a second per worker) does not leave this reader behind Redis, which cuts a
subscriber 32 MB behind (`client-output-buffer-limit pubsub`). Commands are written without
waiting for their replies: a SUBSCRIBE never waits on the reader, and the reader never waits
on anything but the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from listeners_bridge.backoff import Backoff, reraise_if_cancelled
from listeners_bridge.broker import Handler
from listeners_bridge.connection import close_quietly, connection_failed, redis_client
from listeners_bridge.resp import ReplyError, Wire
from listeners_bridge.settings import RedisSettings

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 3.0
HEARTBEAT_TIMEOUT = 3.0
SUBSCRIBE_CHUNK = 1_000  # channels per SUBSCRIBE when (re)connecting: ~40 KB commands


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
        self._channels: dict[bytes, str] = {}  # held channels, by the name Redis sends back
        self._confirmed: set[str] = set()
        self._callbacks: set[Callable[[bool], None]] = set()
        self._wire: Wire | None = None
        self._connected_before = False  # across restarts of `run` too: a restart lost messages
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()  # pulsed on every confirmation, and on connect/loss

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(self._channels.values())

    def on_connect(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        self._callbacks.add(callback)
        return lambda: self._callbacks.discard(callback)

    async def subscribe(self, channel: str) -> None:
        """Holds the channel from now on; sent at once when connected, else on connection.
        Never waits for Redis, and never fails: a connection being lost sends it again."""
        name = channel.encode("utf-8")  # UnicodeEncodeError: a name Redis could not carry
        if name in self._channels:
            return
        self._channels[name] = channel
        if self._wire is not None:
            self._wire.send(b"SUBSCRIBE", name)

    async def unsubscribe(self, channel: str) -> None:
        name = channel.encode("utf-8", "surrogatepass")
        if self._channels.pop(name, None) is None:
            return
        self._confirmed.discard(channel)
        if self._wire is not None:
            self._wire.send(b"UNSUBSCRIBE", name)

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

    async def run(self) -> None:
        attempt = 0
        while True:
            client = redis_client(self._settings, timeout=10.0)
            connection = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            try:
                wire = await self._connect(connection)
                attempt = 0
                reconnected, self._connected_before = self._connected_before, True
                if reconnected:
                    self._count_reconnect()
                    log.info("redis pub/sub reconnected", extra={"connection": self.name})
                for callback in list(self._callbacks):
                    self._call(callback, reconnected)
                await self._read(wire)
            except Exception as exc:
                reraise_if_cancelled()
                # ValueError: not RESP; RuntimeError: a write on a transport already reset
                if not (isinstance(exc, HalfOpen | ValueError) or connection_failed(exc)):
                    raise
                log.warning(
                    "redis pub/sub lost; reconnecting",
                    extra={"connection": self.name, "reason": f"{type(exc).__name__}: {exc}"[:200]},
                )
            finally:
                self._ready.clear()
                self._confirmed.clear()
                self._wire = None
                self._pulse()
                await asyncio.shield(_disconnect(connection, client))
            await asyncio.sleep(self._backoff.delay(attempt))
            attempt += 1

    async def _connect(self, connection: Any) -> Wire:
        # A connection that hangs while it is made is as dead as one that hangs later.
        async with asyncio.timeout(self._timeout + self._heartbeat):
            await connection.connect()  # redis-py: TLS, AUTH (or HELLO), SELECT
        # From here on the bytes are ours; redis-py has read all it asked for.
        wire = Wire(connection._reader, connection._writer)
        wire.send(b"PING")  # gives the reader something to expect
        names = list(self._channels)
        for at in range(0, len(names), SUBSCRIBE_CHUNK):
            wire.send(b"SUBSCRIBE", *names[at : at + SUBSCRIBE_CHUNK])
        self._wire = wire  # channels added from now on are sent as they come
        self._ready.set()
        self._pulse()
        return wire

    async def _read(self, wire: Any) -> None:
        """Hands on every message; a PING every heartbeat, and HalfOpen when its pong is late."""
        loop = asyncio.get_running_loop()
        waiting_since: float | None = loop.time()  # the PING sent while connecting
        next_ping = loop.time() + self._heartbeat
        while True:
            now = loop.time()
            if waiting_since is None and now >= next_ping:
                wire.send(b"PING")
                waiting_since, next_ping = now, now + self._heartbeat
            deadline = waiting_since + self._timeout if waiting_since is not None else next_ping
            replies = await wire.read(max(0.0, deadline - now) + 0.01)
            if not replies and waiting_since is not None and loop.time() - waiting_since > self._timeout:
                # A loop that stalled past the deadline (a worker closing 5,000 sockets) runs the
                # timeout and the arrival of the pong at once, the timeout winning: look again.
                replies = await wire.read(0.0)
                if not replies:
                    raise HalfOpen(f"no pong within {self._timeout:g} s")
            if not replies:
                continue
            pong = False
            for reply in replies:
                pong = self._on_reply(reply) or pong
            if pong:
                waiting_since = None
            elif waiting_since is not None:
                # The pong is queued behind what Redis sent before it: a connection that keeps
                # delivering is alive, however long a burst takes this process to read.
                waiting_since = loop.time()

    def _on_reply(self, reply: Any) -> bool:
        """Hands a message on, or notes a confirmation; True for the pong. (hiredis gives
        pub/sub replies as `PushNotification`, a list.)"""
        if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
            channel = self._channels.get(reply[1])
            if channel is None:
                return False  # e.g. a message in flight when its channel was let go
            try:
                self._handler(channel, reply[2])
            except Exception as exc:  # no message can end the connection
                log.error(
                    "pub/sub handler failed", extra={"connection": self.name, "reason": type(exc).__name__}
                )
            return False
        if reply == b"PONG" or (isinstance(reply, list) and reply and reply[0] == b"pong"):
            return True
        if isinstance(reply, list) and len(reply) == 3 and reply[0] in (b"subscribe", b"unsubscribe"):
            channel = self._channels.get(reply[1])
            if reply[0] == b"subscribe" and channel is not None:
                self._confirmed.add(channel)
            elif channel is None:  # an UNSUBSCRIBE's answer, unless it was subscribed again
                self._confirmed.discard(reply[1].decode("utf-8", "replace"))
            self._pulse()
            return False
        if isinstance(reply, ReplyError):  # e.g. NOPERM on a channel the ACL user may not read
            reason = str(reply)[:200]
            log.warning("redis pub/sub command refused", extra={"connection": self.name, "reason": reason})
        return False

    def _call(self, callback: Callable[[bool], None], reconnected: bool) -> None:
        try:
            callback(reconnected)
        except Exception as exc:
            log.error(
                "on_connect callback failed", extra={"connection": self.name, "reason": type(exc).__name__}
            )


async def _disconnect(connection: Any, client: Any) -> None:
    with contextlib.suppress(RedisError, OSError, RuntimeError):
        await connection.disconnect()
    await close_quietly(client)
