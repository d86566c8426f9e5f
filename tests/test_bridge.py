"""The Bridge library against the real service, a real Redis and the emulator."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from google.cloud import firestore

from listeners.config import Settings
from listeners.normalise.notifications import normalise_notification
from listeners_bridge import Bridge, Notifications, Presence
from listeners_bridge.resync import resync_request
from listeners_bridge.timestamps import newest_first
from listeners_testkit.processes import RedisServer
from tests.conftest import CONTROL_TOKEN, Consumer, Firebase, wait_until
from tests.test_pipeline import serving

pytestmark = pytest.mark.asyncio


class Tab:
    """What a Reflex State's background task does: iterate the bridge into a reducer."""

    def __init__(self, bridge: Bridge, uid: str) -> None:
        self.reducer = Notifications()
        self.events: list[dict[str, Any]] = []  # every event the reducer applied
        self.items: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(bridge, uid))

    async def _run(self, bridge: Bridge, uid: str) -> None:
        async for event in bridge.events(uid):
            self.events.append(event)
            self.items = self.reducer.apply(event)
            self._changed.set()

    def mark(self) -> int:
        return len(self.events)

    async def until_sentinel(
        self, since: int, write: Callable[[], Awaitable[object]], doc_id: str, timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """The events applied after `since` and before the add of `doc_id`, written now.

        The sentinel is written after the changes under test, on the same stream, so it
        arrives after them: a late event falls in between instead of going unseen."""
        await write()
        async with asyncio.timeout(timeout):
            while not any(is_add(e, doc_id) for e in self.events[since:]):
                self._changed.clear()
                await self._changed.wait()
        between = self.events[since:]
        return between[: next(i for i, e in enumerate(between) if is_add(e, doc_id))]

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def is_add(event: dict[str, Any], doc_id: str) -> bool:
    return bool(event["type"] == "notif.add" and event["payload"]["doc_id"] == doc_id)


def deltas(events: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    """How many times each (type, doc_id) delta was applied: a change delivered twice counts 2."""
    return Counter((e["type"], e["payload"]["doc_id"]) for e in events if e["type"] != "notif.sync")


@pytest.fixture
async def presence(project_id: str, emulator: Any) -> AsyncIterator[Presence]:
    db = firestore.AsyncClient(project=project_id)
    yield Presence(db, heartbeat_seconds=1.0, instance_id="reflex-test")
    db.close()


def truth(db: firestore.Client, uid: str, companies: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    docs = db.collection(f"clients/{uid}/notifications").where(
        filter=firestore.FieldFilter("read", "==", False)
    )
    items = [normalise_notification(d.id, d.to_dict()) for d in docs.stream()]
    return [
        dict(i) for i in newest_first(i for i in items if not companies or i["collection_id"] in companies)
    ]


async def converged(tab: Tab, db: firestore.Client, uid: str, timeout: float = 30.0) -> None:
    expected: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                expected = await asyncio.to_thread(truth, db, uid)
                if tab.items == expected:
                    return
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"did not converge: have {tab.items}, want {expected}") from None


async def test_online_user_converges_on_the_firestore_truth(
    settings: Settings, fb: Firebase, presence: Presence, db: firestore.Client
) -> None:
    await fb.notification("amy", "before-1")
    await fb.notification("amy", "before-2", timestamp="2020-01-01 00:00:00")
    async with serving(settings, fb) as service, presence.online("amy"):
        tab = Tab(Bridge(settings.redis), "amy")
        await wait_until(lambda: "amy" in service.node.sessions)
        await converged(tab, db, "amy")
        start = tab.mark()
        await fb.notification("amy", "live")
        await fb.update("clients/amy/notifications/before-1", {"read": True})
        await converged(tab, db, "amy")
        assert [i["doc_id"] for i in tab.items] == ["live", "before-2"]
        between = await tab.until_sentinel(start, lambda: fb.notification("amy", "sentinel-1"), "sentinel-1")
        # each change applied exactly once
        assert deltas(between) == {("notif.add", "live"): 1, ("notif.remove", "before-1"): 1}
        await converged(tab, db, "amy")
        await tab.close()


async def test_started_after_the_changes_it_converges(
    settings: Settings, fb: Firebase, presence: Presence, db: firestore.Client
) -> None:
    async with serving(settings, fb) as service, presence.online("ben"):
        await wait_until(lambda: published(service, "ben", "notif.sync"))  # the attach's sync
        await fb.notification("ben", "n1")
        await fb.notification("ben", "n2")
        # published to nobody
        await wait_until(lambda: all(published(service, "ben", "notif.add", d) for d in ("n1", "n2")))
        tab = Tab(Bridge(settings.redis), "ben")  # its resync request brings the current state
        await converged(tab, db, "ben")
        assert len(tab.items) == 2
        start = tab.mark()
        between = await tab.until_sentinel(start, lambda: fb.notification("ben", "n3"), "n3")
        # n1 and n2 came by the sync alone, never replayed as deltas; n3 applied once
        assert deltas(between) == {}
        assert deltas(tab.events) == {("notif.add", "n3"): 1}
        await converged(tab, db, "ben")
        await tab.close()


async def test_redis_restart_while_changes_happen(
    settings: Settings, fb: Firebase, presence: Presence, db: firestore.Client, redis_server: RedisServer
) -> None:
    async with serving(settings, fb) as service, presence.online("cat"):
        tab = Tab(Bridge(settings.redis), "cat")
        await wait_until(lambda: published(service, "cat", "notif.sync"))  # its watch is set up
        await fb.notification("cat", "a")
        await converged(tab, db, "cat")
        redis_server.stop()
        await fb.notification("cat", "b")
        await fb.update("clients/cat/notifications/a", {"status": "error"})
        await wait_until(lambda: not service.publisher.up)  # changes are being dropped
        await fb.notification("cat", "c")
        redis_server.start()
        await fb.update("clients/cat/notifications/b", {"read": True})
        await converged(tab, db, "cat", timeout=60)
        assert sorted(i["doc_id"] for i in tab.items) == ["a", "c"]
        assert [i["status"] for i in tab.items if i["doc_id"] == "a"] == ["error"]
        start = tab.mark()
        between = await tab.until_sentinel(start, lambda: fb.notification("cat", "sentinel-1"), "sentinel-1")
        assert deltas(between) == {}  # after convergence, syncs at most: nothing stale
        # a change reached the tab as a delta at most once (the rest came in syncs)
        assert max(deltas(tab.events).values()) == 1
        await converged(tab, db, "cat")
        await tab.close()


async def test_two_tabs_keep_the_user_online_until_the_last_leaves(
    settings: Settings, presence: Presence, fb: Firebase, db: firestore.Client
) -> None:
    async with serving(settings, fb) as service:
        first = presence.online("dan")
        second = presence.online("dan")
        await first.__aenter__()
        await second.__aenter__()
        await wait_until(lambda: "dan" in service.node.sessions)
        await first.__aexit__(None, None, None)
        assert presence.sessions("dan") == 1
        # two heartbeats later, still attached
        written = await registry_update_time(db, "dan")
        for _ in range(2):
            written = await next_write(db, "dan", written)
        await fb.online("sentinel-1")  # once attached, the node has read every write before it
        await wait_until(lambda: "sentinel-1" in service.node.sessions)
        assert "dan" in service.node.sessions
        assert service.metrics.attaches._value.get() == 2  # dan never left, even for a moment
        await second.__aexit__(None, None, None)
        await wait_until(lambda: "dan" not in service.node.sessions)


async def test_malformed_events_are_skipped(
    settings: Settings, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = Bridge(settings.redis)
    received: list[dict[str, Any]] = []

    async def consume() -> None:
        async for event in bridge.events("eve"):
            received.append(event)

    task = asyncio.create_task(consume())
    client = aioredis.Redis(port=redis_server.port)
    await wait_until_subscribed(client, "user:eve")
    good = {
        "type": "notif.remove",
        "uid": "eve",
        "event_id": "e1",
        "timestamp": "",
        "payload": {"doc_id": "x"},
    }
    sentinel = {**good, "event_id": "e2", "payload": {"doc_id": "sentinel-1"}}
    for raw in (
        b"not json",
        b"[1, 2]",
        json.dumps({**good, "type": "notif.explode"}),
        json.dumps({"type": "notif.add", "uid": "eve"}),
        json.dumps({**good, "uid": "mallory"}),
        json.dumps(good),
        json.dumps(good),  # the same event_id again
        json.dumps(sentinel),
    ):
        await client.publish("user:eve", raw)
    await wait_until(lambda: sentinel in received)
    assert received == [good, sentinel]
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event skipped")]
    assert len(skipped) == 5
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await client.aclose()


async def test_forged_resync_requests_are_refused(
    settings: Settings,
    fb: Firebase,
    redis_server: RedisServer,
    subscribe: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer: Consumer = await subscribe("fay")
    async with serving(settings, fb) as service:
        await fb.online("fay")
        await consumer.wait_for(lambda e: len(e) >= 1)  # the attach's sync
        await asyncio.wait_for(service.control.subscribed.wait(), 30)
        start = consumer.mark()
        client = aioredis.Redis(port=redis_server.port)
        await client.publish("listeners:control", resync_request("wrong-token-wrong-token", "fay"))
        await client.publish("listeners:control", resync_request(CONTROL_TOKEN, "fay", now=0))
        await client.publish("listeners:control", b"{" * 5000)
        await client.publish("listeners:control", resync_request(CONTROL_TOKEN, "fay"))
        await client.aclose()
        await consumer.wait_for(lambda e: len(e) > start)
        between = await consumer.until_sentinel(
            start,
            lambda: fb.notification("fay", "sentinel-1"),
            lambda e: is_add(e, "sentinel-1"),
        )
        # one answer, to the one genuine request
        assert [e["type"] for e in between] == ["notif.sync"]
    reasons = sorted(
        getattr(r, "reason", "") for r in caplog.records if r.getMessage() == "control request refused"
    )
    assert reasons == ["bad signature", "request larger than 4096 bytes", "stale or future request"]


def published(service: Any, uid: str, kind: str, doc_id: str = "") -> bool:
    """Whether the service has published this event (to whoever listened)."""
    return any(
        r["uid"] == uid and r["type"] == kind and r["doc_id"] == doc_id for r in service.publisher.recent
    )


async def registry_update_time(db: firestore.Client, uid: str) -> Any:
    snapshot = await asyncio.to_thread(db.document(f"listeners_registry/{uid}").get)
    return snapshot.update_time


async def next_write(db: firestore.Client, uid: str, after: Any) -> Any:
    """The update time of the first write of this registry document after `after`."""
    async with asyncio.timeout(30):
        while (written := await registry_update_time(db, uid)) == after:
            await asyncio.sleep(0.1)
    return written


async def wait_until_subscribed(client: aioredis.Redis, channel: str) -> None:
    async with asyncio.timeout(30):
        while True:
            counts = dict(await client.pubsub_numsub(channel))
            if counts.get(channel.encode(), 0) > 0:
                return
            await asyncio.sleep(0.05)
