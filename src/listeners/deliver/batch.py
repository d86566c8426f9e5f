"""Resync requests of this process's sockets: one per user at a time, in pipelines, paced.

Every socket that opens asks for a resync over the control channel, and every socket asks
again when the hub's Pub/Sub connection comes back (it missed what was published meanwhile).
In a reconnect storm (10,000 sockets in seconds) one PUBLISH each, all at once, would need as
many Redis connections: redis-py's pool holds 100, and past that every command fails, the
event publisher's own (which shares the pool) included. And every instance's control
listener remembers each request for a minute (replay protection, `control.MAX_SEEN`): past
its cap it refuses them (28,980 refusals in one run, after the hub lost Redis 9 times).

So requests wait here, one entry per user with the union of the threads asked for (a user's
five tabs, or a socket opening as the hub reconnects, cost one request), and one task sends
them, at most `MAX_BATCH` to a pipeline, one pipeline at a time, at most `PER_SECOND` a
second. What fails to go out (Redis gone) waits for the next attempt: the waiting set is
bounded by this process's users.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from listeners_bridge.broker import Broker, BrokerUnavailable
from listeners_bridge.registry import ChatThread

log = logging.getLogger(__name__)

MAX_BATCH = 500  # requests per pipeline: ~200 KB at most
# Per process. Two workers send at most 800 a second, 48,000 a minute: under the 150,000
# that each instance's control listener remembers, with room for other instances' storms.
PER_SECOND = 400.0
RETRY_SECONDS = 1.0  # after a failed pipeline: Redis is gone, or going

Sign = Callable[[str, tuple[ChatThread, ...]], bytes]  # (uid, threads) -> the signed request


class Resyncs:
    def __init__(self, broker: Broker, channel: str, sign: Sign, *, per_second: float = PER_SECOND) -> None:
        self._broker = broker
        self._channel = channel
        self._sign = sign
        self._per_second = per_second
        self._waiting: dict[str, set[ChatThread]] = {}  # uid -> threads; insertion order
        self._sender: asyncio.Task[None] | None = None
        self.pipelines = 0  # sent, for tests and curiosity
        self.sent = 0
        self.merged = 0  # requests that joined one already waiting

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def request(self, uid: str, threads: tuple[ChatThread, ...] = ()) -> None:
        """Asks for fresh syncs of the user's streams and of these threads; never waits."""
        waiting = self._waiting.get(uid)
        if waiting is None:
            self._waiting[uid] = set(threads)
        else:
            waiting.update(threads)
            self.merged += 1
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(
                self._send_all(), name=f"resyncs {self._channel}"
            )

    async def _send_all(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(0)  # let the requests of this loop turn join the first pipeline
            while self._waiting:
                started = loop.time()
                uids = list(itertools.islice(self._waiting, MAX_BATCH))
                batch = [(uid, self._waiting.pop(uid)) for uid in uids]
                messages = [(self._channel, self._sign(uid, tuple(threads))) for uid, threads in batch]
                try:
                    await self._broker.publish_many(messages)
                except Exception as exc:  # Redis gone, or anything else: the requests are kept
                    level = logging.WARNING if isinstance(exc, BrokerUnavailable) else logging.ERROR
                    reason = f"{type(exc).__name__}: {exc}"[:200]
                    log.log(level, "resync requests not sent; retrying", extra={"reason": reason})
                    for uid, threads in batch:  # back in the queue, merged with newer ones
                        self._waiting.setdefault(uid, set()).update(threads)
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                self.pipelines += 1
                self.sent += len(batch)
                await asyncio.sleep(max(0.0, started + len(batch) / self._per_second - loop.time()))
        finally:
            self._sender = None

    async def aclose(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
