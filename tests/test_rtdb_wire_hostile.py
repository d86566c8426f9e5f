"""The wire client against a server that sends one thing it should not (issue 27, fail per item).

A small server of the wire protocol sends, on its first session, one crafted item among
ordinary answers. Whatever it is, the connection goes on (or starts a new session), the
listens it does not concern sync, and a stream opened afterwards syncs too: one item never
leaves a dead connection behind a healthy-looking client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import websockets
from websockets.asyncio.server import ServerConnection

from listeners.source.rtdb_wire import WireClient

pytestmark = pytest.mark.asyncio

WINDOW = {"orderBy": '"$key"', "limitToLast": "100"}


def push(path: str, data: Any, tag: Any = None, action: str = "d") -> str:
    body: dict[str, Any] = {"p": path.strip("/"), "d": data}
    if tag is not None:
        body["t"] = tag
    return json.dumps({"t": "d", "d": {"a": action, "b": body}})


def answer(request: int, data: Any = None) -> str:
    return json.dumps({"t": "d", "d": {"r": request, "b": {"s": "ok", "d": {} if data is None else data}}})


Crafted = Callable[[int, str, Any], list[str | bytes]]  # (request, path, tag) -> frames before the answer

CRAFTED: dict[str, tuple[Crafted, bool]] = {
    # name: (what the server sends for the first listen of its first session, restarts the session)
    "not UTF-8": (lambda r, p, t: [b"\xff\xfe"], True),
    "nested too deep": (lambda r, p, t: ["[" * 200_000], True),
    "warnings not a list": (lambda r, p, t: [answer(r, {"w": 5})], False),
    "key '--1' in a window": (
        lambda r, p, t: [push(p, {**{f"-N{i:04d}": {"x": i} for i in range(100)}, "--1": {"x": 0}}, t)],
        False,
    ),
    "key '²' in a window": (
        lambda r, p, t: [push(p, {**{f"-N{i:04d}": {"x": i} for i in range(100)}, "²": {"x": 0}}, t)],
        False,
    ),
    "path 3,000 deep": (lambda r, p, t: [push(p + "/" + "/".join(["a"] * 3000), 1)], False),
    "path not a string": (
        lambda r, p, t: [json.dumps({"t": "d", "d": {"a": "d", "b": {"p": 7, "d": 1}}})],
        False,
    ),
    "unknown layer": (lambda r, p, t: [json.dumps({"t": "x", "d": {}})], False),
}


class Server:
    def __init__(self, crafted: Crafted, once: bool) -> None:
        self.crafted = crafted
        self.once = once  # for the first listen only, or for every listen of the first session
        self.sessions = 0
        self.port = 0

    async def handle(self, ws: ServerConnection) -> None:
        self.sessions += 1
        session, sent = self.sessions, False
        hello = {"ts": 1, "v": "5", "h": f"127.0.0.1:{self.port}", "s": f"S{session}"}
        await ws.send(json.dumps({"t": "c", "d": {"t": "h", "d": hello}}))
        async for raw in ws:
            data = json.loads(raw).get("d", {})
            if data.get("a") != "q":
                if "r" in data:
                    await ws.send(answer(data["r"]))
                continue
            request, body = data["r"], data["b"]
            if session == 1 and not (sent and self.once):
                sent = True
                frames = self.crafted(request, body["p"], body.get("t"))
                for frame in frames:
                    await ws.send(frame)
                if any('"r"' in f for f in frames if isinstance(f, str)):
                    continue  # the crafted item was the answer itself
            await ws.send(answer(request))


@contextlib.asynccontextmanager
async def wire(crafted: Crafted, once: bool = True) -> AsyncIterator[tuple[Server, WireClient]]:
    server = Server(crafted, once)
    async with websockets.serve(server.handle, "127.0.0.1", 0) as listening:
        server.port = listening.sockets[0].getsockname()[1]
        client = WireClient(f"http://127.0.0.1:{server.port}", namespace="ns", keepalive=5, idle_timeout=30)
        try:
            yield server, client
        finally:
            await client.aclose()


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("name", list(CRAFTED))
async def test_one_crafted_item_leaves_the_connection_serving(name: str) -> None:
    crafted, restarts = CRAFTED[name]
    async with wire(crafted) as (server, client):
        changes: list[Any] = []
        chat = client.stream("/chats/t1", changes.append, query=WINDOW)
        user = client.stream("/users/u2", changes.append)
        await until(lambda: chat.synced and user.synced)
        assert server.sessions == (2 if restarts else 1), name
        later = client.stream("/users/u3", changes.append)  # the connection still serves
        await until(lambda: later.synced)
        assert not (chat.failed or user.failed or later.failed)
        assert client.degraded_reason is None
        assert all(not c._task.done() for c in client._connections if c._task is not None)


async def test_a_push_one_listen_cannot_apply_fails_that_listen_alone() -> None:
    """A merge whose data is not an object: that listen reads again (its stream fails and is
    restarted by the service), the others and the connection go on."""

    def bad_merge(request: int, path: str, tag: Any) -> list[str | bytes]:
        return [push(path, 5, action="m")] if path.strip("/") == "users/u2" else []

    async with wire(bad_merge, once=False) as (server, client):
        failures: list[str] = []
        first = client.stream("/users/u1", lambda change: None)
        await until(lambda: first.synced)  # its listen took the first, harmless, turn
        second = client.stream("/users/u2", lambda change: None, on_failed=failures.append)
        await until(lambda: second.failed)
        assert "cannot apply" in failures[0]
        third = client.stream("/users/u3", lambda change: None)
        await until(lambda: third.synced)
        assert server.sessions == 1 and not first.failed
