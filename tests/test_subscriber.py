"""The subscribe side of the broker: the in-memory broker drives the hub and the bridge as
units, and the Redis subscriber notices a connection that stops answering."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from listeners.config import RedisSettings, Secret
from listeners.control import verify
from listeners.deliver.hub import Hub
from listeners.metrics import Metrics
from listeners_bridge import Bridge
from listeners_bridge.broker import MemoryBroker
from listeners_bridge.redis_subscriber import RedisSubscriber
from listeners_testkit.processes import RedisServer

pytestmark = pytest.mark.asyncio

TOKEN = "unit-control-token"


def envelope(uid: str, event_id: str, kind: str = "notif.add") -> bytes:
    payload: dict[str, Any] = {"notifications": []} if kind == "notif.sync" else {"doc_id": event_id}
    message = {"type": kind, "uid": uid, "timestamp": "2025-01-01T00:00:00Z", "event_id": event_id}
    return json.dumps({**message, "payload": payload}).encode()


async def until(predicate: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(coroutine: Any) -> AsyncGenerator[asyncio.Task[None], None]:
    task = asyncio.create_task(coroutine)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_memory_broker_drives_the_hub() -> None:
    broker = MemoryBroker()
    hub = Hub(broker, "unit", Metrics(), resync_retry_seconds=0.2)
    received: list[str] = []
    reconnects: list[int] = []
    hub.on_reconnect("user:u", lambda: reconnects.append(1))
    async with running(hub.run()):
        await until(lambda: hub.connected)
        assert await hub.subscribe("user:u", "u", received.append)
        await broker.publish_many([("user:u", envelope("u", "e1")), ("user:u", envelope("x", "e2"))])
        await broker.publish_many([("user:u", b"not json"), ("user:v", envelope("v", "e3"))])
        await broker.publish_many([("user:u", envelope("u", "e4"))])
        await until(lambda: len(received) == 2)
        # Only the channel's own user's envelopes, in order; junk and other channels dropped.
        assert [json.loads(t)["event_id"] for t in received] == ["e1", "e4"]

        broker.available = False
        await until(lambda: not hub.connected)
        assert not await hub.confirmed("user:u", timeout=1)
        broker.available = True
        await until(lambda: hub.connected)
        assert reconnects == [1]  # the sockets are told, and ask for a resync
        # No sync comes (the request, or the answer, was lost): they are told again...
        await until(lambda: len(reconnects) >= 3)
        assert hub.unsynced == 1
        await broker.publish_many([("user:u", envelope("u", "s1", "notif.sync"))])
        await until(lambda: hub.unsynced == 0)  # ...until a sync arrives on their channel
        asked = len(reconnects)
        await broker.publish_many([("user:u", envelope("u", "e5"))])
        await until(lambda: json.loads(received[-1])["event_id"] == "e5")
        assert len(reconnects) == asked


async def test_the_memory_broker_drives_the_bridge() -> None:
    broker = MemoryBroker()
    settings = RedisSettings(host="unused", control_token=Secret(TOKEN))
    bridge = Bridge(settings, broker=broker, resync_retry_seconds=0.2)
    generator = cast(AsyncGenerator[dict[str, Any], None], bridge.events("u"))
    requests = broker.published["listeners:control"]

    def asked() -> list[str]:
        return [verify(TOKEN, r).uid for r in requests]

    async with contextlib.aclosing(generator) as events:
        first = asyncio.ensure_future(anext(events))
        await until(lambda: asked() == ["u"])  # subscribed, it asks for the current state
        await broker.publish_many([("user:u", envelope("u", "s1", "notif.sync"))])
        assert (await first)["event_id"] == "s1"
        await broker.publish_many(
            [("user:u", envelope("u", "s1", "notif.sync")), ("user:u", envelope("u", "e2"))]
        )
        assert (await anext(events))["event_id"] == "e2"  # the repeated s1 is dropped
        assert asked() == ["u"]  # synced: it asks no more

        broker.available = False  # Redis goes away: what is published meanwhile is lost
        await asyncio.sleep(0)
        broker.available = True
        nxt = asyncio.ensure_future(anext(events))
        await until(lambda: asked() == ["u", "u"])  # so it asks again once back
        await broker.publish_many([("user:u", envelope("u", "s2", "notif.sync"))])
        assert (await nxt)["event_id"] == "s2"
    assert bridge._task is None  # the last iterator gone, the connection is closed


async def test_one_bridge_holds_one_connection_for_every_user(redis_server: RedisServer) -> None:
    settings = RedisSettings(host="127.0.0.1", port=redis_server.port, control_token=Secret(TOKEN))
    bridge = Bridge(settings)
    generators = [cast(AsyncGenerator[dict[str, Any], None], bridge.events(f"u{i}")) for i in range(20)]
    pending = [asyncio.ensure_future(anext(g)) for g in generators]
    async with aioredis.Redis(port=redis_server.port) as client:
        await until(lambda: bridge._subscriber.is_confirmed("user:u19"))
        clients = await client.client_list(_type="pubsub")
        assert len(clients) == 1, clients
        for i in range(20):
            await client.publish(f"user:u{i}", envelope(f"u{i}", "s", "notif.sync"))
        assert [(await p)["uid"] for p in pending] == [f"u{i}" for i in range(20)]
    for generator in generators:
        await generator.aclose()


async def test_the_redis_subscriber_notices_a_server_that_stops_answering(redis_server: RedisServer) -> None:
    """CLIENT PAUSE: the connection stays open and says nothing, as after a silent network cut.
    The heartbeat's missing pong tears it down; once answers come again, it is back."""
    settings = RedisSettings(host="127.0.0.1", port=redis_server.port)
    received: list[bytes] = []
    connects: list[bool] = []
    subscriber = RedisSubscriber(
        settings,
        "unit",
        lambda channel, data: received.append(data),
        heartbeat_seconds=0.3,
        heartbeat_timeout=0.5,
    )
    subscriber.on_connect(connects.append)
    await subscriber.subscribe("unit:channel")
    async with running(subscriber.run()), aioredis.Redis(port=redis_server.port) as client:
        await until(lambda: subscriber.is_confirmed("unit:channel"))
        await client.execute_command("CLIENT", "PAUSE", "3000", "ALL")
        await until(lambda: not subscriber.connected)  # noticed while the server is still silent
        await until(lambda: connects == [False, True] and subscriber.is_confirmed("unit:channel"))
        await client.publish("unit:channel", b"after")
        await until(lambda: received == [b"after"])
