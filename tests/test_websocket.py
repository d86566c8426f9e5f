"""Direct mode over a real WebSocket: the app under uvicorn, real Redis, the emulator, and
tokens signed by a local issuer whose certificates the real verifier fetches over HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvicorn
from google.cloud import firestore
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from listeners.assemble import create_app
from listeners.config import Settings, WebSocketSettings
from listeners.metrics import total
from listeners.process import ProcessHooks
from listeners_testkit.auth import LocalIssuer
from listeners_testkit.processes import RedisServer, free_port
from tests.conftest import Consumer, Firebase, wait_until

pytestmark = pytest.mark.asyncio


def ws_settings(settings: Settings, certs_url: str, **overrides: Any) -> Settings:
    """No clock skew allowed, so a token expires exactly at its `exp`."""
    websocket = dataclasses.replace(WebSocketSettings(certs_url=certs_url, clock_skew_seconds=0), **overrides)
    return dataclasses.replace(settings, websocket=websocket)


@contextlib.asynccontextmanager
async def serving(settings: Settings, **uvicorn_options: Any) -> AsyncIterator[tuple[str, Any]]:
    """The app in this process; a task that cannot be kept alive fails the test (instead of
    the SIGTERM to this process that the real app sends)."""
    fatal: list[str] = []
    # A shutdown that overruns its budget here (a loaded machine) would only be cut: not a failure.
    app = create_app(settings, process=ProcessHooks(stop=fatal.append, exit=lambda status: None, exits=False))
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, lifespan="on", **uvicorn_options
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started)
    try:
        yield f"ws://127.0.0.1:{port}/ws", app
    finally:
        server.should_exit = True
        await task
    assert not fatal, fatal


async def next_event(ws: ClientConnection, kind: str, timeout: float = 30) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            message: dict[str, Any] = json.loads(await ws.recv())
            if message["type"] == kind:
                return message


async def closed_with(ws: ClientConnection, timeout: float = 30) -> int | None:
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    return ws.close_code


class Client:
    """A WebSocket client that keeps every message it receives, in order, so that a test can
    assert on exactly what arrived before a sentinel (as `Consumer.until_sentinel` does)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.received: list[dict[str, Any]] = []
        self._returned: set[int] = set()

    def _first(self, since: int, match: Callable[[dict[str, Any]], bool]) -> int | None:
        found = (i for i in range(since, len(self.received)) if i not in self._returned)
        return next((i for i in found if match(self.received[i])), None)

    async def _receive_until(
        self, since: int, match: Callable[[dict[str, Any]], bool], timeout: float
    ) -> int:
        async with asyncio.timeout(timeout):
            while (index := self._first(since, match)) is None:
                self.received.append(json.loads(await self.ws.recv()))
        return index

    async def next(self, kind: str, timeout: float = 30) -> dict[str, Any]:
        """The first message of this kind not returned yet, whenever it arrived."""
        index = await self._receive_until(0, lambda m: m["type"] == kind, timeout)
        self._returned.add(index)
        return self.received[index]

    def mark(self) -> int:
        return len(self.received)

    async def until_sentinel(
        self,
        since: int,
        write: Callable[[], Awaitable[object]],
        is_sentinel: Callable[[dict[str, Any]], bool],
        timeout: float = 30,
    ) -> list[dict[str, Any]]:
        """The messages received after `since` and before the sentinel's."""
        await write()
        index = await self._receive_until(since, is_sentinel, timeout)
        return self.received[since:index]


@pytest.fixture
def wss(settings: Settings, issuer_and_url: tuple[LocalIssuer, str]) -> Settings:
    return ws_settings(settings, issuer_and_url[1])


