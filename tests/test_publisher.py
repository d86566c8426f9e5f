"""The publisher against the in-memory broker: ordering, outage recovery, queue overflow."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from listeners.backoff import Backoff
from listeners.envelope import Envelope
from listeners.metrics import Metrics
from listeners.publish.broker import MemoryBroker
from listeners.publish.publisher import Publisher

pytestmark = pytest.mark.asyncio


def event(uid: str, n: int) -> Envelope:
    return Envelope.create("notif.add", uid, {"doc_id": str(n)})


async def started(publisher: Publisher) -> asyncio.Task[None]:
    task = asyncio.create_task(publisher.run())
    await until(lambda: publisher.up)
    return task


async def until(condition: Callable[[], object], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def doc_ids(broker: MemoryBroker, channel: str) -> list[str]:
    return [json.loads(b)["payload"]["doc_id"] for b in broker.published[channel]]


async def test_publishes_in_order() -> None:
    broker = MemoryBroker()
    publisher = Publisher(broker, Metrics())
    task = await started(publisher)
    for n in range(1000):
        publisher.submit("user:a", event("a", n))
    assert await publisher.flush(30)
    assert doc_ids(broker, "user:a") == [str(n) for n in range(1000)]
    task.cancel()


async def test_outage_drops_then_resyncs_everyone() -> None:
    broker = MemoryBroker()
    metrics = Metrics()
    publisher = Publisher(broker, metrics, ping_interval=0.05, resync_delay=0.0, backoff=Backoff(0.01, 0.05))
    resyncs: list[set[str] | None] = []
    publisher.resync = resyncs.append
    task = await started(publisher)
    broker.available = False
    await until(lambda: not publisher.up)  # the idle ping notices
    assert not publisher.submit("user:a", event("a", 1))
    broker.available = True
    await until(lambda: resyncs)
    # dropped for good: published after recovery, the sentinel is alone
    assert publisher.submit("user:a", event("a", 2))
    assert await publisher.flush(30)
    assert doc_ids(broker, "user:a") == ["2"]
    assert resyncs == [None]
    assert metrics.publish_failures._value.get() == 1
    task.cancel()


async def test_full_queue_drops_and_resyncs_those_users() -> None:
    broker = MemoryBroker()
    publisher = Publisher(broker, Metrics(), max_queue=10)
    resyncs: list[set[str] | None] = []
    publisher.resync = resyncs.append
    task = await started(publisher)
    for n in range(15):  # no await between submits: the queue overflows
        publisher.submit("user:a" if n < 12 else "user:b", event("a" if n < 12 else "b", n))
    assert await publisher.flush(30)
    assert len(broker.published["user:a"]) == 10
    assert resyncs == [{"a", "b"}]
    task.cancel()
