"""The Realtime Database client against the local stand-in, over real HTTP.

The stand-in runs as a child process on a free port (one shared by most tests, each test
in its own namespace; tests that stop it or need other settings start their own).
Expected trees are written out literally and checked against a fresh GET as well, so the
client's mirror and the stand-in's store are checked against each other.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.auth.credentials import Credentials

from listeners.source.rtdb import (
    SCOPES,
    EventTooLarge,
    NodeMirror,
    RtdbClient,
    RtdbError,
    ServiceAccountTokens,
    SseEvent,
    SseParser,
)
from listeners.source.rtdb import client as client_module
from listeners_bridge.backoff import Backoff
from listeners_testkit.rtdb_server import RtdbStandin
from tests.conftest import wait_until

FAST = Backoff(base=0.05, cap=0.5)


@pytest.fixture(scope="session")
def standin() -> Iterator[RtdbStandin]:
    with RtdbStandin(keepalive=0.2) as server:
        yield server


@pytest.fixture
def ns() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def client(standin: RtdbStandin, ns: str) -> AsyncIterator[RtdbClient]:
    rtdb = RtdbClient(standin.url, namespace=ns)
    yield rtdb
    await rtdb.aclose()


@pytest.fixture
def own_standin() -> Iterator[Callable[..., RtdbStandin]]:
    started: list[RtdbStandin] = []

    def make(**kwargs: Any) -> RtdbStandin:
        server = RtdbStandin(**kwargs)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
        server.cleanup()


class Mirror:
    """Records every tree a stream hands out, with a deep copy taken at that moment."""

    def __init__(self) -> None:
        self.trees: list[Any] = []
        self.copies: list[Any] = []
        self.failures: list[str] = []

    def on_change(self, tree: Any) -> None:
        self.trees.append(tree)
        self.copies.append(copy.deepcopy(tree))

    def on_failed(self, reason: str) -> None:
        self.failures.append(reason)


async def eventually(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def no_streams(server: RtdbStandin, ns: str | None = None, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while await server.open_streams(ns):
            await asyncio.sleep(0.05)


async def synced(stream: NodeMirror) -> None:
    await eventually(lambda: stream.synced)


async def converges(stream: NodeMirror, client: RtdbClient, expected: Any) -> None:
    await eventually(lambda: stream.tree == expected)
    assert await client.get(stream.path) == expected


class Tokens:
    """A token provider that counts: `token-N`, N going up by one on each refresh."""

    def __init__(self, start: int = 1) -> None:
        self.n = start
        self.calls = 0
        self.refreshes = 0

    async def __call__(self, *, refresh: bool = False) -> str:
        self.calls += 1
        if refresh:
            self.refreshes += 1
            self.n += 1
        return f"token-{self.n}"


# --- the wire format -------------------------------------------------------------------


def test_sse_parser_splits_anywhere_and_accepts_every_line_ending() -> None:
    wire = (
        b"\xef\xbb\xbf: a comment\r\n"
        b'event: put\r\ndata: {"path": "/",\r\ndata:  "data": 1}\r\n\r\n'
        b"event: keep-alive\rdata: null\r\r"
        b'event:patch\ndata:{"path":"/a","data":{}}\n\n'
        b"id: 7\nretry: 10\n\n"
        b"event: cancel\ndata: null\n"
    )
    expected = [
        SseEvent("put", '{"path": "/",\n "data": 1}'),
        SseEvent("keep-alive", "null"),
        SseEvent("patch", '{"path":"/a","data":{}}'),
    ]
    whole = SseParser()
    assert whole.feed(wire) == expected
    assert whole.feed(b"\n") == [SseEvent("cancel", "null")]
    for size in (1, 2, 3, 7):
        parser = SseParser()
        events = []
        for i in range(0, len(wire), size):
            events += parser.feed(wire[i : i + size])
        assert events == expected


def test_sse_parser_rejects_an_event_over_the_bound_before_it_ends() -> None:
    parser = SseParser(max_event_bytes=1000)
    parser.feed(b"event: put\ndata: " + b"x" * 900)
    with pytest.raises(EventTooLarge):
        parser.feed(b"x" * 200)  # no line end yet: the partial line counts
    parser = SseParser(max_event_bytes=1000)
    with pytest.raises(EventTooLarge):
        for _ in range(20):
            parser.feed(b"data: " + b"y" * 90 + b"\n")  # many short lines of one event


# --- REST ------------------------------------------------------------------------------


async def test_rest_get_set_update_push_delete(client: RtdbClient) -> None:
    assert await client.get("/nothing") is None
    await client.set("/users/u1", {"name": "Ada", "tags": ["a", "b", "c"]})
    await client.update("/users", {"u1/age": 36, "u2": {"name": "Bob"}})
    key = await client.push("/users/u1/inbox", {"text": "hi"})
    assert len(key) == 20
    assert await client.get("/users") == {
        "u1": {"name": "Ada", "tags": ["a", "b", "c"], "age": 36, "inbox": {key: {"text": "hi"}}},
        "u2": {"name": "Bob"},
    }
    assert await client.get("/users", shallow=True) == {"u1": True, "u2": True}
    await client.delete("/users/u1")
    assert await client.get("/users") == {"u2": {"name": "Bob"}}
    with pytest.raises(ValueError):
        await client.set("/bad.key", 1)
    with pytest.raises(RtdbError) as error:
        await client.set("/x", {"a.b": 1})  # the server refuses the key
    assert error.value.status == 400


async def test_rest_token_is_required_and_refreshed_on_401(own_standin: Callable[..., RtdbStandin]) -> None:
    server = own_standin(token="token-2")
    bare = RtdbClient(server.url, namespace="n")
    with pytest.raises(RtdbError) as error:
        await bare.get("/")
    assert error.value.status == 401
    await bare.aclose()
    tokens = Tokens(start=1)  # stale: the server wants token-2
    rtdb = RtdbClient(f"{server.url}/?ns=n", tokens=tokens)
    await rtdb.set("/a", 1)
    assert await rtdb.get("/a") == 1
    assert tokens.refreshes == 1
    await rtdb.aclose()


# --- streams ---------------------------------------------------------------------------


async def test_initial_full_read(client: RtdbClient) -> None:
    await client.set("/rooms/r1", {"title": "one", "members": {"u1": True, "u2": True}})
    present, absent = Mirror(), Mirror()
    stream = client.stream("/rooms/r1", present.on_change)
    missing = client.stream("/rooms/none", absent.on_change)
    await synced(stream)
    await synced(missing)
    assert present.trees == [{"title": "one", "members": {"u1": True, "u2": True}}]
    assert absent.trees == [None]
    assert stream.active and not stream.failed and stream.reason is None


async def test_put_patch_delete_are_applied_to_the_mirror(client: RtdbClient) -> None:
    mirror = Mirror()
    stream = client.stream("/inbox", mirror.on_change)
    await synced(stream)
    await client.set("/inbox/n1", {"t": 1})
    await converges(stream, client, {"n1": {"t": 1}})
    await client.update("/inbox", {"n2": {"t": 2}, "n1/t": 10})  # a multi-path patch
    await converges(stream, client, {"n1": {"t": 10}, "n2": {"t": 2}})
    await client.update("/inbox/n2", {"extra": True})  # a patch below the location
    await converges(stream, client, {"n1": {"t": 10}, "n2": {"t": 2, "extra": True}})
    await client.delete("/inbox/n1")
    await converges(stream, client, {"n2": {"t": 2, "extra": True}})
    await client.set("/inbox/n2/t", None)
    await converges(stream, client, {"n2": {"extra": True}})
    key = await client.push("/inbox", {"t": 3})
    await converges(stream, client, {"n2": {"extra": True}, key: {"t": 3}})
    await client.delete("/inbox/n2/extra")  # the last child goes, and so does its parent
    await converges(stream, client, {key: {"t": 3}})
    await client.delete("/inbox")
    await converges(stream, client, None)

    assert len(mirror.trees) == 1 + 8  # the full read, then one call per write
    assert mirror.trees == mirror.copies  # no tree was changed after it was handed out
    assert mirror.trees[3]["n1"] is mirror.trees[2]["n1"]  # untouched subtrees are shared
    assert mirror.trees[4]["n2"] is mirror.trees[3]["n2"]
    assert stream.reconnects == 0


LAST_3 = {"orderBy": '"$key"', "limitToLast": "3"}


async def test_queries_follow_the_rest_semantics(client: RtdbClient) -> None:
    """https://firebase.google.com/docs/database/rest/retrieve-data#section-rest-filtering"""
    await client.set("/q", {"-a": {"n": 3}, "-b": {"n": 1}, "-c": {"n": 2}, "10": {"n": 0}, "9": {"n": 9}})
    assert await client.get("/q", query=LAST_3) == {"-a": {"n": 3}, "-b": {"n": 1}, "-c": {"n": 2}}
    # keys that are integers sort first, numerically
    first = await client.get("/q", query={"orderBy": '"$key"', "limitToFirst": "2"})
    assert set(first) == {"9", "10"}
    by_child = await client.get("/q", query={"orderBy": '"n"', "limitToLast": "2"})
    assert set(by_child) == {"-a", "9"}
    ranged = await client.get("/q", query={"orderBy": '"n"', "startAt": "1", "endAt": "2"})
    assert set(ranged) == {"-b", "-c"}
    with pytest.raises(RtdbError) as refused:
        await client.get("/q", query={"limitToLast": "2"})
    assert refused.value.status == 400 and "orderBy" in refused.value.message