async def test_events_of_the_token_user_only(
    wss: Settings, fb: Firebase, issuer: LocalIssuer, subscribe: Any
) -> None:
    await fb.notification("wes", "n1")
    await fb.notification("zoe", "secret")
    zoe: Consumer = await subscribe("zoe")
    async with serving(wss) as (url, _):
        await fb.online("wes")
        await fb.online("zoe")
        async with connect(f"{url}?token={issuer.mint('wes')}") as ws:
            wes = Client(ws)
            assert (await wes.next("auth.ok"))["uid"] == "wes"
            sync = await wes.next("notif.sync")  # the current state comes first
            assert [n["doc_id"] for n in sync["payload"]["notifications"]] == ["n1"]
            await zoe.wait_for(lambda events: any(e["type"] == "notif.sync" for e in events))
            await fb.notification("zoe", "secret-2")
            await zoe.wait_for(lambda events: any(e["payload"].get("doc_id") == "secret-2" for e in events))
            # zoe's event is on Redis already: had the hub taken it for wes, it would reach this
            # socket before the event of wes published after it
            before = await wes.until_sentinel(
                0,
                lambda: fb.notification("wes", "n2"),
                lambda m: m["type"] == "notif.add" and m["payload"]["doc_id"] == "n2",
            )
            assert before and all(m["uid"] == "wes" for m in before)
            assert "secret" not in json.dumps(before)
            added = await wes.next("notif.add")
            assert added["uid"] == "wes" and added["payload"]["doc_id"] == "n2"
            await ws.send(json.dumps({"type": "notif.read", "doc_id": "n1"}))  # the UI marks one read
            await wes.next("notif.read.ok")
            assert (await wes.next("notif.remove"))["payload"] == {"doc_id": "n1"}
            await ws.send(json.dumps({"type": "notif.read", "doc_id": "no-such-doc"}))
            await wes.next("notif.read.failed")


async def test_token_in_the_subprotocol_or_a_first_message(
    settings: Settings, issuer_and_url: Any, wss: Settings, fb: Firebase, issuer: LocalIssuer
) -> None:
    first_message = dataclasses.replace(
        wss, websocket=dataclasses.replace(wss.websocket, first_message_auth_origins=("*",))
    )
    async with serving(first_message) as (url, _):
        await fb.online("yan")
        async with connect(url, subprotocols=["bearer", issuer.mint("yan")]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "bearer"
            await next_event(ws, "notif.sync")
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "auth", "token": issuer.mint("yan")}))
            await next_event(ws, "notif.sync")
    auth_timeout = 1.0  # short, as no token is verified on this server
    impatient = ws_settings(
        settings, issuer_and_url[1], auth_timeout_seconds=auth_timeout, first_message_auth_origins=("*",)
    )
    async with serving(impatient) as (url, _):
        started = time.monotonic()
        async with connect(url) as ws:  # nothing sent: closed when the auth timeout passes
            assert await closed_with(ws) == 4001
        assert time.monotonic() - started >= auth_timeout


def forged(issuer: LocalIssuer, header: dict[str, Any]) -> str:
    good = issuer.mint("u1").split(".")
    head = base64.urlsafe_b64encode(json.dumps({**header, "typ": "JWT"}).encode()).rstrip(b"=").decode()
    return f"{head}.{good[1]}.{good[2] if header.get('alg') != 'none' else ''}"


