"""Direct mode's security controls, over a real WebSocket against the served app: chat fails
closed, the hub survives and filters what Redis carries, unauthenticated sockets are capped
(docs/websocket.md, docs/security.md)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from listeners.config import Settings
from listeners.deliver.hub import Hub
from listeners.metrics import Metrics
from listeners.source.rtdb import RtdbClient
from listeners_bridge.redis import RedisBroker
from listeners_testkit.auth import LocalIssuer
from listeners_testkit.processes import RedisServer
from tests.conftest import Firebase, wait_until
from tests.test_rtdb_streams import chat_message, ns, rtdb, rtdb_settings, standin  # noqa: F401
from tests.test_websocket import closed_with, next_event, serving
from tests.test_websocket import ws_settings as _ws_settings

pytestmark = pytest.mark.asyncio

THREAD = {"space_code": "acme", "thread_key": "j1", "mode": "job_chats"}
ANSWERS = ("chat.subscribed", "chat.refused", "error")


def ws_settings(settings: Settings, certs_url: str, **overrides: Any) -> Settings:
    """tests.test_websocket's settings (1 s to authenticate), with any field overridden."""
    base = _ws_settings(settings, certs_url)
    return dataclasses.replace(base, websocket=dataclasses.replace(base.websocket, **overrides))


def subscribe(thread: dict[str, str], kind: str = "chat.subscribe") -> str:
    return json.dumps({"type": kind, **thread})


