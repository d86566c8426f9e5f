"""The publisher against the in-memory broker: ordering, outage recovery, queue overflow, the
no-silent-loss invariant whatever interrupts a batch, and tail positions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence

import pytest

from listeners.envelope import Envelope
from listeners.metrics import Metrics, total
from listeners.publish.publisher import Publisher
from listeners.publish.tails import TailPositions, position_of
from listeners.schemas import validate
from listeners.streams.order import StreamOrder
from listeners.supervisor import Supervisor
from listeners_bridge.backoff import Backoff
from listeners_bridge.broker import MemoryBroker, Message
from listeners_bridge.connection import connection_failed

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
    assert total(metrics.publish_failures) == 1
    assert metrics.resyncs.labels("redis_recovered")._value.get() == 1
    task.cancel()


async def test_full_queue_drops_and_resyncs_those_users() -> None:
    broker = MemoryBroker()
    metrics = Metrics()
    publisher = Publisher(broker, metrics, max_queue=10)
    resyncs: list[set[str] | None] = []
    publisher.resync = resyncs.append
    task = await started(publisher)
    for n in range(15):  # no await between submits: the queue overflows
        publisher.submit("user:a" if n < 12 else "user:b", event("a" if n < 12 else "b", n))
    assert await publisher.flush(30)
    assert len(broker.published["user:a"]) == 10
    assert resyncs == [{"a", "b"}]
    assert metrics.resyncs.labels("publish_gap")._value.get() == 1
    task.cancel()


# -- the invariant: every event is confirmed written, or its user is resynced -----------------

CLOSED_TRANSPORT = (
    "unable to perform operation on <TCPTransport closed=True reading=False>; the handler is closed"
)


class FaultyBroker(MemoryBroker):
    """The in-memory broker whose next batch raises `failure`, or hangs until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.failure: BaseException | None = None
        self.hang = False
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def publish_many(self, messages: Sequence[Message]) -> None:
        self.entered.set()
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure
        if self.hang:
            await self.release.wait()
        await super().publish_many(messages)


def resynced(resyncs: list[set[str] | None], uid: str) -> bool:
    return any(r is None or uid in r for r in resyncs)


def supervised(publisher: Publisher) -> Supervisor:
    supervisor = Supervisor(Metrics(), lambda reason: None, backoff=Backoff(0.01, 0.02))
    supervisor.start("publisher", publisher.run)
    return supervisor


@pytest.mark.parametrize(
    "failure",
    [
        ConnectionError("reset by peer"),
        TimeoutError("timed out"),
        RuntimeError(CLOSED_TRANSPORT),
        KeyError("a bug"),
    ],
    ids=["ConnectionError", "TimeoutError", "RuntimeError-closed-transport", "task-dies-and-restarts"],
)
async def test_a_batch_that_fails_mid_write_resyncs_its_users(failure: BaseException) -> None:
    broker = FaultyBroker()
    metrics = Metrics()
    publisher = Publisher(broker, metrics, ping_interval=0.05, resync_delay=0.0, backoff=Backoff(0.01, 0.05))
    resyncs: list[set[str] | None] = []
    publisher.resync = resyncs.append
    supervisor = supervised(publisher)
    await until(lambda: publisher.up)
    broker.failure = failure
    assert publisher.submit("user:a", event("a", 1))
    await until(lambda: resynced(resyncs, "a"))
    assert broker.published["user:a"] == []  # never written: the resync is what heals it
    assert publisher.submit("user:a", event("a", 2))  # and the publisher goes on
    assert await publisher.flush(30)
    assert doc_ids(broker, "user:a") == ["2"]
    assert total(metrics.publish_failures) >= 1
    # a closed transport is a connection failure, not a task death
    expected_restarts = 1 if isinstance(failure, KeyError) else 0
    assert supervisor.restarts["publisher"] == expected_restarts
    await supervisor.stop()


async def test_a_batch_cancelled_mid_write_resyncs_its_users_when_the_task_runs_again() -> None:
    broker = FaultyBroker()
    publisher = Publisher(broker, Metrics(), ping_interval=0.05, resync_delay=0.0)
    resyncs: list[set[str] | None] = []
    publisher.resync = resyncs.append
    task = await started(publisher)
    broker.hang = True
    publisher.submit("user:b", event("b", 0))
    publisher.submit("user:a", event("a", 1))
    await broker.entered.wait()
    task.cancel()  # e.g. the supervisor stops the task while a batch is on the wire
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not resynced(resyncs, "a")  # nothing can be resynced before the broker answers
    broker.hang = False
    task = asyncio.create_task(publisher.run())  # as the supervisor restarts it
    await until(lambda: resynced(resyncs, "a") and resynced(resyncs, "b"))
    assert resyncs == [{"a", "b"}]
    task.cancel()