async def test_each_bad_token_has_its_own_close_code(
    wss: Settings, issuer: LocalIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    cases = {
        "alg none": (forged(issuer, {"alg": "none", "kid": issuer.kid}), 4003),
        "HS256": (forged(issuer, {"alg": "HS256", "kid": issuer.kid}), 4003),
        "garbage": ("not-a-token", 4002),
        "unknown kid": (issuer.mint("u1", header={"kid": "nope"}), 4004),
        "bad signature": (issuer.mint("u1")[:-8] + "AAAAAAAA", 4005),
        "wrong audience": (issuer.mint("u1", aud="another-project"), 4006),
        "wrong issuer": (issuer.mint("u1", iss="https://securetoken.google.com/another"), 4007),
        "expired": (issuer.mint("u1", lifetime=-10), 4008),
        "future iat": (issuer.mint("u1", iat=2_000_000_000, auth_time=2_000_000_000), 4009),
        "no sub": (issuer.mint(""), 4010),
    }
    async with serving(wss) as (url, _):
        for name, (token, code) in cases.items():
            async with connect(f"{url}?token={token}") as ws:
                assert await closed_with(ws) == code, name
    reasons = [
        getattr(r, "reason", "") for r in caplog.records if r.getMessage() == "websocket refused: token"
    ]
    assert len(set(reasons)) == len(cases)


async def test_origin_is_checked_before_the_upgrade(
    settings: Settings, issuer_and_url: Any, issuer: LocalIssuer
) -> None:
    allowed = dataclasses.replace(settings.service, allowed_origins=("https://app.pinnokioagent.com",))
    checked = dataclasses.replace(ws_settings(settings, issuer_and_url[1]), service=allowed)
    async with serving(checked) as (url, _):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{url}?token={issuer.mint('u')}", origin="https://evil.example"):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403
        async with connect(f"{url}?token={issuer.mint('u')}", origin="https://app.pinnokioagent.com") as ws:  # type: ignore[arg-type]
            await next_event(ws, "auth.ok")


async def test_refresh_keeps_the_socket_and_expiry_closes_it(wss: Settings, issuer: LocalIssuer) -> None:
    # Long enough to be verified in time on a loaded machine; both sockets start with it.
    token = issuer.mint("ada", lifetime=5)
    async with (
        serving(wss) as (url, _),
        connect(f"{url}?token={token}") as kept,
        connect(f"{url}?token={token}") as lapsed,
    ):
        expires_at = (await next_event(kept, "auth.ok"))["expires_at"]
        await next_event(lapsed, "auth.ok")
        await kept.send(json.dumps({"type": "auth.refresh", "token": issuer.mint("ada", lifetime=3600)}))
        assert (await next_event(kept, "auth.ok"))["expires_at"] > expires_at
        assert await closed_with(lapsed) == 4011
        assert time.time() >= expires_at  # closed at the expiry, not before
        await kept.send(json.dumps({"type": "ping"}))
        await next_event(kept, "pong")  # still open past the first token's expiry
        await kept.send(json.dumps({"type": "auth.refresh", "token": issuer.mint("eve")}))
        assert await closed_with(kept) == 4017  # a token of another user


async def test_limits(
    settings: Settings, issuer_and_url: Any, issuer: LocalIssuer, redis_server: RedisServer
) -> None:
    limited = ws_settings(
        settings, issuer_and_url[1], max_frame_bytes=1024, messages_per_second=5, max_sockets_per_user=2,
        max_sockets=3, queue_length=5,
    )  # fmt: skip
    async with serving(limited) as (url, app):
        async with connect(f"{url}?token={issuer.mint('big')}") as ws:
            await next_event(ws, "auth.ok")
            await ws.send("x" * 2000)
            assert await closed_with(ws) == 1009
        async with connect(f"{url}?token={issuer.mint('chatty')}") as ws:
            await next_event(ws, "auth.ok")
            for _ in range(30):
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(json.dumps({"type": "ping"}))
            assert await closed_with(ws) == 4015
        # A socket counts until the server is done with it, and these limits count sockets.
        await wait_until(lambda: app.state.gateway.count == 0)
        async with (
            connect(f"{url}?token={issuer.mint('tabs')}") as a,
            connect(f"{url}?token={issuer.mint('tabs')}") as b,
        ):
            await next_event(a, "auth.ok")
            await next_event(b, "auth.ok")
            async with connect(f"{url}?token={issuer.mint('tabs')}") as c:
                assert await closed_with(c) == 4013
            await wait_until(lambda: app.state.gateway.count == 2)
            async with connect(f"{url}?token={issuer.mint('other')}") as d:
                await next_event(d, "auth.ok")
                # The instance is full: refused before the upgrade (issue 28), 503 with Retry-After.
                with pytest.raises(InvalidStatus) as refused:
                    async with connect(f"{url}?token={issuer.mint('fourth')}"):
                        pass
                assert refused.value.response.status_code == 503
                assert refused.value.response.headers["Retry-After"]
        await wait_until(lambda: app.state.gateway.count == 0)
        async with connect(f"{url}?token={issuer.mint('slow')}") as ws:
            await next_event(ws, "auth.ok")
            client = aioredis.Redis(port=redis_server.port)
            async with client.pipeline(transaction=False) as pipe:
                for n in range(2000):  # envelopes of this user: the hub forwards nothing else
                    event = {"type": "notif.remove", "uid": "slow", "event_id": f"e{n}", "timestamp": "t"}
                    pipe.publish("user:slow", json.dumps({**event, "payload": {"doc_id": "x" * 200}}))
                await pipe.execute()
            await client.aclose()
            assert await closed_with(ws) == 4014
        await wait_until(lambda: app.state.gateway.count == 0)  # every socket released


async def test_presence_keeps_the_user_online_while_a_socket_is_open(
    settings: Settings, issuer_and_url: Any, issuer: LocalIssuer, db: firestore.Client
) -> None:
    with_presence = ws_settings(settings, issuer_and_url[1], presence=True)
    registry = db.document("listeners_registry/pam")
    async with serving(with_presence) as (url, app):
        service = app.state.service
        async with connect(f"{url}?token={issuer.mint('pam')}") as first:
            await wait_until(lambda: "pam" in service.node.sessions)
            await next_event(first, "notif.sync")
            async with connect(f"{url}?token={issuer.mint('pam')}") as second:
                await next_event(second, "auth.ok")
            # The server is done with the second socket, its presence included: an offline
            # write, had it left the user, has landed by now.
            await wait_until(lambda: app.state.gateway.count == 1)
            assert (await asyncio.to_thread(registry.get)).get("status") == "online"  # one tab left
            assert "pam" in service.node.sessions
        await wait_until(lambda: "pam" not in service.node.sessions)
        assert (await asyncio.to_thread(registry.get)).get("status") == "offline"


async def test_dead_peers_are_closed(
    wss: Settings, issuer: LocalIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="listeners.deliver.websocket")

    def logged(message: str) -> bool:
        return any(r.getMessage() == message and getattr(r, "uid", "") == "ghost" for r in caplog.records)

    async with serving(wss, ws_ping_interval=0.3, ws_ping_timeout=0.3) as (url, app):
        port = int(url.split(":")[2].split("/")[0])
        raw = socket.create_connection(("127.0.0.1", port))
        key = base64.b64encode(b"0123456789abcdef").decode()
        raw.sendall(
            f"GET /ws?token={issuer.mint('ghost')} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        await asyncio.to_thread(raw.recv, 1024)  # the 101; from now on it never answers a ping
        await wait_until(lambda: logged("websocket open"))
        await wait_until(lambda: logged("websocket closed") and app.state.gateway.count == 0)
        raw.close()


async def test_redis_restart_resyncs_open_sockets(
    wss: Settings, fb: Firebase, issuer: LocalIssuer, redis_server: RedisServer
) -> None:
    async with serving(wss) as (url, app):
        failures = app.state.service.metrics.publish_failures
        await fb.online("rae")
        async with connect(f"{url}?token={issuer.mint('rae')}") as ws:
            await next_event(ws, "notif.sync")
            redis_server.stop()
            await fb.notification("rae", "during")
            # dropped, not merely late: only the resync after Redis is back can bring it
            await wait_until(lambda: total(failures) > 0)
            redis_server.start()
            async with asyncio.timeout(30):
                while True:
                    sync = await next_event(ws, "notif.sync", timeout=30)
                    if [n["doc_id"] for n in sync["payload"]["notifications"]] == ["during"]:
                        break


async def test_a_resync_message_brings_fresh_syncs_in_the_same_epoch(
    wss: Settings, fb: Firebase, issuer: LocalIssuer
) -> None:
    """A browser that saw a gap sends `resync`: the next sync carries the state, with a seq
    past everything it had, in the epoch it follows."""
    await fb.notification("rex", "n1")
    async with serving(wss) as (url, _):
        await fb.online("rex")
        async with connect(f"{url}?token={issuer.mint('rex')}") as ws:
            first = await next_event(ws, "notif.sync")
            await fb.notification("rex", "n2")
            added = await next_event(ws, "notif.add")
            assert added["epoch"] == first["epoch"] and added["seq"] > first["seq"]
            await ws.send(json.dumps({"type": "resync"}))
            again = await next_event(ws, "notif.sync")
            assert again["epoch"] == first["epoch"] and again["seq"] > added["seq"]
            assert sorted(n["doc_id"] for n in again["payload"]["notifications"]) == ["n1", "n2"]
