"""Publishes envelopes in order through a broker, and recovers from its loss.

Pub/Sub keeps nothing, so an event that cannot be published is dropped, but never
silently: its user is marked, and once the broker is back (or the queue has room again)
the node sends that user a fresh sync, from which every consumer converges.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from listeners.backoff import Backoff
from listeners.envelope import Envelope
from listeners.metrics import Metrics
from listeners.publish.broker import Broker, BrokerUnavailable, Message
from listeners.waits import wait_event

log = logging.getLogger(__name__)

ResyncUsers = Callable[[set[str] | None], None]  # None: every user


@dataclass(frozen=True, slots=True)
class _Pending:
    channel: str
    envelope: Envelope
    lag_from: float | None  # epoch seconds of the Firestore update, for the lag histogram


class Publisher:
    def __init__(
        self,
        broker: Broker,
        metrics: Metrics,
        *,
        max_queue: int = 10_000,
        max_batch: int = 500,
        ping_interval: float = 2.5,
        resync_delay: float = 1.0,
        backoff: Backoff | None = None,
    ) -> None:
        self._broker = broker
        self._metrics = metrics
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._ping_interval = ping_interval
        self._resync_delay = resync_delay
        self._backoff = backoff or Backoff()
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._gaps: set[str] = set()
        self._missed = False  # something was dropped while the broker was down
        self.up = False
        self.ready = asyncio.Event()  # set once the broker has answered for the first time
        self.resync: ResyncUsers = lambda uids: None
        # The last events published, for the operations page: identifiers only, no payload.
        self.recent: deque[dict[str, str | float]] = deque(maxlen=100)

    def submit(self, channel: str, envelope: Envelope, lag_from: float | None = None) -> bool:
        """Queue one event; never blocks, never raises. False: dropped (its user is resynced)."""
        if not self.up:
            self._metrics.publish_failures.inc()
            self._missed = True  # every user is resynced on recovery
            return False
        if len(self._queue) >= self._max_queue:
            self._metrics.publish_failures.inc()
            self._gaps.add(envelope.uid)
            return False
        self._queue.append(_Pending(channel, envelope, lag_from))
        self._idle.clear()
        self._wakeup.set()
        return True

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def flush(self, timeout: float) -> bool:
        """Wait until everything queued is published; False if that did not happen in time."""
        return await wait_event(self._idle, timeout)

    async def run(self) -> None:
        await self._recover(first=True)
        while True:
            if not self._queue:
                self._idle.set()
                self._wakeup.clear()
                if not await wait_event(self._wakeup, self._ping_interval):
                    await self._check()
                    continue
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch))]
            self._metrics.publish_queue.set(len(self._queue))
            try:
                await self._broker.publish_many([self._message(p) for p in batch])
            except BrokerUnavailable as exc:
                self._lost(len(batch) + len(self._queue), str(exc))
                await self._recover()
                continue
            self._published(batch)
            if self._gaps and len(self._queue) < self._max_queue // 2:
                gaps, self._gaps = self._gaps, set()
                log.warning("publish queue was full; resyncing users", extra={"users": len(gaps)})
                self.resync(gaps)

    @staticmethod
    def _message(pending: _Pending) -> Message:
        return pending.channel, pending.envelope.to_json()

    def _published(self, batch: list[_Pending]) -> None:
        now = time.time()
        for pending in batch:
            envelope = pending.envelope
            self._metrics.events.labels(envelope.type).inc()
            doc_id = envelope.payload.get("doc_id") or envelope.payload.get("thread_key") or ""
            self.recent.append({"at": now, "uid": envelope.uid, "type": envelope.type, "doc_id": str(doc_id)})
            if pending.lag_from is not None:
                self._metrics.lag.observe(max(0.0, now - pending.lag_from))

    async def _check(self) -> None:
        try:
            await self._broker.ping()
        except BrokerUnavailable as exc:
            self._lost(0, str(exc))
            await self._recover()

    def _lost(self, dropped: int, reason: str) -> None:
        self.up = False
        self._metrics.redis_up.set(0)
        self._metrics.publish_failures.inc(dropped)
        self._queue.clear()
        self._gaps.clear()
        self._missed = True
        self._metrics.publish_queue.set(0)
        log.error(
            "redis unavailable; events dropped until it is back",
            extra={"dropped": dropped, "reason": reason},
        )

    async def _recover(self, first: bool = False) -> None:
        attempt = 0
        while True:
            try:
                await self._broker.ping()
                break
            except BrokerUnavailable as exc:
                if attempt == 0 and first:
                    log.error("redis unavailable at start-up; retrying", extra={"reason": str(exc)})
                await asyncio.sleep(self._backoff.delay(attempt))
                attempt += 1
        self.up = True
        self.ready.set()
        self._metrics.redis_up.set(1)
        if not first:
            self._metrics.redis_reconnects.inc()
        if self._missed:
            self._missed = False
            # Subscribers lost the same Redis and resubscribe on their own schedule: the
            # resync waits a moment so that most of them are back to receive it.
            log.info("redis is reachable; resyncing every user", extra={"delay": self._resync_delay})
            asyncio.get_running_loop().call_later(self._resync_delay, self.resync, None)