async def test_connection_failed_tells_a_closed_transport_from_a_bug() -> None:
    assert connection_failed(RuntimeError(CLOSED_TRANSPORT))
    assert connection_failed(RuntimeError("Transport is closed"))
    assert connection_failed(ConnectionResetError())
    assert connection_failed(TimeoutError())
    assert not connection_failed(RuntimeError("dictionary changed size during iteration"))
    assert not connection_failed(KeyError("x"))


# -- tail positions ------------------------------------------------------------------------


def stamped(order: StreamOrder, uid: str, n: int) -> Envelope:
    return order.stamp("notif.add", uid, {"doc_id": str(n)}, identity=str(n))


async def test_one_tail_position_per_burst_none_for_an_idle_stream() -> None:
    broker = MemoryBroker()
    tails = TailPositions(quiet=0.2)
    publisher = Publisher(broker, Metrics(), tails=tails)
    task = await started(publisher)
    order = StreamOrder("t")
    for n in range(5):  # a burst
        publisher.submit("user:a", stamped(order, "a", n))
    await until(lambda: len(broker.published["user:a"]) == 6)
    events = [json.loads(b) for b in broker.published["user:a"]]
    assert [e["type"] for e in events] == ["notif.add"] * 5 + ["notif.position"]
    assert (events[-1]["epoch"], events[-1]["seq"]) == (order.epoch, 5)
    assert events[-1]["payload"] == {}
    # quiet from here: no second position, whatever the time (the tails are empty)
    assert len(tails) == 0
    publisher.submit("user:a", stamped(order, "a", 6))  # a new burst: one more
    await until(lambda: len(broker.published["user:a"]) == 8)
    assert json.loads(broker.published["user:a"][-1])["seq"] == 6
    task.cancel()


async def test_tail_positions_stay_within_their_budget_under_load() -> None:
    tails = TailPositions(quiet=2.0, ratio=0.5, floor=1.0, burst=100)
    orders = {f"u{i}": StreamOrder("t") for i in range(1000)}
    sent = 0
    now = 0.0
    for second in range(60):  # 100 events per second, each on a user of its own (bursts of one)
        for i in range(100):
            uid = f"u{(second * 100 + i) % 1000}"
            tails.saw(f"user:{uid}", stamped(orders[uid], uid, second), now)
        tails.published(100)
        now += 1.0
        sent += len(tails.take_due(now))
    assert sent <= 0.5 * 6000 + 100  # the ratio, and the first burst
    assert sent >= 0.4 * 6000  # and the budget is used: positions are not starved
    # the load stops: every stream left gets its position, oldest first, at the floor's pace
    left = len(tails)
    for _ in range(3000):
        now += 1.0
        sent += len(tails.take_due(now))
    assert len(tails) == 0 and left > 0


async def test_the_budget_is_the_larger_of_ratio_and_floor_never_their_sum() -> None:
    """Frequent wakes, only some with events published: the floor must not top up each of the
    others (it did, per wake: 6 positions per second here instead of 5)."""
    tails = TailPositions(quiet=0.0, ratio=0.5, floor=2.0, burst=10)
    order = StreamOrder("t")
    sent, now = 0, 0.0
    for wake in range(600):  # 60 s, a wake every 0.1 s; 10 events per second, in batches of 2
        for n in range(20):  # always more streams waiting than the budget allows
            tails.saw(f"user:u{wake}-{n}", stamped(order, f"u{wake}-{n}", n), now)
        if wake % 2:
            tails.published(2)
        now += 0.1
        sent += len(tails.take_due(now))
    assert sent <= 0.5 * 600 + 10 + 1  # the ratio (5/s is more than the floor's 2/s), the burst
    assert sent >= 0.5 * 600 - 1  # and all of it is used


async def test_a_quiet_instance_gets_the_floor() -> None:
    tails = TailPositions(quiet=0.0, ratio=0.5, floor=2.0, burst=1)
    order = StreamOrder("t")
    sent, now = 0, 0.0
    for wake in range(30):  # a wake every 2 s, no event published: the floor alone, 2/s
        for n in range(10):
            tails.saw(f"user:q{wake}-{n}", stamped(order, f"q{wake}-{n}", n), now)
        now += 2.0
        sent += len(tails.take_due(now))
    assert sent == 30  # the burst (1) caps each wake; the floor refilled it every time


async def test_a_chat_position_names_its_thread() -> None:
    last = StreamOrder("t").stamp(
        "chat.message", "u", {"space_code": "acme", "thread_key": "t1", "raw_messages": []}
    )
    position = position_of(last)
    assert position.type == "chat.position"
    assert position.payload == {"space_code": "acme", "thread_key": "t1"}
    assert (position.epoch, position.seq) == (last.epoch, last.seq)
    assert position.event_id == position_of(last).event_id  # stable: the same on every instance
    validate(json.loads(position.to_json()))