async def test_a_stream_with_limit_to_last_keeps_its_window(client: RtdbClient) -> None:
    """The mirror holds the last three children only; each event names what it touched."""
    await client.set("/w", {f"k{i}": {"i": i} for i in range(5)})
    mirror = Mirror()
    changed: list[Any] = []

    def on_change(tree: Any) -> None:
        mirror.on_change(tree)
        changed.append(stream.last_changed)

    stream = client.stream("/w", on_change, query=LAST_3)
    await synced(stream)
    assert mirror.trees[-1] == {"k2": {"i": 2}, "k3": {"i": 3}, "k4": {"i": 4}}
    assert changed == [None]  # the first read: the whole node
    await client.set("/w/k5", {"i": 5})  # enters the window and pushes k2 out of it
    await eventually(lambda: stream.tree == {"k3": {"i": 3}, "k4": {"i": 4}, "k5": {"i": 5}})
    assert set().union(*changed[1:]) == {"k2", "k5"}
    await client.update("/w/k4", {"read": True})  # a change inside the window
    await eventually(lambda: stream.tree["k4"] == {"i": 4, "read": True})
    assert changed[-1] == frozenset({"k4"})
    await client.set("/w/k0", {"i": 0, "again": True})  # outside the window: nothing at all
    await client.set("/w/k6", {"i": 6})
    await eventually(lambda: "k6" in stream.tree)
    assert len(stream.tree) == 3 and all(c is not None and "k0" not in c for c in changed[1:])
    await stream.close()


