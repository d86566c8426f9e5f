"""The node as a unit, on an in-memory snapshot source (pure logic: no emulator)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from listeners.metrics import Metrics
from listeners.node import Node, NodeSettings
from listeners.publish.publisher import Publisher
from listeners.publish.tails import TailPositions
from listeners.session import Sources
from listeners.source.snapshots import Changes, Query, Snapshot, SnapshotHandler, SourceDoc
from listeners_bridge.broker import MemoryBroker
from listeners_bridge.registry import REGISTRY_COLLECTION

pytestmark = pytest.mark.asyncio

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class FakeWatch:
    def __init__(self, query: Query, handler: SnapshotHandler) -> None:
        self.query = query
        self.handler = handler
        self.active = True

    async def close(self) -> None:
        self.active = False


class FakeSource:
    """Hands every watch's handler to the test, which plays Firestore."""

    def __init__(self) -> None:
        self.watches: list[FakeWatch] = []

    def watch(self, query: Query, on_snapshot: SnapshotHandler) -> FakeWatch:
        watch = FakeWatch(query, on_snapshot)
        self.watches.append(watch)
        return watch

    def registry(self) -> list[FakeWatch]:
        return [w for w in self.watches if w.query.collection == REGISTRY_COLLECTION]

    @property
    def open_streams(self) -> int:
        return sum(w.active for w in self.watches)

    @property
    def connections(self) -> int:
        return 1

    def targets(self) -> dict[str, int]:
        return {}

    async def aclose(self) -> None:
        return None


def online(uid: str, status: str = "online") -> SourceDoc:
    data: dict[str, Any] = {"status": status, "heartbeat_at": NOW, "ttl_seconds": 3600}
    return SourceDoc(uid, data, update_time=NOW + timedelta(microseconds=len(status)))


@contextlib.asynccontextmanager
async def node_on(source: FakeSource, **settings: Any) -> AsyncIterator[Node]:
    metrics = Metrics()
    node = Node(
        NodeSettings(sweep_interval_seconds=0.05, **settings),
        Sources(source),
        Publisher(MemoryBroker(), metrics),
        metrics,
        clock=lambda: NOW,
    )
    async with node:
        task = asyncio.create_task(node.run())
        try:
            yield node
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def until(predicate: Any) -> None:
    async with asyncio.timeout(30):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_late_snapshots_of_a_replaced_registry_watch_are_ignored() -> None:
    source = FakeSource()
    async with node_on(source) as node:
        first = source.registry()[0]
        first.handler(Snapshot((online("ann"),)))
        await until(lambda: "ann" in node.sessions)
        first.active = False  # the stream ended: the sweep replaces the watch
        await until(lambda: len(source.registry()) == 2)
        second = source.registry()[1]
        second.handler(Snapshot((online("ann", "offline"),)))
        await until(lambda: "ann" not in node.sessions)
        # The old watch still had a snapshot in flight, from before ann went offline.
        first.handler(Snapshot((online("ann"), online("bob"))))
        second.handler(Snapshot((online("ann", "offline"), online("cid"))))  # a sentinel after it
        await until(lambda: "cid" in node.sessions)
        assert set(node.sessions) == {"cid"}  # neither ann back online nor bob from the old view


async def test_reconciles_are_queued_and_done_in_slices() -> None:
    """A registry snapshot of many users returns at once; the users are attached afterwards,
    in slices (here one user per slice), with the loop given a turn between slices."""
    source = FakeSource()
    async with node_on(source, slice_seconds=0.0) as node:
        users = [online(f"u{i:03d}") for i in range(100)]
        source.registry()[0].handler(Snapshot(tuple(users)))
        assert node.sessions == {} and node.pending == 100  # nothing done inside the callback
        turns = 0
        while node.pending:
            turns += 1
            await asyncio.sleep(0)
        assert len(node.sessions) == 100
        assert turns >= 50  # the loop ran other work while the users were being attached


async def test_a_user_being_handed_over_is_not_resynced_and_a_take_back_starts_a_new_epoch() -> None:
    """During the handover only the new owner answers resyncs (a sync from here would pull
    consumers back to an epoch about to end); taking the user back starts a new epoch."""
    source = FakeSource()
    metrics = Metrics()
    publisher = Publisher(MemoryBroker(), metrics)
    publisher.up = True  # queued, not sent: the queue is what the node published
    ours = {"ann": True}
    node = Node(
        NodeSettings(sweep_interval_seconds=0.05, handover_seconds=3600),
        Sources(source),
        publisher,
        metrics,
        clock=lambda: NOW,
        owns=lambda uid: ours[uid],
    )

    def published() -> list[tuple[str, str, int]]:
        return [(p.envelope.type, p.envelope.epoch, p.envelope.seq) for p in publisher._queue]

    async with node:
        task = asyncio.create_task(node.run())
        try:
            source.registry()[0].handler(Snapshot((online("ann"),)))
            await until(lambda: "ann" in node.sessions)
            notifications = next(w for w in source.watches if w.query.collection.endswith("notifications"))
            notifications.handler(Snapshot(()))
            (attach,) = published()
            assert attach[0] == "notif.sync" and attach[2] == 1
            node.resync_user("ann", ())
            assert len(published()) == 2  # the owner answers

            ours["ann"] = False
            node.rebalance()
            await until(lambda: "ann" in node._moving)
            node.resync_user("ann", ())
            node.resync(None)  # as after a Redis outage
            assert len(published()) == 2  # nothing from the instance handing the user over

            ours["ann"] = True
            node.rebalance()
            await until(lambda: len(published()) == 3)
            taken_back = published()[2]
            assert taken_back[0] == "notif.sync" and taken_back[1] != attach[1] and taken_back[2] == 1
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_a_failed_stream_is_restarted_by_the_rounds_of_bounded_health_checks() -> None:
    """Each sweep looks at `health_checks_per_sweep` users only, and a round covers them all:
    the failed stream of the last user checked is still replaced."""
    source = FakeSource()
    async with node_on(source, health_checks_per_sweep=1) as node:
        source.registry()[0].handler(Snapshot(tuple(online(f"u{i}") for i in range(5))))
        await until(lambda: len(node.sessions) == 5)
        failed = next(w for w in source.watches if w.query.collection == "clients/u0/notifications")
        failed.active = False
        await until(
            lambda: sum(w.query.collection == "clients/u0/notifications" for w in source.watches) == 2
        )
        assert node._metrics.stream_restarts.labels("notifications")._value.get() == 1


