"""The core pipeline end to end: registry -> Firestore notifications -> Redis Pub/Sub.

Real redis-server and the real Firestore emulator; the service runs in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from listeners.assemble import running
from listeners.config import Settings
from listeners.service import Service
from listeners.source.listen.protocol import TargetError
from listeners.source.listen.source import ListenWatch
from tests.conftest import Consumer, Firebase, iso_ago, wait_until

pytestmark = pytest.mark.asyncio

PROBE = "registry-probe"


@contextlib.asynccontextmanager
async def serving(settings: Settings, fb: Firebase) -> AsyncIterator[Service]:
    """The service, once its registry watch is seen to deliver changes.

    Google's emulator can miss a change committed while a watch is being set up (1 listen in 40
    on a loaded machine, measured; production Firestore does not), so tests write the registry
    only after this: a probe document, online but long expired so that nobody attaches (the
    registry watch sees online entries only), rewritten until read."""
    async with running(settings) as service:
        async with asyncio.timeout(30):
            while service.node.entry(PROBE) is None:
                expired = {"status": "online", "heartbeat_at": iso_ago(3600), "ttl_seconds": 1}
                await fb.set(f"listeners_registry/{PROBE}", expired)
                with contextlib.suppress(TimeoutError):
                    await wait_until(lambda: service.node.entry(PROBE) is not None, timeout=1)
        yield service


def ids(event: dict[str, Any]) -> list[str]:
    return [n["doc_id"] for n in event["payload"]["notifications"]]


def is_add(doc_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event["type"] == "notif.add" and event["payload"]["doc_id"] == doc_id


async def test_attach_sends_one_sync_with_items_newest_first(
    settings: Settings, fb: Firebase, subscribe: Any
) -> None:
    await fb.notification("alice", "old", timestamp="2025-09-05 10:11:12.123456")  # str(datetime)
    await fb.notification("alice", "mid", timestamp="2025-09-06T10:11:12.123456")  # naive ISO
    await fb.notification("alice", "new", timestamp=datetime(2025, 9, 7, tzinfo=UTC))  # Timestamp
    await fb.notification("alice", "done", read=True)
    consumer: Consumer = await subscribe("alice")
    async with serving(settings, fb):
        await fb.online("alice")
        await consumer.wait_for(lambda e: len(e) >= 1)
        attach = await consumer.until_sentinel(
            0, lambda: fb.notification("alice", "sentinel-1"), is_add("sentinel-1")
        )
    assert [e["type"] for e in attach] == ["notif.sync"]
    sync = attach[0]
    assert sync["uid"] == "alice" and sync["event_id"]
    assert ids(sync) == ["new", "mid", "old"]
    assert sync["payload"]["count"] == 3
    assert [n["timestamp"] for n in sync["payload"]["notifications"]] == [
        "2025-09-07T00:00:00Z",
        "2025-09-06T10:11:12.123456Z",
        "2025-09-05T10:11:12.123456Z",
    ]
    first = sync["payload"]["notifications"][0]
    assert first["message"] == "new.pdf - completed" and first["url"] == "/edit_form/new"
    assert first["additional_info"] == '{"message": "ok"}' and first["info_message"] == "ok"


async def test_add_update_read_delete_give_the_right_deltas(
    settings: Settings, fb: Firebase, subscribe: Any
) -> None:
    consumer: Consumer = await subscribe("bob")
    async with serving(settings, fb):
        await fb.online("bob")
        await consumer.wait_for(lambda e: len(e) >= 1)
        await fb.notification("bob", "n1")
        await consumer.wait_for(lambda e: any(x["type"] == "notif.add" for x in e))
        await fb.update("clients/bob/notifications/n1", {"status": "error"})
        await consumer.wait_for(lambda e: any(x["type"] == "notif.update" for x in e))
        await fb.notification("bob", "n2")
        await consumer.wait_for(lambda e: len(consumer.of_type("notif.add")) == 2)
        await fb.update("clients/bob/notifications/n1", {"read": True})
        await consumer.wait_for(lambda e: len(consumer.of_type("notif.remove")) == 1)
        await fb.delete("clients/bob/notifications/n2")
        await consumer.wait_for(lambda e: len(consumer.of_type("notif.remove")) == 2)
        events = await consumer.until_sentinel(
            0, lambda: fb.notification("bob", "sentinel-1"), is_add("sentinel-1")
        )
    deltas = [(e["type"], e["payload"]["doc_id"]) for e in events if e["type"] != "notif.sync"]
    assert deltas == [
        ("notif.add", "n1"),
        ("notif.update", "n1"),
        ("notif.add", "n2"),
        ("notif.remove", "n1"),
        ("notif.remove", "n2"),
    ]
    update = next(e["payload"] for e in events if e["type"] == "notif.update")
    assert update["status"] == "error" and update["message"] == "n1.pdf - error"
    # deltas travel alone: the attach's sync is the only one, and seq counts every event
    assert [e["type"] for e in events].count("notif.sync") == 1
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["epoch"] for e in events}) == 1
    assert len({e["event_id"] for e in events}) == len(events)


async def test_sync_each_change_keeps_the_old_behaviour(
    settings: Settings, fb: Firebase, subscribe: Any
) -> None:
    """LISTENERS_SYNC_EACH_CHANGE: a sync after every batch, for consumers not yet migrated."""
    consumer: Consumer = await subscribe("bea")
    async with serving(dataclasses.replace(settings, sync_each_change=True), fb):
        await fb.online("bea")
        await consumer.wait_for(lambda e: len(e) >= 1)
        await fb.notification("bea", "n1")
        events = await consumer.until_sentinel(
            0, lambda: fb.notification("bea", "sentinel-1"), is_add("sentinel-1")
        )
    assert [e["type"] for e in events] == ["notif.sync", "notif.add", "notif.sync"]
    assert ids(events[-1]) == ["n1"]
    assert [e["seq"] for e in events] == [1, 2, 3]


async def test_unauthorized_company_is_never_published(
    settings: Settings, fb: Firebase, subscribe: Any
) -> None:
    await fb.notification("carol", "mine", collection_id="acme")
    await fb.notification("carol", "theirs", collection_id="other")
    consumer: Consumer = await subscribe("carol")
    async with serving(settings, fb):
        await fb.online("carol", companies=["acme"])
        await consumer.wait_for(lambda e: len(e) >= 1)
        start = consumer.mark()
        await fb.notification("carol", "theirs-2", collection_id="other")
        between = await consumer.until_sentinel(
            start, lambda: fb.notification("carol", "mine-2", collection_id="acme"), is_add("mine-2")
        )
        assert between == []
        # a change of the company list applies at once, as a fresh sync
        await fb.online("carol", companies=["acme", "other"])
        await consumer.wait_for(lambda e: len(consumer.doc_ids()) == 4)
    widened = next(i for i, e in enumerate(consumer.events) if e["type"] == "notif.sync" and len(ids(e)) == 4)
    assert "theirs" not in str(consumer.events[:widened])
    assert ids(consumer.events[0]) == ["mine"]
    assert sorted(ids(consumer.events[widened])) == ["mine", "mine-2", "theirs", "theirs-2"]


async def test_offline_user_is_detached_and_silent(settings: Settings, fb: Firebase, subscribe: Any) -> None:
    consumer: Consumer = await subscribe("dave")
    async with serving(settings, fb) as service:
        await fb.online("dave")
        await consumer.wait_for(lambda e: len(e) >= 1)
        await fb.offline("dave")
        await wait_until(lambda: "dave" not in service.node.sessions)
        detached = consumer.mark()
        await fb.notification("dave", "late")
        # back online: attached again with one fresh sync that has the change, and nothing
        # published in between (a watch left open would have sent "late" as an add)
        await fb.online("dave")
        await consumer.wait_for(lambda e: len(e) > detached)
        since = await consumer.until_sentinel(
            detached, lambda: fb.notification("dave", "sentinel-1"), is_add("sentinel-1")
        )
        assert [e["type"] for e in since] == ["notif.sync"]
        assert ids(since[0]) == ["late"]
        await fb.delete("listeners_registry/dave")
        await wait_until(lambda: "dave" not in service.node.sessions)
        await wait_until(lambda: service.source.open_streams == 1)  # the registry's only


async def test_heartbeat_expiry_detaches_without_any_write(settings: Settings, fb: Firebase) -> None:
    ttl = 5  # long enough for the attach to be seen before expiry on a loaded machine
    async with serving(settings, fb) as service:
        before = time.time()
        await fb.online("erin", ttl=ttl)
        await wait_until(lambda: "erin" in service.node.sessions)
        await wait_until(lambda: "erin" not in service.node.sessions, timeout=ttl + 30)
        # the server's heartbeat_at is after `before`, so expiry cannot come sooner than this
        assert time.time() - before >= ttl
        assert service.metrics.detaches.labels("expired")._value.get() == 1
        # heartbeat_at as an ISO string: already expired never attaches, fresh does; frank is
        # written first, so once gus is attached the node has read frank's document too
        await fb.online("frank", ttl=5, heartbeat=iso_ago(60))
        await fb.online("gus", ttl=90, heartbeat=iso_ago(1))
        await wait_until(lambda: "gus" in service.node.sessions)
        assert service.node.entry("frank") is not None
        assert "frank" not in service.node.sessions
        assert service.metrics.attaches._value.get() == 2  # erin and gus: frank not even for a moment


async def test_malformed_registry_documents_are_skipped(
    settings: Settings, fb: Firebase, subscribe: Any, caplog: pytest.LogCaptureFixture
) -> None:
    consumer: Consumer = await subscribe("gina")
    async with serving(settings, fb) as service:
        await fb.set("listeners_registry/bad-status", {"status": 3, "heartbeat_at": iso_ago(0)})
        await fb.set("listeners_registry/bad-heartbeat", {"status": "online", "heartbeat_at": "yesterday"})
        await fb.set(
            "listeners_registry/bad-ttl", {"status": "online", "heartbeat_at": iso_ago(0), "ttl_seconds": "x"}
        )
        await fb.set(
            "listeners_registry/bad-companies",
            {"status": "online", "heartbeat_at": iso_ago(0), "authorized_companies_ids": "acme"},
        )
        await fb.online("gina")  # a string heartbeat would do too; this one is a server timestamp
        await consumer.wait_for(lambda e: len(e) >= 1)
        assert set(service.node.sessions) == {"gina"}
        # more snapshots of the registry must not warn again: once this later write is
        # attached, the node has read every snapshot before it
        await fb.online("sentinel-1")
        await wait_until(lambda: "sentinel-1" in service.node.sessions)
    warnings = [r for r in caplog.records if r.getMessage() == "registry document skipped as malformed"]
    # bad-status is outside the watched query (status == "online"): never read, never served.
    assert sorted(r.uid for r in warnings) == ["bad-companies", "bad-heartbeat", "bad-ttl"]  # type: ignore[attr-defined]


async def test_malformed_notifications_get_defaults(settings: Settings, fb: Firebase, subscribe: Any) -> None:
    await fb.set(
        "clients/hank/notifications/weird",
        {
            "read": False,
            "timestamp": "not a time",
            "file_name": 42,
            "additional_info": "{'message': 'py repr', 'n': 1}",
        },
    )
    await fb.set("clients/hank/notifications/bare", {"read": False})
    consumer: Consumer = await subscribe("hank")
    async with serving(settings, fb):
        await fb.online("hank")
        await consumer.wait_for(lambda e: len(e) >= 1)
    items = {n["doc_id"]: n for n in consumer.events[0]["payload"]["notifications"]}
    assert items["weird"]["file_name"] == "42" and items["weird"]["timestamp"] == ""
    assert items["weird"]["additional_info"] == '{"message": "py repr", "n": 1}'
    assert items["weird"]["info_message"] == "py repr"
    assert items["bare"]["file_name"] == "Document" and items["bare"]["status"] == "info"
    assert items["bare"]["additional_info"] == "{}" and items["bare"]["job_id"] == "bare"


async def test_redis_outage_then_consumer_converges(
    settings: Settings, fb: Firebase, subscribe: Any, redis_server: Any
) -> None:
    consumer: Consumer = await subscribe("ivan")
    async with serving(settings, fb) as service:
        await fb.online("ivan")
        await consumer.wait_for(lambda e: len(e) >= 1)  # the watch is set up: changes reach it
        await fb.notification("ivan", "before")
        await consumer.wait_for(lambda e: consumer.doc_ids() == ["before"])
        redis_server.stop()
        await wait_until(lambda: not service.publisher.up)
        assert service.health()["status"] == "degraded" and service.health()["redis"] == "down"
        dropped = service.metrics.publish_failures._value.get()
        await fb.notification("ivan", "during")
        await fb.update("clients/ivan/notifications/before", {"read": True})
        # both changes seen and dropped: "during" is an add, the read a remove
        await wait_until(lambda: service.metrics.publish_failures._value.get() - dropped >= 2)
        redis_server.start()
        await consumer.wait_for(lambda e: consumer.doc_ids() == ["during"])
        assert not any(is_add("during")(e) for e in consumer.events)  # it came by the resync
        assert service.health()["status"] == "ok"
        assert service.metrics.redis_reconnects._value.get() >= 1


async def test_dead_watch_is_replaced_with_a_fresh_sync(
    settings: Settings, fb: Firebase, subscribe: Any
) -> None:
    consumer: Consumer = await subscribe("judy")
    async with serving(settings, fb) as service:
        await fb.online("judy")
        await consumer.wait_for(lambda e: len(e) >= 1)
        stream: Any = service.node.sessions["judy"].streams[0]
        watch = stream._watch
        if isinstance(watch, ListenWatch):
            # the server's REMOVE with a cause: this target's own error ends its watch
            watch.failed(TargetError(13, "ended by the test"))
        else:
            # end the SDK's stream underneath us, as a terminal gRPC error would
            await asyncio.to_thread(watch._sdk_watch.close)
        await fb.notification("judy", "after")
        await consumer.wait_for(lambda e: len(consumer.of_type("notif.sync")) >= 2)  # the replacement's
        # "after" may have been written while the new watch was set up, which the emulator can
        # miss: a later change shows the whole set all the same
        await fb.notification("judy", "after-2")
        await consumer.wait_for(lambda e: sorted(consumer.doc_ids()) == ["after", "after-2"])


async def test_streams_are_spread_over_connections(settings: Settings, fb: Firebase) -> None:
    limited = Settings(
        redis=settings.redis,
        firebase=settings.firebase,
        sweep_interval_seconds=0.2,
        max_streams_per_connection=2,
        firestore_source="sdk",  # the Listen source's pool: tests/test_listen_source.py
    )
    async with serving(limited, fb) as service:
        for uid in ("u1", "u2", "u3", "u4"):
            await fb.online(uid)
        await wait_until(lambda: len(service.node.sessions) == 4)
        source: Any = service.source
        assert source.open_streams == 5  # the registry and four users
        assert source.connections == 3
        assert all(p.streams <= 2 for p in source._pool)