async def test_writes_above_the_watched_path(client: RtdbClient) -> None:
    mirror = Mirror()
    stream = client.stream("/users/u1/notifications", mirror.on_change)
    await synced(stream)
    await client.set("/users", {"u1": {"notifications": {"a": 1}}, "u2": {"notifications": {"b": 2}}})
    await converges(stream, client, {"a": 1})
    await client.update("/users", {"u1/notifications/c": 3, "u2/name": "Bob"})
    await converges(stream, client, {"a": 1, "c": 3})
    calls = len(mirror.trees)
    await client.set("/users/u2", {"name": "Eve"})  # beside the location: no event
    await client.update("/", {"users/u1/notifications/a": None})
    await converges(stream, client, {"c": 3})
    assert len(mirror.trees) == calls + 1
    await client.set("/", {"users": {"u1": {"notifications": {"z": 26}}}})
    await converges(stream, client, {"z": 26})
    await client.delete("/users")
    await converges(stream, client, None)


async def test_lists_stay_as_the_server_sends_them(client: RtdbClient) -> None:
    stream = client.stream("/doc", lambda tree: None)
    await synced(stream)
    await client.set("/doc", {"tags": ["a", "b", "c"]})
    await converges(stream, client, {"tags": ["a", "b", "c"]})
    await client.set("/doc/tags/1", None)
    await converges(stream, client, {"tags": ["a", None, "c"]})
    await client.set("/doc/tags/3", "d")
    await converges(stream, client, {"tags": ["a", None, "c", "d"]})
    await client.update("/doc/tags", {"x": "y"})  # not an index: the list becomes an object
    await eventually(lambda: stream.tree == {"tags": {"0": "a", "2": "c", "3": "d", "x": "y"}})
    assert await client.get("/doc") == stream.tree


