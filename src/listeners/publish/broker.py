"""The broker interface, after encode/broadcaster: connect, publish, disconnect.

`publish_many` sends a batch in order; it raises `BrokerUnavailable` when the broker
cannot be reached, and then nothing of the batch is known to have arrived.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

Message = tuple[str, bytes]  # (channel, body)


class BrokerUnavailable(Exception):
    """The broker cannot be reached; the publisher backs off and recovers."""


class Broker(Protocol):
    async def connect(self) -> None: ...

    async def disconnect(self) -> None: ...

    async def publish_many(self, messages: Sequence[Message]) -> None: ...

    async def ping(self) -> None: ...


class MemoryBroker:
    """Keeps every published message; for unit tests and for running without Redis."""

    def __init__(self) -> None:
        self.published: dict[str, list[bytes]] = defaultdict(list)
        self.available = True

    async def connect(self) -> None:
        return None

    async def disconnect(self) -> None:
        return None

    async def publish_many(self, messages: Sequence[Message]) -> None:
        await self.ping()
        for channel, body in messages:
            self.published[channel].append(body)

    async def ping(self) -> None:
        if not self.available:
            raise BrokerUnavailable("memory broker switched off")
