"""The broker interface, after encode/broadcaster: connect, publish, subscribe, disconnect.

`publish_many` sends a batch in order; it raises `BrokerUnavailable` when the broker
cannot be reached, and then nothing of the batch is known to have arrived.

`subscriber(name, handler)` gives the subscribe side: one connection carrying any number of
channels, whose messages go to `handler(channel, data)` on the loop. It reconnects by itself
and resubscribes; `on_connect` callbacks run after each (re)connection, because Pub/Sub keeps
nothing and whoever was away must ask for a resync.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Protocol

Message = tuple[str, bytes]  # (channel, body)
Handler = Callable[[str, bytes], None]  # (channel, data); called on the loop, must not block


class BrokerUnavailable(Exception):
    """The broker cannot be reached; the publisher backs off and recovers."""


class Subscriber(Protocol):
    @property
    def connected(self) -> bool: ...

    def on_connect(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        """`callback(reconnected)` after every (re)subscription of all channels; returns a remover."""

    async def subscribe(self, channel: str) -> None: ...

    async def unsubscribe(self, channel: str) -> None: ...

    def is_confirmed(self, channel: str) -> bool: ...

    async def confirmed(self, channel: str, timeout: float) -> bool: ...

    async def run(self) -> None:
        """Holds the connection for as long as it runs; never returns, never raises on broker trouble."""


class Broker(Protocol):
    async def connect(self) -> None: ...

    async def disconnect(self) -> None: ...

    async def publish_many(self, messages: Sequence[Message]) -> None: ...

    async def ping(self) -> None: ...

    def subscriber(self, name: str, handler: Handler) -> Subscriber: ...


class MemoryBroker:
    """Keeps every published message and hands it to subscribers: for unit tests and for
    running without Redis. `available = False` is Redis gone: publishing raises, and every
    subscriber drops its connection until `available` is True again."""

    def __init__(self) -> None:
        self.published: dict[str, list[bytes]] = defaultdict(list)
        self._available = True
        self._subscribers: list[MemorySubscriber] = []

    @property
    def available(self) -> bool:
        return self._available

    @available.setter
    def available(self, value: bool) -> None:
        self._available = value
        for subscriber in self._subscribers:
            subscriber._availability_changed()

    async def connect(self) -> None:
        return None

    async def disconnect(self) -> None:
        return None

    async def publish_many(self, messages: Sequence[Message]) -> None:
        await self.ping()
        for channel, body in messages:
            self.published[channel].append(body)
            for subscriber in self._subscribers:
                subscriber._deliver(channel, body)

    async def ping(self) -> None:
        if not self._available:
            raise BrokerUnavailable("memory broker switched off")

    def subscriber(self, name: str, handler: Handler) -> MemorySubscriber:
        subscriber = MemorySubscriber(self, handler)
        self._subscribers.append(subscriber)
        return subscriber


class MemorySubscriber:
    def __init__(self, broker: MemoryBroker, handler: Handler) -> None:
        self._broker = broker
        self._handler = handler
        self._channels: set[str] = set()
        self._callbacks: set[Callable[[bool], None]] = set()
        self._connected = False
        self._connected_before = False
        self._changed = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._connected

    def on_connect(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        self._callbacks.add(callback)
        return lambda: self._callbacks.discard(callback)

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    def is_confirmed(self, channel: str) -> bool:
        return self._connected and channel in self._channels

    async def confirmed(self, channel: str, timeout: float) -> bool:
        return self.is_confirmed(channel)

    async def run(self) -> None:
        while True:
            while not self._broker.available:
                await self._wait()
            self._connected = True
            reconnected, self._connected_before = self._connected_before, True
            for callback in list(self._callbacks):
                callback(reconnected)
            try:
                while self._broker.available:
                    await self._wait()
            finally:
                self._connected = False

    async def _wait(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    def _availability_changed(self) -> None:
        self._changed.set()

    def _deliver(self, channel: str, body: bytes) -> None:
        if self._connected and channel in self._channels:
            asyncio.get_running_loop().call_soon(self._handler, channel, body)
