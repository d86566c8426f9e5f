"""The Bridge library against the real service, a real Redis and the emulator."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from google.cloud import firestore

from listeners.bridge import Bridge, Notifications, Presence
from listeners.config import Settings
from listeners.control import resync_request
from listeners.local.processes import RedisServer
from listeners.normalise.notifications import newest_first, normalise_notification
from listeners.service import running
from tests.conftest import CONTROL_TOKEN, Firebase
from tests.test_pipeline import wait_until

pytestmark = pytest.mark.asyncio


class Tab:
    """What a Reflex State's background task does: iterate the bridge into a reducer."""

    def __init__(self, bridge: Bridge, uid: str) -> None:
        self.reducer = Notifications()
        self.event_ids: list[str] = []
        self.items: list[dict[str, Any]] = []
        self._task = asyncio.create_task(self._run(bridge, uid))

    async def _run(self, bridge: Bridge, uid: str) -> None:
        async for event in bridge.events(uid):
            self.event_ids.append(event["event_id"])
            self.items = self.reducer.apply(event)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


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


async def converged(tab: Tab, db: firestore.Client, uid: str, timeout: float = 20.0) -> None:
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
    async with running(settings) as service, presence.online("amy"):
        tab = Tab(Bridge(settings.redis), "amy")
        await wait_until(lambda: "amy" in service.node.sessions)
        await converged(tab, db, "amy")
        await fb.notification("amy", "live")
        await fb.update("clients/amy/notifications/before-1", {"read": True})
        await converged(tab, db, "amy")
        assert [i["doc_id"] for i in tab.items] == ["live", "before-2"]
        assert len(tab.event_ids) == len(set(tab.event_ids))
        await tab.close()


async def test_started_after_the_changes_it_converges(
    settings: Settings, fb: Firebase, presence: Presence, db: firestore.Client
) -> None:
    async with running(settings) as service, presence.online("ben"):
        await wait_until(lambda: "ben" in service.node.sessions)
        await fb.notification("ben", "n1")
        await fb.notification("ben", "n2")
        await asyncio.sleep(0.5)  # published to nobody
        tab = Tab(Bridge(settings.redis), "ben")  # its resync request brings the current state
        await converged(tab, db, "ben")
        assert len(tab.items) == 2
        await tab.close()


async def test_redis_restart_while_changes_happen(
    settings: Settings, fb: Firebase, presence: Presence, db: firestore.Client, redis_server: RedisServer
) -> None:
    async with running(settings) as service, presence.online("cat"):
        tab = Tab(Bridge(settings.redis), "cat")
        await wait_until(lambda: "cat" in service.node.sessions)
        await fb.notification("cat", "a")
        await converged(tab, db, "cat")
        redis_server.stop()
        await fb.notification("cat", "b")
        await fb.update("clients/cat/notifications/a", {"status": "error"})
        await asyncio.sleep(0.5)
        await fb.notification("cat", "c")
        redis_server.start()
        await fb.update("clients/cat/notifications/b", {"read": True})
        await converged(tab, db, "cat", timeout=40)
        assert sorted(i["doc_id"] for i in tab.items) == ["a", "c"]
        assert [i["status"] for i in tab.items if i["doc_id"] == "a"] == ["error"]
        assert len(tab.event_ids) == len(set(tab.event_ids))
        await tab.close()


async def test_two_tabs_keep_the_user_online_until_the_last_leaves(
    settings: Settings, presence: Presence
) -> None:
    async with running(settings) as service:
        first = presence.online("dan")
        second = presence.online("dan")
        await first.__aenter__()
        await second.__aenter__()
        await wait_until(lambda: "dan" in service.node.sessions)
        await first.__aexit__(None, None, None)
        assert presence.sessions("dan") == 1
        await asyncio.sleep(2.5)  # two heartbeats later, still attached
        assert "dan" in service.node.sessions
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
    for raw in (
        b"not json",
        b"[1, 2]",
        json.dumps({**good, "type": "notif.explode"}),
        json.dumps({"type": "notif.add", "uid": "eve"}),
        json.dumps({**good, "uid": "mallory"}),
        json.dumps(good),
        json.dumps(good),  # the same event_id again
    ):
        await client.publish("user:eve", raw)
    await wait_until(lambda: len(received) == 1)
    await asyncio.sleep(0.3)
    assert received == [good]
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event skipped")]
    assert len(skipped) == 5
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await client.aclose()


async def test_forged_resync_requests_are_refused(
    settings: Settings, fb: Firebase, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(settings) as service:
        await fb.online("fay")
        await wait_until(lambda: "fay" in service.node.sessions)
        await asyncio.wait_for(service.control.subscribed.wait(), 10)
        client = aioredis.Redis(port=redis_server.port)
        pubsub = client.pubsub()
        await pubsub.subscribe("user:fay")
        await client.publish("listeners:control", resync_request("wrong-token-wrong-token", "fay"))
        await client.publish("listeners:control", resync_request(CONTROL_TOKEN, "fay", now=0))
        await client.publish("listeners:control", b"{" * 5000)
        await asyncio.sleep(1.0)
        assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5) is None
        await client.publish("listeners:control", resync_request(CONTROL_TOKEN, "fay"))
        message = None
        async with asyncio.timeout(10):
            while message is None:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        assert json.loads(message["data"])["type"] == "notif.sync"
        await pubsub.aclose()
        await client.aclose()
    reasons = sorted(
        getattr(r, "reason", "") for r in caplog.records if r.getMessage() == "control request refused"
    )
    assert reasons == ["bad signature", "request larger than 4096 bytes", "stale or future request"]


async def wait_until_subscribed(client: aioredis.Redis, channel: str) -> None:
    async with asyncio.timeout(10):
        while True:
            counts = dict(await client.pubsub_numsub(channel))
            if counts.get(channel.encode(), 0) > 0:
                return
            await asyncio.sleep(0.05)
