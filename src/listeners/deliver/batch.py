"""Control messages of many sockets, sent together: one pipeline for whatever is waiting.

Every socket that opens asks for a resync over the control channel. In a reconnect storm
(10,000 sockets in seconds) one PUBLISH each, all at once, would need as many Redis
connections: redis-py's pool holds 100, and past that every command fails, the event
publisher's own (which shares the pool) included, which then drops its queue. Here the
messages queue up and one task sends them, at most `MAX_BATCH` to a pipeline, one pipeline
at a time: the storm costs one connection and a few round trips.
"""

from __future__ import annotations

import asyncio

from listeners.publish.broker import Broker, BrokerUnavailable

MAX_BATCH = 500  # messages per pipeline: ~200 KB of resync requests at most


class Batcher:
    def __init__(self, broker: Broker, channel: str) -> None:
        self._broker = broker
        self._channel = channel
        self._waiting: list[tuple[bytes, asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None
        self.pipelines = 0  # sent, for tests and curiosity

    async def send(self, message: bytes) -> None:
        """Returns once the message is published; BrokerUnavailable if its pipeline failed."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._waiting.append((message, done))
        if self._sender is None:
            self._sender = loop.create_task(self._send_all(), name=f"batch {self._channel}")
        await done

    async def _send_all(self) -> None:
        try:
            await asyncio.sleep(0)  # let the senders of this loop turn join the first pipeline
            while self._waiting:
                batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
                failure: BrokerUnavailable | None = None
                try:
                    await self._broker.publish_many([(self._channel, message) for message, _ in batch])
                    self.pipelines += 1
                except BrokerUnavailable as exc:
                    failure = exc
                for _, done in batch:
                    if done.done():  # its sender was cancelled
                        continue
                    if failure is None:
                        done.set_result(None)
                    else:
                        done.set_exception(BrokerUnavailable(str(failure)))
        finally:
            self._sender = None
            for _, done in self._waiting:  # cancelled while sending: nothing will send these
                if not done.done():
                    done.set_exception(BrokerUnavailable("control batch stopped"))
            self._waiting = []