@pytest.mark.parametrize("mode", ["abort", "close"])
async def test_dropped_connection_reconnects_with_a_fresh_full_read(
    standin: RtdbStandin, client: RtdbClient, ns: str, mode: str
) -> None:
    mirror = Mirror()
    causes: list[str] = []
    client.on_reconnect = causes.append  # the metrics' label
    await client.set("/feed", {"a": 1, "b": 2})
    stream = client.stream("/feed", mirror.on_change, backoff=FAST)
    await synced(stream)
    await standin.set_hold(True)  # reconnects get 503 until released
    try:
        await standin.drop(mode)
        await eventually(lambda: stream.reconnects >= 2)  # down, and one retry refused at least
        await client.update("/feed", {"b": None, "c": 3})  # only a full read can bring this
    finally:
        await standin.set_hold(False)
    await eventually(lambda: stream.synced)
    assert mirror.trees == [{"a": 1, "b": 2}, {"a": 1, "c": 3}]  # replaced whole, in one call
    assert len(causes) == stream.reconnects and "http_5xx" in causes  # the 503s while held
    await client.update("/feed", {"d": 4})
    await converges(stream, client, {"a": 1, "c": 3, "d": 4})
    assert await standin.open_streams(ns) == 1


async def test_server_restart_is_survived(own_standin: Callable[..., RtdbStandin]) -> None:
    server = own_standin(keepalive=0.2)
    rtdb = RtdbClient(server.url, namespace="n")
    await rtdb.set("/state", {"v": 1})
    mirror = Mirror()
    stream = rtdb.stream("/state", mirror.on_change, backoff=FAST)
    await synced(stream)
    await asyncio.to_thread(server.stop)
    await eventually(lambda: not stream.synced)
    await asyncio.to_thread(server.start)
    await eventually(lambda: stream.synced and stream.tree is None)  # the data went with the server
    await rtdb.set("/state", {"v": 2})
    await converges(stream, rtdb, {"v": 2})
    assert stream.reconnects >= 1 and stream.active
    await rtdb.aclose()


async def test_auth_revoked_gets_a_fresh_token_and_converges(
    own_standin: Callable[..., RtdbStandin],
) -> None:
    server = own_standin(keepalive=0.2, token="token-1")
    tokens = Tokens(start=1)
    rtdb = RtdbClient(server.url, namespace="n", tokens=tokens)
    await rtdb.set("/secret", {"v": 1})
    stream = rtdb.stream("/secret", lambda tree: None, backoff=FAST)
    await synced(stream)
    assert tokens.refreshes == 0
    assert await server.revoke(new_token="token-2") == 1  # token-1 is refused from now on
    await eventually(lambda: tokens.refreshes == 1)
    await rtdb.set("/secret/v", 2)
    await converges(stream, rtdb, {"v": 2})
    assert stream.active and not stream.failed
    assert tokens.refreshes == 1
    assert await server.unauthorized() == 0  # refreshed on auth_revoked, not after a 401
    await rtdb.aclose()


async def test_stream_follows_a_redirect_with_its_token(own_standin: Callable[..., RtdbStandin]) -> None:
    server = own_standin(keepalive=0.2, token="token-1")
    await server.set_redirect(True)
    rtdb = RtdbClient(server.url, namespace="n", tokens=Tokens(start=1))
    await rtdb.set("/r", 1)
    stream = rtdb.stream("/r", lambda tree: None)
    await converges(stream, rtdb, 1)
    await rtdb.aclose()


