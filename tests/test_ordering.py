"""Ordered events: the order rules a consumer applies (pure units) and the bridge acting on a
gap (the in-memory broker stands for Redis: these are the bridge's own decisions)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator
from typing import Any, cast

import pytest

from listeners.config import RedisSettings, Secret
from listeners.control import verify
from listeners.streams.order import StreamOrder
from listeners.streams.view import EventNames, PublishedView, Publishing
from listeners_bridge import Bridge, parse_event
from listeners_bridge.broker import MemoryBroker
from listeners_bridge.events import stream_of
from listeners_bridge.ordering import Follower, Ordering, Verdict

TOKEN = "unit-control-token"


def event(kind: str, epoch: str, seq: int, event_id: str = "", **payload: Any) -> dict[str, Any]:
    body = payload or ({"notifications": []} if kind.endswith(".sync") else {"doc_id": "d"})
    return {
        "type": kind,
        "uid": "u",
        "timestamp": "2025-01-01T00:00:00Z",
        "event_id": event_id or f"{epoch}-{seq}",
        "epoch": epoch,
        "seq": seq,
        "payload": body,
    }


def test_deltas_follow_the_sync_of_their_epoch() -> None:
    o = Ordering()
    assert o.admit(event("notif.add", "A", 1)) is Verdict.GAP  # before any sync
    assert o.waiting
    assert o.admit(event("notif.sync", "A", 3)) is Verdict.APPLY and not o.waiting
    assert o.admit(event("notif.add", "A", 2)) is Verdict.DROP  # older than the sync
    assert o.admit(event("notif.add", "A", 4)) is Verdict.APPLY
    assert o.admit(event("notif.add", "A", 4)) is Verdict.DROP  # a duplicate
    assert o.admit(event("notif.add", "A", 6)) is Verdict.GAP  # 5 is missing
    assert o.admit(event("notif.add", "A", 7)) is Verdict.DROP  # nothing until a sync
    assert o.admit(event("notif.sync", "A", 4)) is Verdict.DROP  # not newer than the state
    assert o.admit(event("notif.sync", "A", 8)) is Verdict.APPLY
    assert o.admit(event("notif.add", "A", 9)) is Verdict.APPLY
    assert o.position("notif") == ("A", 9)


def test_an_unknown_epoch_without_its_sync_is_a_gap_and_the_same_change_is_dropped() -> None:
    o = Ordering()
    o.admit(event("notif.sync", "A", 1))
    assert o.admit(event("notif.add", "A", 2, event_id="change-1")) is Verdict.APPLY
    # the other instance of a handover publishes the same change under its own epoch
    assert o.admit(event("notif.add", "B", 7, event_id="change-1")) is Verdict.DROP
    assert o.admit(event("notif.add", "B", 8, event_id="change-2")) is Verdict.GAP
    assert o.admit(event("notif.add", "A", 3, event_id="change-2")) is Verdict.APPLY  # A goes on
    assert o.admit(event("notif.sync", "B", 9)) is Verdict.APPLY  # B's sync: follow B
    assert o.admit(event("notif.add", "B", 10)) is Verdict.APPLY


def test_streams_are_counted_apart_and_old_events_are_deduplicated_by_id() -> None:
    o = Ordering()
    o.admit(event("notif.sync", "A", 1))
    assert o.admit(event("msg.add", "A2", 1)) is Verdict.GAP  # msg has a sequence of its own
    chat = event("chat.sync", "C", 1)
    chat["payload"] = {"space_code": "s", "thread_key": "t", "raw_messages": []}
    assert stream_of(chat) == "chat:s:t"
    legacy = {"type": "notif.add", "uid": "u", "event_id": "x", "payload": {"doc_id": "d"}}
    assert o.admit(legacy) is Verdict.APPLY and o.admit(legacy) is Verdict.DROP


def test_the_follower_needs_a_resync_until_a_sync_heals_its_gap() -> None:
    f = Follower()
    assert f.needs_resync
    assert f.admit(event("notif.sync", "A", 1)) and not f.needs_resync
    assert not f.admit(event("notif.add", "A", 3)) and f.needs_resync
    assert f.admit(event("notif.sync", "A", 4)) and not f.needs_resync
    f.lost()
    assert f.needs_resync


def collector(into: list[dict[str, Any]]) -> Any:
    def emit(envelope: Any, lag: float | None) -> bool:
        into.append(json.loads(envelope.to_json()))
        return True

    return emit


def test_a_tail_position_ahead_of_what_is_held_is_a_gap_and_never_applied() -> None:
    f = Follower()
    position = event("notif.position", "A", 1, payload={})
    assert not f.admit(position) and f.needs_resync  # before any sync: dropped, a sync is asked anyway
    assert f.admit(event("notif.sync", "A", 1))
    assert f.admit(event("notif.add", "A", 2))
    assert not f.admit(event("notif.position", "A", 2)) and not f.needs_resync  # at the tail: nothing
    assert not f.admit(event("notif.position", "A", 1)) and not f.needs_resync  # behind: nothing
    assert f.ordering.admit(event("msg.position", "M", 4)) is Verdict.DROP  # another stream, never synced
    # the last event (seq 3) was lost; nothing follows it but the position
    assert f.ordering.admit(event("notif.position", "A", 3)) is Verdict.GAP
    assert f.needs_resync
    assert not f.admit(event("notif.position", "A", 3))  # asked already: no second gap
    assert f.admit(event("notif.sync", "A", 4)) and not f.needs_resync


def test_a_tail_position_of_another_epoch_is_a_gap() -> None:
    f = Follower()
    assert f.admit(event("notif.sync", "A", 1))
    assert f.ordering.admit(event("notif.position", "B", 1)) is Verdict.GAP  # B's sync was missed
    assert f.needs_resync
    assert f.admit(event("notif.add", "A", 2))  # its own epoch still applies meanwhile
    assert f.admit(event("notif.sync", "B", 2)) and not f.needs_resync


def test_stream_order_rises_by_one_and_changes_epoch_on_restart() -> None:
    published: list[dict[str, Any]] = []
    emit = collector(published)

    names = EventNames("notif.sync", "notif.add", "notif.update", "notif.remove")
    view = PublishedView(
        "u", names, emit, frozenset(), lambda items, added: {"notifications": list(items)},
        publishing=Publishing("inst-1"),
    )  # fmt: skip
    item = {"doc_id": "d1", "collection_id": "c"}
    view.replace({"d1": item}, None, {"d1": "t1"})
    view.replace({"d1": {**item, "status": "x"}}, None, {"d1": "t2"})
    view.replace({}, None, {})
    view.restart()
    view.replace({}, None, {})
    assert [(e["type"], e["seq"]) for e in published] == [
        ("notif.sync", 1), ("notif.update", 2), ("notif.remove", 3), ("notif.sync", 1),
    ]  # fmt: skip
    assert published[0]["epoch"] == published[2]["epoch"] != published[3]["epoch"]
    assert published[0]["epoch"].startswith("inst-1:")
    # the same change on another instance: the same id, another epoch
    other: list[dict[str, Any]] = []
    twin = PublishedView(
        "u", names, collector(other), frozenset(),
        lambda items, added: {"notifications": list(items)}, publishing=Publishing("inst-2"),
    )  # fmt: skip
    twin.replace({"d1": item}, None, {"d1": "t1"})
    twin.replace({"d1": {**item, "status": "x"}}, None, {"d1": "t2"})
    assert other[1]["event_id"] == published[1]["event_id"] and other[1]["epoch"] != published[1]["epoch"]


def test_a_dropped_event_still_takes_its_seq() -> None:
    order = StreamOrder("i")
    first, second = order.stamp("notif.add", "u", {}), order.stamp("notif.add", "u", {})
    assert (first.seq, second.seq) == (1, 2)


async def until(predicate: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_the_bridge_asks_for_a_resync_on_a_gap_and_skips_what_it_cannot_apply() -> None:
    broker = MemoryBroker()
    bridge = Bridge(RedisSettings(host="unused", control_token=Secret(TOKEN)), broker=broker)
    generator = cast(AsyncGenerator[dict[str, Any], None], bridge.events("u"))
    requests = broker.published["listeners:control"]

    async def publish(*events: dict[str, Any]) -> None:
        await broker.publish_many([("user:u", json.dumps(e).encode()) for e in events])

    async with contextlib.aclosing(generator) as events:
        first = asyncio.ensure_future(anext(events))
        await until(lambda: len(requests) == 1)  # subscribed: it asks for the current state
        await publish(event("notif.sync", "A", 1), event("notif.add", "A", 2))
        assert (await first)["seq"] == 1
        assert (await anext(events))["seq"] == 2
        # seq 3 is lost: 4 is not applied, and a resync is asked at once (not after 5 s)
        await publish(event("notif.add", "A", 4), event("notif.add", "A", 2))
        nxt = asyncio.ensure_future(anext(events))
        await until(lambda: len(requests) == 2)
        assert verify(TOKEN, requests[1]).uid == "u"
        await publish(event("notif.sync", "A", 5), event("notif.add", "A", 6))
        assert (await nxt)["seq"] == 5
        assert (await anext(events))["seq"] == 6
        assert len(requests) == 2


def test_parse_event_skips_a_type_that_is_not_a_string() -> None:
    kinds: list[object] = [["notif.add"], {}, 7, None]
    for kind in kinds:
        assert parse_event(json.dumps({**event("notif.add", "A", 1), "type": kind}), "u") is None


@pytest.mark.asyncio
async def test_the_bridge_restarts_its_subscriber_when_it_ends_and_its_readers_resync() -> None:
    broker = MemoryBroker()
    bridge = Bridge(RedisSettings(host="unused", control_token=Secret(TOKEN)), broker=broker)
    subscriber = bridge._subscriber
    run, runs = subscriber.run, 0

    async def failing_once() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("a bug in the subscriber")
        await run()

    subscriber.run = failing_once  # type: ignore[method-assign]
    requests = broker.published["listeners:control"]
    generator = cast(AsyncGenerator[dict[str, Any], None], bridge.events("u"))
    async with contextlib.aclosing(generator) as events:
        first = asyncio.ensure_future(anext(events))
        await until(lambda: runs == 2 and len(requests) >= 1)  # restarted, and it asks for a sync
        await broker.publish_many([("user:u", json.dumps(event("notif.sync", "A", 1)).encode())])
        assert (await first)["seq"] == 1