async def test_expiries_are_popped_as_they_fall_due_and_heartbeats_do_not_pile_up() -> None:
    clock = [NOW]
    source = FakeSource()
    metrics = Metrics()
    node = Node(
        NodeSettings(sweep_interval_seconds=0.05),
        Sources(source),
        Publisher(MemoryBroker(), metrics),
        metrics,
        clock=lambda: clock[0],
    )

    def beat(uid: str, at: datetime, ttl: int) -> SourceDoc:
        data = {"status": "online", "heartbeat_at": at, "ttl_seconds": ttl}
        return SourceDoc(uid, data, update_time=at)

    async with node:
        task = asyncio.create_task(node.run())
        try:
            registry = source.registry()[0]
            for n in range(3000):  # heartbeats of a long-lived user and a short-lived one
                at = NOW + timedelta(milliseconds=n)
                registry.handler(Snapshot((beat("long", at, 86_400), beat("short", at, 60))))
            assert len(node._expiries) <= 2 * 2 + 1024
            await until(lambda: set(node.sessions) == {"long", "short"})
            clock[0] = NOW + timedelta(seconds=120)  # past the last beat's 60 s
            await until(lambda: set(node.sessions) == {"long"})
            assert metrics.detaches.labels("expired")._value.get() == 1
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_registry_changes_are_read_instead_of_the_whole_collection() -> None:
    """After a watch's first snapshot the node reads the changes only: a document that did not
    change (here: one that would be refused if read) is not looked at again."""
    source = FakeSource()
    async with node_on(source) as node:
        registry = source.registry()[0]
        ann, bob = online("ann"), online("bob")
        registry.handler(Snapshot((ann,)))
        await until(lambda: "ann" in node.sessions)
        unread = SourceDoc("unread", {"status": "online"}, update_time=NOW)  # no heartbeat_at
        registry.handler(Snapshot((ann, unread, bob), changes=Changes(upserted=(bob,))))
        await until(lambda: "bob" in node.sessions)
        assert node._metrics.malformed_registry._value.get() == 0
        registry.handler(Snapshot((bob, unread), changes=Changes(removed=("ann",))))
        await until(lambda: "ann" not in node.sessions)
        assert node._metrics.detaches.labels("offline")._value.get() == 1


async def test_abandon_forgets_the_users_without_closing_their_watches() -> None:
    """At process exit the watches are left to the kernel: closing 10,000 of them one by one
    costs seconds of the shutdown budget."""
    source = FakeSource()
    async with node_on(source) as node:
        source.registry()[0].handler(Snapshot((online("ann"), online("bob"))))
        await until(lambda: len(node.sessions) == 2)
        node.abandon()
        assert node.sessions == {} and node.pending == 0
        assert all(w.active for w in source.watches if w.query.collection.startswith("clients/"))
        assert node._metrics.detaches.labels("shutdown")._value.get() == 2


async def test_a_detached_user_leaves_no_tail_position_behind() -> None:
    """Detached (offline, or handed over), a user's streams get no position from here: it would
    arrive after the next owner's sync and cost each consumer a resync."""
    source = FakeSource()
    metrics = Metrics()
    tails = TailPositions(quiet=0.0)
    publisher = Publisher(MemoryBroker(), metrics, tails=tails)
    publisher.up = True  # queued, not sent
    node = Node(
        NodeSettings(sweep_interval_seconds=0.05), Sources(source), publisher, metrics, clock=lambda: NOW
    )
    async with node:
        task = asyncio.create_task(node.run())
        try:
            source.registry()[0].handler(Snapshot((online("bea"), online("cid"))))
            await until(lambda: {"bea", "cid"} <= node.sessions.keys())
            for watch in source.watches:
                if watch.query.collection.endswith("notifications"):
                    watch.handler(Snapshot(()))  # each user's attach sync: a stream with a tail
            await until(lambda: len(tails) == 2)
            source.registry()[0].handler(Snapshot((online("cid"),), changes=Changes(removed=("bea",))))
            await until(lambda: "bea" not in node.sessions and len(node._closing) == 0)
            assert len(tails) == 1
            assert [channel for channel, _ in tails.take_due(float("inf"))] == ["user:cid"]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