async def test_cancel_fails_that_stream_only(standin: RtdbStandin, client: RtdbClient, ns: str) -> None:
    denied, allowed = Mirror(), Mirror()
    a = client.stream("/private", denied.on_change, on_failed=denied.on_failed, backoff=FAST)
    b = client.stream("/public", allowed.on_change, on_failed=allowed.on_failed, backoff=FAST)
    await synced(a)
    await synced(b)
    assert await standin.cancel("/private", ns=ns) == 1
    await eventually(lambda: a.failed)
    assert not a.active and a.reason is not None and "cancel" in a.reason
    assert denied.failures == [a.reason]
    await client.set("/public/x", 1)
    await converges(b, client, {"x": 1})
    await eventually(lambda: client.open_streams == 1)
    assert a.reconnects == 0 and b.active and not allowed.failures
    assert await standin.open_streams(ns) == 1


async def test_idle_stream_reconnects_and_keepalive_counts_as_liveness(
    own_standin: Callable[..., RtdbStandin], client: RtdbClient
) -> None:
    silent = own_standin(keepalive=0)  # sends nothing after the first put
    rtdb = RtdbClient(silent.url, namespace="n")
    # The idle timeout also bounds the connection and its first put: it leaves room for a
    # loaded machine.
    causes: list[str] = []
    rtdb.on_reconnect = causes.append
    stream = rtdb.stream("/quiet", lambda tree: None, idle_timeout=1.0, backoff=FAST)
    await eventually(lambda: stream.reconnects >= 2)
    assert "idle_timeout" in causes
    await rtdb.set("/quiet", "awake")
    await converges(stream, rtdb, "awake")
    reads = stream.events
    await eventually(lambda: stream.events > reads)  # it goes on reconnecting, each time with a full read
    assert stream.tree == "awake"
    async with asyncio.timeout(30):  # each idle connection is closed, none piles up
        while await silent.open_streams() > 1:
            await asyncio.sleep(0.05)
    await rtdb.aclose()
    await no_streams(silent)

    # the shared stand-in sends keep-alive every 0.2 s: far inside this idle timeout
    alive = client.stream("/quiet", lambda tree: None, idle_timeout=2.0, backoff=FAST)
    await synced(alive)
    await asyncio.sleep(3.0)
    assert alive.reconnects == 0 and alive.synced
    await client.set("/quiet", "still here")
    await converges(alive, client, "still here")
    assert alive.reconnects == 0


async def test_large_node_is_read_completely(client: RtdbClient) -> None:
    children = {f"-N{i:018d}": {"title": f"item {i}", "read": i % 2 == 0, "n": i} for i in range(5000)}
    await client.set("/big", children)
    mirror = Mirror()
    stream = client.stream("/big", mirror.on_change)
    await synced(stream)
    assert len(stream.tree) == 5000
    assert stream.tree == children
    await client.update("/big", {"-N000000000000004999/read": True, "-N000000000000000000": None})
    expected = dict(children)
    expected["-N000000000000004999"] = {**children["-N000000000000004999"], "read": True}
    del expected["-N000000000000000000"]
    await converges(stream, client, expected)


async def test_an_event_over_the_bound_fails_the_stream(
    standin: RtdbStandin, client: RtdbClient, ns: str
) -> None:
    mirror = Mirror()
    await client.set("/blob", {"small": "x"})
    stream = client.stream("/blob", mirror.on_change, on_failed=mirror.on_failed, max_event_bytes=4096)
    await synced(stream)
    await client.set("/blob/large", "y" * 10_000)
    await eventually(lambda: stream.failed)
    assert stream.reason is not None and "4096 bytes" in stream.reason
    assert mirror.trees == [{"small": "x"}]
    assert client.open_streams == 0 and stream.reconnects == 0
    await no_streams(standin, ns)


async def test_close_is_prompt_and_leaves_no_stream_open(standin: RtdbStandin, ns: str) -> None:
    rtdb = RtdbClient(standin.url, namespace=ns)
    streams = [rtdb.stream(f"/s/{i}", lambda tree: None) for i in range(5)]
    for stream in streams:
        await synced(stream)
    assert await standin.open_streams(ns) == 5
    assert rtdb.open_streams == 5
    async with asyncio.timeout(5):
        await streams[0].close()
        assert not streams[0].active
        await rtdb.aclose()
    assert rtdb.open_streams == 0
    assert not any(stream.active for stream in streams)
    await no_streams(standin, ns)


