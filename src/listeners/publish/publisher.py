"""Publishes envelopes in order through a broker, and recovers from its loss.

Pub/Sub keeps nothing, so an event that cannot be published is dropped, but never
silently. The invariant, held here and nowhere else: every event handed to the publisher is
either confirmed written to the broker, or its user is resynced once the broker answers
again (the node then sends fresh syncs, from which every consumer converges). That holds
whatever interrupts a batch: the broker going away, an exception nobody foresaw (the task
dies and the supervisor restarts it), or a cancellation.

After a stream's last event, a tail position follows once the stream is quiet
(publish/tails.py), so that a consumer who missed that event notices.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from listeners.envelope import Envelope
from listeners.metrics import Metrics
from listeners.publish.tails import TailPositions
from listeners_bridge.backoff import Backoff
from listeners_bridge.broker import Broker, BrokerUnavailable, Message
from listeners_bridge.connection import connection_failed
from listeners_bridge.events import POSITION_TYPES
from listeners_bridge.waits import wait_event

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
        tails: TailPositions | None = None,
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
        self._tails = tails if tails is not None else TailPositions()  # an empty one is falsy
        self._inflight: list[_Pending] = []  # the batch being written: not confirmed yet
        self._gaps: set[str] = set()  # users with an event not confirmed: resynced when possible
        self._missed = False  # something was dropped while the broker was down
        self.up = False
        self._last_answer = 0.0  # monotonic time the broker last answered
        self.ready = asyncio.Event()  # set once the broker has answered for the first time
        self.resync: ResyncUsers = lambda uids: None
        # The last events published, for the operations page: identifiers only, no payload.
        self.recent: deque[dict[str, str | float]] = deque(maxlen=100)

    def submit(self, channel: str, envelope: Envelope, lag_from: float | None = None) -> bool:
        """Queue one event; never blocks, never raises. False: dropped (its user is resynced)."""
        self._tails.saw(channel, envelope, time.monotonic())
        if not self.up:
            self._metrics.publish_failures.labels("redis_down").inc()
            self._missed = True  # every user is resynced on recovery
            return False
        if len(self._queue) >= self._max_queue:
            self._metrics.publish_failures.labels("queue_full").inc()
            self._gaps.add(envelope.uid)
            return False
        self._queue.append(_Pending(channel, envelope, lag_from))
        self._idle.clear()
        self._wakeup.set()
        return True

    def forget_tails(self, channels: Iterable[str]) -> None:
        """No tail position for these channels from here (their user left this instance)."""
        self._tails.forget(channels)

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def flush(self, timeout: float) -> bool:
        """Wait until everything queued is published; False if that did not happen in time."""
        return await wait_event(self._idle, timeout)

    async def run(self) -> None:
        try:
            await self._recover(first=not self.ready.is_set())
            await self._serve()
        finally:
            # Whatever ended the task (an exception nobody foresaw, a cancellation), the batch
            # it was writing is not known to have arrived: its users are resynced once the
            # broker answers, by this task when the supervisor restarts it.
            self._abandon_inflight()

    async def _serve(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wakeup.clear()
                woken = await wait_event(self._wakeup, self._idle_wait())
                if not woken and not self._queue_positions() and self._ping_due():
                    await self._check()
                continue
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch))]
            self._metrics.publish_queue.set(len(self._queue))
            self._inflight = batch
            try:
                await self._broker.publish_many([self._message(p) for p in batch])
            except Exception as exc:
                if not isinstance(exc, BrokerUnavailable) and not connection_failed(exc):
                    raise  # a bug: the supervisor restarts the task, and run() keeps the invariant
                self._lost(len(batch) + len(self._queue), _reason(exc))
                await self._recover()
                continue
            self._inflight = []
            self._published(batch)
            self._queue_positions()
            if self._gaps and len(self._queue) < self._max_queue // 2:
                self._resync_gaps("publish queue was full or a batch was interrupted", 0.0)

    def _idle_wait(self) -> float:
        due = self._tails.due_at()
        if due is None:
            return self._ping_interval
        return min(self._ping_interval, max(0.05, due - time.monotonic()))

    def _ping_due(self) -> bool:
        now = time.monotonic()
        if now - self._last_answer < self._ping_interval:
            return False
        self._last_answer = now
        return True

    def _queue_positions(self) -> bool:
        """Queue the tail positions that are due; True if there were any."""
        if not self.up:
            return False
        due = self._tails.take_due(time.monotonic())
        for channel, position in due:
            self._queue.append(_Pending(channel, position, None))
        if due:
            self._metrics.positions.inc(len(due))
            self._idle.clear()
        return bool(due)

    def _abandon_inflight(self) -> None:
        if self._inflight:
            self._gaps.update(p.envelope.uid for p in self._inflight)
            self._metrics.publish_failures.labels("interrupted").inc(len(self._inflight))
            log.warning(
                "publish interrupted mid-batch; its users will be resynced",
                extra={"dropped": len(self._inflight), "users": len(self._gaps)},
            )
            self._inflight = []

    def _resync_gaps(self, reason: str, delay: float) -> None:
        gaps, self._gaps = self._gaps, set()
        log.warning("resyncing users", extra={"users": len(gaps), "reason": reason})
        self._metrics.resyncs.labels("publish_gap").inc()
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self.resync, gaps)
        else:
            self.resync(gaps)

    @staticmethod
    def _message(pending: _Pending) -> Message:
        return pending.channel, pending.envelope.to_json()

    def _published(self, batch: list[_Pending]) -> None:
        now = time.time()
        self._last_answer = time.monotonic()
        events = 0
        for pending in batch:
            envelope = pending.envelope
            if envelope.type in POSITION_TYPES:
                continue
            events += 1
            self._metrics.events.labels(envelope.type).inc()
            doc_id = envelope.payload.get("doc_id") or envelope.payload.get("thread_key") or ""
            self.recent.append({"at": now, "uid": envelope.uid, "type": envelope.type, "doc_id": str(doc_id)})
            if pending.lag_from is not None:
                self._metrics.lag.observe(max(0.0, now - pending.lag_from))
        self._tails.published(events)

    async def _check(self) -> None:
        try:
            await self._broker.ping()
        except BrokerUnavailable as exc:
            self._lost(0, str(exc))
            await self._recover()

    def _lost(self, dropped: int, reason: str) -> None:
        self.up = False
        self._metrics.redis_up.set(0)
        self._metrics.publish_failures.labels("redis_down").inc(dropped)
        self._queue.clear()
        self._inflight = []
        self._gaps.clear()  # every user is resynced on recovery
        self._missed = True
        self._metrics.publish_queue.set(0)
        log.error(
            "redis unavailable; events dropped until it is back",
            extra={"dropped": dropped, "reason": reason},
        )

    async def _recover(self, first: bool = False) -> None:
        was_up = self.up
        attempt = 0
        while True:
            try:
                await self._broker.ping()
                break
            except Exception as exc:
                if not isinstance(exc, BrokerUnavailable) and not connection_failed(exc):
                    raise
                if attempt == 0 and first:
                    log.error("redis unavailable at start-up; retrying", extra={"reason": _reason(exc)})
                self.up = False
                self._metrics.redis_up.set(0)
                await asyncio.sleep(self._backoff.delay(attempt))
                attempt += 1
        self.up = True
        self.ready.set()
        self._metrics.redis_up.set(1)
        if not first and not was_up:
            self._metrics.redis_reconnects.inc()
        self._last_answer = time.monotonic()
        # Subscribers lost the same Redis and resubscribe on their own schedule: the resync
        # waits a moment so that most of them are back to receive it.
        if self._missed:
            self._missed = False
            self._gaps.clear()
            log.info("redis is reachable; resyncing every user", extra={"delay": self._resync_delay})
            self._metrics.resyncs.labels("redis_recovered").inc()
            asyncio.get_running_loop().call_later(self._resync_delay, self.resync, None)
        elif self._gaps:
            self._resync_gaps("events not confirmed before the task restarted", self._resync_delay)


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, BrokerUnavailable) else f"{type(exc).__name__}: {exc}"[:300]