async def answer(
    ws: ClientConnection, kinds: tuple[str, ...] = ANSWERS, timeout: float = 30
) -> dict[str, Any]:
    """The next message of one of these types (events in between are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            message: dict[str, Any] = json.loads(await ws.recv())
            if message["type"] in kinds:
                return message


async def registry_threads(fb: Firebase, uid: str) -> list[dict[str, str]]:
    snapshot = await asyncio.to_thread(fb.db.document(f"listeners_registry/{uid}").get)
    return list((snapshot.to_dict() or {}).get("chat_threads") or [])


async def entry_has(app: Any, uid: str, companies: set[str]) -> None:
    """Until the node has read this registry entry (chat decisions are made from it)."""
    node = app.state.service.node
    await wait_until(
        lambda: (e := node.entry(uid)) is not None and e.authorized_companies_ids == companies, timeout=30
    )


def rejected(app: Any, source: str) -> float:
    metrics: Metrics = app.state.service.metrics
    return metrics.registry.get_sample_value("listeners_rejected_inputs_total", {"source": source}) or 0.0


@contextlib.asynccontextmanager
async def redis_client(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host="127.0.0.1", port=server.port)
    try:
        yield client
    finally:
        await client.aclose()


async def subscribers(client: aioredis.Redis, channel: str, count: int = 1) -> None:
    """Until Redis has `count` subscribers on the channel (the hub's SUBSCRIBE has landed)."""
    async with asyncio.timeout(30):
        while (await client.pubsub_numsub(channel))[0][1] < count:
            await asyncio.sleep(0.05)


def envelope(uid: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": "notif.add",
        "uid": uid,
        "timestamp": "2025-01-01T00:00:00Z",
        "event_id": "e-1",
        "payload": {"doc_id": "d1"},
        **fields,
    }


# -- 1. chat fails closed ----------------------------------------------------------


async def test_chat_needs_a_registry_entry_that_names_the_company(
    rtdb_settings: Settings,  # noqa: F811
    fb: Firebase,
    rtdb: RtdbClient,  # noqa: F811
    issuer: LocalIssuer,
    issuer_and_url: Any,
) -> None:
    await rtdb.set("acme/job_chats/j1/messages/-m1", chat_message(1))
    settings = ws_settings(rtdb_settings, issuer_and_url[1])
    async with serving(settings) as (url, app), connect(f"{url}?token={issuer.mint('nia')}") as ws:
        await next_event(ws, "auth.ok")
        # no registry entry at all
        await ws.send(subscribe(THREAD))
        refused = await answer(ws)
        assert refused["type"] == "chat.refused" and refused["space_code"] == "acme", refused
        assert refused["reason"]
        # an entry with no companies (what Direct mode's presence writes): no chat, never every chat
        await fb.online("nia")
        await entry_has(app, "nia", set())
        await ws.send(subscribe(THREAD))
        assert (await answer(ws))["type"] == "chat.refused"
        # another company only
        await fb.online("nia", companies=["globex"])
        await entry_has(app, "nia", {"globex"})
        await ws.send(subscribe(THREAD))
        assert (await answer(ws))["type"] == "chat.refused"
        assert await registry_threads(fb, "nia") == []  # nothing was set up for a refusal
        # the company: answered once the thread is in the registry (and the hub subscribed)
        await fb.online("nia", companies=["acme"])
        await entry_has(app, "nia", {"acme"})
        await ws.send(subscribe(THREAD))
        # the answer comes before any of the thread's events, however fast its stream starts
        assert (await answer(ws, (*ANSWERS, "chat.sync", "chat.message")))["type"] == "chat.subscribed"
        assert await registry_threads(fb, "nia") == [THREAD]
        assert app.state.gateway.services.hub.is_confirmed("chat:nia:acme:j1")
        sync = await next_event(ws, "chat.sync", timeout=30)
        assert [m["id"] for m in sync["payload"]["raw_messages"]] == ["-m1"]
        # the company is taken away: a new subscribe is refused and drops the thread
        await fb.update("listeners_registry/nia", {"authorized_companies_ids": ["globex"]})
        await entry_has(app, "nia", {"globex"})
        await ws.send(subscribe(THREAD))
        assert (await answer(ws))["type"] == "chat.refused"
        await wait_until(lambda: not app.state.gateway.threads_of("nia"))


async def test_presence_entries_carry_no_companies_so_no_chat(
    rtdb_settings: Settings,  # noqa: F811
    fb: Firebase,
    issuer: LocalIssuer,
    issuer_and_url: Any,
) -> None:
    settings = ws_settings(rtdb_settings, issuer_and_url[1], presence=True)
    async with serving(settings) as (url, app), connect(f"{url}?token={issuer.mint('pia')}") as ws:
        await next_event(ws, "auth.ok")
        await entry_has(app, "pia", set())  # written by the service's own presence
        await ws.send(subscribe(THREAD))
        assert (await answer(ws))["type"] == "chat.refused"
        # the web app names the user's companies: now the thread is served, and written
        await fb.update("listeners_registry/pia", {"authorized_companies_ids": ["acme"]})
        await entry_has(app, "pia", {"acme"})
        await ws.send(subscribe(THREAD))
        assert (await answer(ws))["type"] == "chat.subscribed"
        assert await registry_threads(fb, "pia") == [THREAD]


async def test_threads_per_user_and_subscribes_per_second_are_capped(
    rtdb_settings: Settings,  # noqa: F811
    fb: Firebase,
    issuer: LocalIssuer,
    issuer_and_url: Any,
) -> None:
    capped = ws_settings(
        rtdb_settings, issuer_and_url[1], max_threads_per_user=2, chat_subscribes_per_second=50
    )
    async with serving(capped) as (url, app):
        await fb.online("cap", companies=["acme"])
        await entry_has(app, "cap", {"acme"})
        j = [{**THREAD, "thread_key": f"j{n}"} for n in range(4)]
        async with (
            connect(f"{url}?token={issuer.mint('cap')}") as a,
            connect(f"{url}?token={issuer.mint('cap')}") as b,
        ):
            await next_event(a, "auth.ok")
            await next_event(b, "auth.ok")
            for thread in j[:2]:
                await a.send(subscribe(thread))
                assert (await answer(a))["type"] == "chat.subscribed"
            await a.send(subscribe(j[2]))
            full = await answer(a)
            assert full["type"] == "chat.refused" and "threads" in full["reason"], full
            await b.send(subscribe(j[2]))  # the cap is the user's, whichever socket asks
            assert (await answer(b))["type"] == "chat.refused"
            await b.send(subscribe(j[0]))  # a thread the user already has is no new one
            assert (await answer(b))["type"] == "chat.subscribed"
            await a.send(subscribe(j[1], "chat.unsubscribe"))
            await answer(a, ("chat.unsubscribed",))
            await b.send(subscribe(j[2]))
            assert (await answer(b))["type"] == "chat.subscribed"
    rated = ws_settings(rtdb_settings, issuer_and_url[1], chat_subscribes_per_second=0.1)
    async with serving(rated) as (url, app):
        await fb.online("fast", companies=["acme"])
        await entry_has(app, "fast", {"acme"})
        async with connect(f"{url}?token={issuer.mint('fast')}") as ws:
            await next_event(ws, "auth.ok")
            answers = []
            for thread in j:
                await ws.send(subscribe(thread))
                answers.append(await answer(ws))
            assert answers[0]["type"] == "chat.subscribed"
            assert [a["type"] for a in answers[1:]] == ["chat.refused"] * 3
            assert all("chat.subscribe" in a["reason"] for a in answers[1:])
            await ws.send(json.dumps({"type": "ping"}))  # other messages are not held back
            await next_event(ws, "pong")
            assert await registry_threads(fb, "fast") == [j[0]]


async def test_chat_is_refused_while_the_hub_has_no_redis(
    rtdb_settings: Settings,  # noqa: F811
    fb: Firebase,
    issuer: LocalIssuer,
    issuer_and_url: Any,
    redis_server: RedisServer,
) -> None:
    settings = ws_settings(rtdb_settings, issuer_and_url[1])
    async with serving(settings) as (url, app):
        hub = app.state.gateway.services.hub
        await fb.online("ria", companies=["acme"])
        await entry_has(app, "ria", {"acme"})
        async with connect(f"{url}?token={issuer.mint('ria')}") as ws:
            await next_event(ws, "auth.ok")
            await asyncio.to_thread(redis_server.stop)
            try:
                await wait_until(lambda: not hub.connected, timeout=30)
                await ws.send(subscribe(THREAD))
                refused = await answer(ws)
                assert refused["type"] == "chat.refused" and refused["reason"], refused
                assert await registry_threads(fb, "ria") == []  # nothing half set up
            finally:
                await asyncio.to_thread(redis_server.start)
            await wait_until(lambda: hub.connected, timeout=60)
            await ws.send(subscribe(THREAD))
            assert (await answer(ws))["type"] == "chat.subscribed"


async def test_thread_parts_and_uids_must_be_keys(
    rtdb_settings: Settings,  # noqa: F811
    fb: Firebase,
    issuer: LocalIssuer,
    issuer_and_url: Any,
    redis_server: RedisServer,
) -> None:
    settings = ws_settings(rtdb_settings, issuer_and_url[1])
    async with serving(settings) as (url, app):
        await fb.online("kay", companies=["acme", "a:b"])
        await entry_has(app, "kay", {"acme", "a:b"})
        async with connect(f"{url}?token={issuer.mint('kay')}") as ws:
            await next_event(ws, "auth.ok")
            for part, bad in (
                ("space_code", "a:b"),
                ("thread_key", "x:y"),
                ("thread_key", "\ud800"),
                ("thread_key", "tab\there"),
                ("thread_key", "\u202e"),
                ("thread_key", "a/b"),
            ):
                # json.dumps writes a lone surrogate as the escape \ud800, which is valid JSON
                await ws.send(json.dumps({"type": "chat.subscribe", **THREAD, part: bad}))
                assert (await answer(ws))["type"] in ("error", "chat.refused"), (part, bad)
        # a token whose uid cannot stand in `chat:{uid}:…` or a database path is closed with 4012
        for uid in ("a:b", "a/b", "dot.ted", "tab\there", "\u202e", "\ud800"):
            async with connect(f"{url}?token={issuer.mint(uid)}") as ws:
                assert await closed_with(ws, timeout=30) == 4012, repr(uid)
        assert rejected(app, "websocket") >= 6
        # nothing of those sockets is left in the hub: it comes back from a Redis restart and delivers
        hub = app.state.gateway.services.hub
        await asyncio.to_thread(redis_server.stop)
        await wait_until(lambda: not hub.connected, timeout=30)
        await asyncio.to_thread(redis_server.start)
        await wait_until(lambda: hub.connected, timeout=60)
        async with connect(f"{url}?token={issuer.mint('kay')}") as ws, redis_client(redis_server) as client:
            await next_event(ws, "auth.ok")
            await subscribers(client, "user:kay")
            text = json.dumps(envelope("kay"))
            await client.publish("user:kay", text)
            async with asyncio.timeout(30):
                while await ws.recv() != text:
                    pass
        assert not any(app.state.service.supervisor.restarts.values())


# -- 2. the hub survives any one message and forwards only envelopes ----------------


async def test_hub_forwards_only_envelopes_of_the_sockets_own_user(
    settings: Settings, issuer: LocalIssuer, issuer_and_url: Any, redis_server: RedisServer
) -> None:
    small = ws_settings(settings, issuer_and_url[1], max_event_bytes=4096)
    deep: Any = "x"
    for _ in range(100):
        deep = [deep]
    junk: list[bytes] = [
        b"\xff\xfe not utf-8 {",  # used to stop the hub (data.decode raised)
        b"not json",
        b"[1, 2]",
        b'"a string"',
        json.dumps({"type": "notif.add"}).encode(),  # no uid, event_id, payload
        json.dumps(envelope("zoe")).encode(),  # another user's envelope on hal's channel
        json.dumps(envelope("hal", payload="text")).encode(),
        json.dumps(envelope("hal", event_id="")).encode(),
        json.dumps(envelope("hal", type=7)).encode(),
        json.dumps(envelope("hal", payload={"pad": "x" * 5000})).encode(),  # larger than 4096
        json.dumps(envelope("hal", payload={"deep": deep})).encode(),
        json.dumps(envelope("hal", payload={"s": "\ud800"})).encode(),  # a lone surrogate escape
    ]
    # forwarded exactly as published: spacing and key order are kept, nothing is re-serialised
    good = (
        '{"payload": {"doc_id": "d1"},  "uid": "hal", "type": "notif.add", "event_id": "e-9",'
        ' "timestamp": "t"}'
    )
    async with serving(small) as (url, app), redis_client(redis_server) as client:
        async with (
            connect(f"{url}?token={issuer.mint('hal')}") as first,
            connect(f"{url}?token={issuer.mint('hal')}") as second,
        ):
            await next_event(first, "auth.ok")
            await next_event(second, "auth.ok")
            await subscribers(client, "user:hal")
            before = rejected(app, "hub")
            for item in junk:
                await client.publish("user:hal", item)
            await client.publish("user:hal", good)
            for ws in (first, second):
                received: list[str] = []
                async with asyncio.timeout(30):
                    while (text := str(await ws.recv())) != good:
                        received.append(text)
                assert received == [], received  # every junk item came before `good`: none got through
            assert rejected(app, "hub") - before == len(junk)
            await client.publish("user:hal", good)  # the hub is still running
            assert await first.recv() == good
        assert app.state.gateway.services.hub.connected
        assert not any(app.state.service.supervisor.restarts.values())


async def test_hub_refuses_channels_redis_cannot_carry_and_survives_reconnects(
    settings: Settings, redis_server: RedisServer
) -> None:
    """The same guard at the hub's own interface: a channel name with a lone surrogate used to
    stop the hub when it resubscribed after a reconnect."""
    metrics = Metrics()
    hub = Hub(RedisBroker(settings.redis), "unit", metrics)
    received: list[str] = []
    task = asyncio.create_task(hub.run())
    try:
        await wait_until(lambda: hub.connected, timeout=30)
        await asyncio.to_thread(redis_server.stop)
        await wait_until(lambda: not hub.connected, timeout=30)
        assert not await hub.subscribe("chat:u:s:\ud800", "u", received.append)
        assert await hub.subscribe("user:u", "u", received.append)
        await asyncio.to_thread(redis_server.start)
        await wait_until(lambda: hub.connected, timeout=60)
        assert await hub.confirmed("user:u", timeout=30)
        text = json.dumps(envelope("u"))
        async with redis_client(redis_server) as client:
            await client.publish("user:u", text)
            await wait_until(lambda: received == [text], timeout=30)
        assert not task.done()
        assert (
            metrics.registry.get_sample_value("listeners_rejected_inputs_total", {"source": "hub"}) or 0
        ) >= 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- 3. sockets that have not authenticated yet -----------------------------------


async def test_unauthenticated_sockets_have_their_own_cap(
    settings: Settings, issuer: LocalIssuer, issuer_and_url: Any
) -> None:
    limited = ws_settings(
        settings, issuer_and_url[1], auth_timeout_seconds=60, unauthenticated_timeout_seconds=60,
        max_unauthenticated_sockets=2, max_sockets=1, first_message_auth_origins=("*",),
    )  # fmt: skip
    async with serving(limited) as (url, app):
        gateway = app.state.gateway
        async with connect(url) as silent:  # accepted, never sends a token
            async with connect(url) as other:
                await wait_until(lambda: gateway.count == 2)
                # refused before the upgrade now (tests.test_websocket_admission): HTTP 503
                assert await refused_with(url) == 503
                assert other.close_code is None
            await wait_until(lambda: gateway.count == 1)
            # one socket still authenticating does not count against the authenticated cap
            async with connect(f"{url}?token={issuer.mint('ann')}") as ann:
                assert (await next_event(ann, "auth.ok"))["uid"] == "ann"
                assert await refused_with(f"{url}?token={issuer.mint('bob')}") == 503  # that cap is 1
            assert silent.close_code is None
        await wait_until(lambda: gateway.count == 0)


async def refused_with(url: str) -> int:
    """The HTTP status of an upgrade refused before the handshake (with `Retry-After`)."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, open_timeout=30):
            pass
    response = refused.value.response
    assert "Sec-WebSocket-Accept" not in response.headers
    assert int(response.headers["Retry-After"]) > 0
    return response.status_code


async def test_unauthenticated_sockets_have_a_shorter_deadline(
    settings: Settings, issuer: LocalIssuer, issuer_and_url: Any
) -> None:
    deadline = ws_settings(
        settings, issuer_and_url[1], auth_timeout_seconds=60, unauthenticated_timeout_seconds=1,
        first_message_auth_origins=("*",),
    )  # fmt: skip
    async with serving(deadline) as (url, _):
        async with connect(url) as silent:
            started = time.monotonic()
            assert await closed_with(silent, timeout=40) == 4001
            assert time.monotonic() - started < 30  # the 60 s auth timeout did not apply
        async with connect(url) as ws:  # a prompt `auth` message is still fine
            await ws.send(json.dumps({"type": "auth", "token": issuer.mint("amy")}))
            await next_event(ws, "auth.ok")