async def test_streams_are_spread_over_bounded_connection_pools(
    standin: RtdbStandin, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx scans its whole pool on every request: streams go to pools of at most
    STREAMS_PER_POOL connections, and a closed stream's place is taken again."""
    monkeypatch.setattr(client_module, "STREAMS_PER_POOL", 2)
    rtdb = RtdbClient(standin.url, namespace=ns)
    try:
        mirrors = [Mirror() for _ in range(5)]
        streams = [rtdb.stream(f"/s/{i}", mirror.on_change) for i, mirror in enumerate(mirrors)]
        for stream in streams:
            await synced(stream)
        assert rtdb.stream_pools == 3
        assert len({id(rtdb.stream_http(s)) for s in streams}) == 3
        for i in range(5):
            await rtdb.set(f"/s/{i}", {"n": i})
        await wait_until(lambda: all(m.trees[-1] == {"n": i} for i, m in enumerate(mirrors)))
        await streams[0].close()
        again = rtdb.stream("/s/again", Mirror().on_change)
        await synced(again)
        assert rtdb.stream_pools == 3  # the freed place, not a fourth pool
    finally:
        await rtdb.aclose()


async def test_streams_take_turns_to_connect_and_give_the_turn_back(standin: RtdbStandin, ns: str) -> None:
    """At most `max_connecting` streams are between their request and their full read: a
    turn comes back on the full read, on a refused reconnect, and on close, so one turn is
    enough for every stream to come and come back."""
    rtdb = RtdbClient(standin.url, namespace=ns, max_connecting=1)
    try:
        streams = [rtdb.stream(f"/t/{i}", lambda tree: None, backoff=FAST) for i in range(5)]
        for stream in streams:
            await synced(stream)  # each full read gave the single turn back
        assert not rtdb.connecting.locked()
        await standin.set_hold(True)  # reconnects get 503 until released
        try:
            await standin.drop("abort")
            await eventually(lambda: all(s.reconnects >= 2 for s in streams))  # refused, turn by turn
            await streams[0].close()  # perhaps while it holds the turn
        finally:
            await standin.set_hold(False)
        for stream in streams[1:]:
            await synced(stream)
        await rtdb.set("/t/4", {"n": 4})
        await converges(streams[4], rtdb, {"n": 4})
        assert not rtdb.connecting.locked()
        assert await standin.open_streams(ns) == 4
    finally:
        await rtdb.aclose()


# --- tokens from service-account credentials -------------------------------------------


class FakeCredentials(Credentials):
    """Credentials whose refresh mints a token locally and records the thread it ran on."""

    def __init__(self, lifetime: float = 3600.0) -> None:
        super().__init__()
        self.lifetime = lifetime
        self.threads: list[int] = []

    def refresh(self, request: Any) -> None:
        self.threads.append(threading.get_ident())
        self.token = f"sa-{len(self.threads)}"
        self.expiry = datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=self.lifetime)


async def test_service_account_tokens_refresh_before_expiry_off_the_loop() -> None:
    assert set(SCOPES) == {
        "https://www.googleapis.com/auth/firebase.database",
        "https://www.googleapis.com/auth/userinfo.email",
    }
    credentials = FakeCredentials()
    tokens = ServiceAccountTokens(credentials, refresh_margin=60, min_refresh_interval=0)
    assert await tokens() == "sa-1"
    assert await tokens() == "sa-1"  # still valid: no refresh
    assert credentials.threads[0] != threading.get_ident()
    credentials.expiry = datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=30)
    assert await tokens() == "sa-2"  # inside the margin: refreshed before it expires
    assert await tokens(refresh=True) == "sa-3"  # the server said no: forced
    assert tokens.refreshes == 3

    shared = ServiceAccountTokens(FakeCredentials(), min_refresh_interval=60)
    await shared()
    results = await asyncio.gather(*(shared(refresh=True) for _ in range(10)))
    assert set(results) == {"sa-1"}  # ten revoked streams at once: one token, no refresh storm
    assert shared.refreshes == 1
