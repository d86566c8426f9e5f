"""The wire client (`listeners.source.rtdb_wire`) against the stand-in's WebSocket, over real TCP.

Writes go through the REST client (another transport on the same stand-in data) unless the
test is about the wire client's own writes; every mirror is checked against a REST read.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from listeners.source.rtdb import RtdbClient, RtdbError, ServiceAccountTokens
from listeners.source.rtdb_wire import RtdbSource, RtdbStream, WireClient, WireStream
from listeners.source.rtdb_wire.protocol import (
    MAX_FRAME,
    FrameReader,
    MessageTooLarge,
    apply_writes,
    auth_action,
    encode_frames,
    host_allowed,
    query_key,
    relative_writes,
    trim_window,
    wire_query,
)
from listeners_bridge.backoff import Backoff
from listeners_testkit.proxy import TcpProxy
from listeners_testkit.rtdb_server import RtdbStandin
from tests.test_rtdb import FakeCredentials

FAST = Backoff(base=0.05, cap=0.5)
TOKEN = "wire-token-1"
LAST_3 = {"orderBy": '"$key"', "limitToLast": "3"}


def test_both_clients_have_the_interface_the_streams_use() -> None:
    """Checked by mypy: code typed against `RtdbSource` takes either transport."""

    def either(rest: RtdbClient, wire: WireClient) -> tuple[RtdbSource, RtdbSource, RtdbStream, RtdbStream]:
        one: RtdbStream = rest.stream("a", print)
        two: RtdbStream = wire.stream("a", print)
        return rest, wire, one, two

    assert callable(either)


# --- the protocol's pieces, alone -----------------------------------------------------------------


def test_frames_round_trip_and_are_bounded() -> None:
    small = {"t": "d", "d": {"a": "d", "b": {"p": "a", "d": 1}}}
    assert encode_frames(small) == [json.dumps(small, separators=(",", ":"))]
    big = {"t": "d", "d": {"a": "d", "b": {"p": "a", "d": "x" * (3 * MAX_FRAME)}}}
    frames = encode_frames(big)
    assert frames[0] == str(len(frames) - 1) and all(len(f) <= MAX_FRAME for f in frames[1:])
    reader = FrameReader(10 * MAX_FRAME)
    out = [reader.feed(f) for f in frames]
    assert out[:-1] == [None] * (len(frames) - 1) and json.loads(out[-1] or "") == big
    assert reader.feed("0") is None  # a keep-alive
    with pytest.raises(MessageTooLarge):
        small_reader = FrameReader(MAX_FRAME)
        for frame in frames:
            small_reader.feed(frame)


def test_rest_queries_become_the_sdks_query_objects() -> None:
    # what `query(ref, orderByKey(), limitToLast(3))` sends (`queryParamsGetQueryObject`)
    assert wire_query(LAST_3) == {"l": 3, "vf": "r", "i": ".key"}
    assert wire_query({"orderBy": '"$key"', "limitToFirst": "2"}) == {"l": 2, "vf": "l", "i": ".key"}
    assert wire_query({"orderBy": '"ts"', "startAt": "5", "endAt": '"z"'}) == {
        "sp": 5, "sin": True, "ep": "z", "ein": True, "i": "ts",
    }  # fmt: skip
    assert (wire_query({"orderBy": '"$value"', "equalTo": "true"}) or {})["sp"] is True
    assert wire_query(None) is None and wire_query({}) is None
    for bad in ({"limitToLast": "3"}, {"orderBy": "$key"}, {"orderBy": '"$key"', "limitToLast": "0"}):
        with pytest.raises(ValueError):
            wire_query(bad)
    # the listen's identity does not depend on the order of the keys, as ObjectToUniqueKey
    assert query_key({"vf": "r", "l": 3, "i": ".key"}) == query_key({"i": ".key", "l": 3, "vf": "r"})
    assert query_key(None) == "default"


def test_pushes_become_writes_relative_to_the_listen() -> None:
    listen = ("clients", "u1", "dm")
    assert relative_writes(listen, ("clients", "u1", "dm", "m1"), False, {"x": 1}) == [(("m1",), {"x": 1})]
    assert relative_writes(listen, listen, False, None) == [((), None)]
    # above the listen: the node's new value, whole
    assert relative_writes(listen, ("clients",), False, {"u1": {"dm": {"m": 1}}}) == [((), {"m": 1})]
    assert relative_writes(listen, ("clients",), False, {"u2": {}}) == [((), None)]
    # a merge: each child path, with the ones elsewhere left out
    merge = {"dm/m1/read": True, "other": 1, "dm": None}
    assert relative_writes(listen, ("clients", "u1"), True, merge) == [(("m1", "read"), True), ((), None)]
    assert relative_writes(listen, ("clients", "u2", "dm"), False, 1) == []
    tree, changed = apply_writes({"m1": {"a": 1}}, [(("m2",), {"b": 2}), (("m1", "a"), None)])
    assert tree == {"m2": {"b": 2}} and changed == frozenset({"m1", "m2"})
    tree, changed = apply_writes(tree, [((), {"z": 1})])
    assert tree == {"z": 1} and changed is None


def test_a_key_window_is_trimmed_to_its_limit() -> None:
    query = wire_query(LAST_3)
    tree = {"-b": 1, "-a": 0, "-d": 3, "-c": 2, "5": 9}  # integer keys sort first
    kept, dropped = trim_window(tree, query)
    assert kept == {"-b": 1, "-d": 3, "-c": 2} and sorted(dropped) == ["-a", "5"]
    first = wire_query({"orderBy": '"$key"', "limitToFirst": "1"})
    assert trim_window(tree, first) == ({"5": 9}, ["-a", "-b", "-c", "-d"])
    assert trim_window(tree, None) == (tree, [])


def test_auth_action_and_allowed_hosts() -> None:
    assert auth_action("ya29.an-access-token") == "gauth" and auth_action("owner") == "gauth"
    id_token = "e30." + "eyJpYXQiOjF9" + ".sig"  # {"iat":1}: a Firebase ID token
    assert auth_action(id_token) == "auth"
    assert host_allowed("s-usc1c-nss-2.firebaseio.com", "db.firebaseio.com", secure=True)
    assert host_allowed("db-default-rtdb.europe-west1.firebasedatabase.app", "x.firebaseio.com", secure=True)
    assert not host_allowed("evil.example.com", "db.firebaseio.com", secure=True)
    assert not host_allowed("s-1.firebaseio.com", "db.firebaseio.com", secure=False)  # token in clear
    assert host_allowed("localhost:9000", "127.0.0.1:9000", secure=False)
    assert not host_allowed("10.0.0.1:9000", "127.0.0.1:9000", secure=False)
    assert not host_allowed("a/b", "a", secure=False) and not host_allowed(None, "a", secure=False)


# --- against the stand-in -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standin() -> Iterator[RtdbStandin]:
    with RtdbStandin(keepalive=5.0, token=TOKEN) as server:
        yield server


@pytest.fixture
def ns() -> str:
    return f"wire-{uuid.uuid4().hex[:12]}"


class Tokens:
    """A token provider: `token` now, counting calls and forced refreshes; `fail` makes it raise."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.calls = 0
        self.forced = 0
        self.fail = False

    async def __call__(self, *, refresh: bool = False) -> str:
        self.calls += 1
        self.forced += refresh
        if self.fail:
            raise RuntimeError("the token endpoint is down")
        return self.token


@pytest.fixture
async def rest(standin: RtdbStandin, ns: str) -> AsyncIterator[RtdbClient]:
    async def token(*, refresh: bool = False) -> str:
        return TOKEN

    client = RtdbClient(standin.url, namespace=ns, tokens=token)
    yield client
    await client.aclose()


@pytest.fixture
async def make(standin: RtdbStandin, ns: str) -> AsyncIterator[Callable[..., WireClient]]:
    made: list[WireClient] = []

    def factory(**kwargs: Any) -> WireClient:
        kwargs.setdefault("tokens", Tokens())
        kwargs.setdefault("backoff", FAST)
        client = WireClient(kwargs.pop("url", standin.url), namespace=ns, **kwargs)
        made.append(client)
        return client

    yield factory
    for client in made:
        await client.aclose()


class Mirror:
    """Every tree a stream hands out (deep-copied then), with `last_changed` and `reconnects`."""

    def __init__(self) -> None:
        self.trees: list[Any] = []
        self.changed: list[frozenset[str] | None] = []
        self.reconnects: list[int] = []
        self.failures: list[str] = []
        self.stream: WireStream | None = None

    def on_change(self, tree: Any) -> None:
        assert self.stream is not None
        self.trees.append(copy.deepcopy(tree))
        self.changed.append(self.stream.last_changed)
        self.reconnects.append(self.stream.reconnects)

    def on_failed(self, reason: str) -> None:
        self.failures.append(reason)

    def open(self, client: WireClient, path: str, **kwargs: Any) -> WireStream:
        self.stream = client.stream(path, self.on_change, on_failed=self.on_failed, **kwargs)
        return self.stream


async def eventually(predicate: Callable[[], object], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def until(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    async with asyncio.timeout(timeout):
        while not (result := await check()):
            await asyncio.sleep(0.05)
    return result


async def test_a_stream_mirrors_a_node(make: Callable[..., WireClient], rest: RtdbClient) -> None:
    path = "clients/u1/direct_message_notif"
    await rest.set(path, {"m1": {"text": "one"}})
    client = make()
    mirror = Mirror()
    stream = mirror.open(client, path)
    await eventually(lambda: stream.synced)
    assert mirror.trees == [{"m1": {"text": "one"}}] and mirror.changed == [None]
    assert stream.path == "/clients/u1/direct_message_notif" and stream.active and client.open_streams == 1

    await rest.set(f"{path}/m2", {"text": "two"})
    await rest.update(f"{path}/m1", {"read": True})
    await rest.delete(f"{path}/m2")
    await rest.update("clients/u1", {"direct_message_notif/m3": {"text": "three"}})  # a merge above
    await eventually(lambda: len(mirror.trees) == 5)
    assert mirror.changed[1:] == [frozenset({key}) for key in ("m2", "m1", "m2", "m3")]
    expected = {"m1": {"text": "one", "read": True}, "m3": {"text": "three"}}
    assert stream.tree == await rest.get(path) == expected
    await rest.set("clients/u1", {"other": 1})  # the parent replaced: the node is gone
    await eventually(lambda: stream.tree is None)
    assert mirror.changed[-1] is None and stream.reconnects == 0 and stream.events == 6
    await stream.close()
    assert not stream.active and client.open_streams == 0


async def test_the_limit_to_last_window_moves(make: Callable[..., WireClient], rest: RtdbClient) -> None:
    path = "acme/chats/t1/messages"
    await rest.set(path, {f"-m{n}": {"n": n} for n in range(5)})
    client = make()
    mirror = Mirror()
    stream = mirror.open(client, path, query=LAST_3)
    await eventually(lambda: stream.synced)
    assert stream.tree == {"-m2": {"n": 2}, "-m3": {"n": 3}, "-m4": {"n": 4}}

    await rest.set(f"{path}/-m5", {"n": 5})  # -m2 leaves the window
    await eventually(lambda: "-m5" in (stream.tree or {}))
    assert stream.tree == {"-m3": {"n": 3}, "-m4": {"n": 4}, "-m5": {"n": 5}}
    assert stream.last_changed == frozenset({"-m2", "-m5"})
    await rest.delete(f"{path}/-m5")  # -m2 comes back
    await eventually(lambda: "-m2" in (stream.tree or {}))
    assert stream.tree == await rest.get(path, query={"orderBy": '"$key"', "limitToLast": "3"})
    await rest.set(f"{path}/-l0", {"n": -1})  # before the window: no change at all
    await rest.update(f"{path}/-m3", {"read": True})
    await eventually(lambda: (stream.tree or {}).get("-m3", {}).get("read") is True)
    assert all(len(tree) == 3 for tree in mirror.trees)


async def test_listens_share_a_few_connections(
    make: Callable[..., WireClient], rest: RtdbClient, standin: RtdbStandin, ns: str
) -> None:
    """30 users' nodes on connections of at most 10 listens, at most 2 connections: 2 sockets
    carry them all; the third would-be connection's share goes to the least loaded."""
    client = make(max_connections=2, listens_per_connection=10)
    mirrors = [Mirror() for _ in range(30)]
    streams = [m.open(client, f"clients/u{n}/direct_message_notif") for n, m in enumerate(mirrors)]
    await eventually(lambda: all(s.synced for s in streams))
    stats = await standin.wire(ns)
    assert stats["connections"] == 2 and stats["listens"] == 30
    assert sorted(c["listens"] for c in client.stats()["connections"]) == [15, 15]
    assert client.connections == 2 and client.open_streams == 30
    await asyncio.gather(*(rest.set(f"clients/u{n}/direct_message_notif/m", n) for n in range(30)))
    await eventually(lambda: all(s.tree == {"m": n} for n, s in enumerate(streams)))
    for stream in streams[:20]:
        await stream.close()
    await until(lambda: _listens(standin, ns, 10))


async def _listens(standin: RtdbStandin, ns: str, n: int) -> bool:
    return bool((await standin.wire(ns))["listens"] == n)


async def test_one_listen_per_path_and_query_shared_by_streams(
    make: Callable[..., WireClient], rest: RtdbClient, standin: RtdbStandin, ns: str
) -> None:
    path = "acme/chats/shared/messages"
    await rest.set(path, {"-a": 1, "-b": 2, "-c": 3, "-d": 4})
    client = make()
    first, second, whole = Mirror(), Mirror(), Mirror()
    one = first.open(client, path, query=LAST_3)
    await eventually(lambda: one.synced)
    two = second.open(client, path, query=LAST_3)  # a second user with the thread open
    every = whole.open(client, path)  # the same path without a query: a listen of its own
    await eventually(lambda: two.synced and every.synced)
    assert second.trees == [{"-b": 2, "-c": 3, "-d": 4}] and second.changed == [None]
    assert (await standin.wire(ns))["listens"] == 2
    await one.close()
    await rest.set(f"{path}/-e", 5)
    await eventually(lambda: two.tree == {"-c": 3, "-d": 4, "-e": 5} and "-e" in (every.tree or {}))
    assert len(first.trees) == 1  # closed: nothing more
    await two.close()
    await every.close()
    await until(lambda: _listens(standin, ns, 0))


async def test_a_dropped_connection_gives_every_stream_a_fresh_full_read(
    make: Callable[..., WireClient], rest: RtdbClient, standin: RtdbStandin, ns: str
) -> None:
    client = make()
    dm, chat = Mirror(), Mirror()
    one = dm.open(client, "clients/u9/direct_message_notif")
    two = chat.open(client, "acme/chats/t9/messages", query=LAST_3)
    await eventually(lambda: one.synced and two.synced)
    await standin.drop()
    await eventually(lambda: not one.synced)
    await rest.set("clients/u9/direct_message_notif/while", 1)  # written while away
    await rest.set("acme/chats/t9/messages/-x", 2)
    await eventually(lambda: one.synced and two.synced and one.reconnects == 1 and two.reconnects == 1)
    assert one.tree == {"while": 1} and two.tree == {"-x": 2}
    assert dm.changed[-1] is None and dm.reconnects[-1] == 1  # the consumer's cue for a fresh sync
    assert (await standin.wire(ns))["listens"] == 2 and not client.degraded


async def test_a_restarted_server_with_backoff(
    make: Callable[..., WireClient], own: Callable[..., RtdbStandin], ns: str
) -> None:
    server = own(token=TOKEN)
    client = make(url=server.url)
    mirror = Mirror()
    stream = mirror.open(client, "clients/u1/direct_message_notif")
    await eventually(lambda: stream.synced)
    server.stop()
    await eventually(lambda: not stream.synced)
    await asyncio.sleep(1.0)  # a few refused attempts
    server.start()
    await eventually(lambda: stream.synced and stream.reconnects == 1)
    assert stream.tree is None  # the restarted stand-in has no data
    assert client.stats()["connections"][0]["last_error"]


@pytest.fixture
def own() -> Iterator[Callable[..., RtdbStandin]]:
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


async def test_the_token_is_refreshed_on_the_open_connection(
    make: Callable[..., WireClient], rest: RtdbClient, standin: RtdbStandin
) -> None:
    tokens = Tokens()
    client = make(tokens=tokens, token_check_interval=0.2)
    stream = client.stream("clients/t1/direct_message_notif", lambda tree: None)
    await eventually(lambda: stream.synced)
    before = await standin.wire()
    await standin.wire_accept("wire-token-2")
    tokens.token = "wire-token-2"  # what a provider hands out once it refreshed before expiry
    stats = await until(lambda: _last_cred(standin, "wire-token-2"))
    assert stats["connects"] == before["connects"]  # the same connection
    assert stream.synced and stream.reconnects == 0 and not client.degraded
    await rest.set("clients/t1/direct_message_notif/m", 1)
    await eventually(lambda: stream.tree == {"m": 1})


async def _last_cred(standin: RtdbStandin, token: str) -> dict[str, Any] | None:
    stats = await standin.wire()
    return stats if stats["creds"] and stats["creds"][-1] == token else None


async def test_a_failed_refresh_and_a_refused_token_degrade_with_a_reason(
    make: Callable[..., WireClient], rest: RtdbClient
) -> None:
    tokens = Tokens()
    client = make(tokens=tokens, token_check_interval=0.1)
    stream = client.stream("clients/t2/direct_message_notif", lambda tree: None)
    await eventually(lambda: stream.synced)
    tokens.fail = True
    await eventually(lambda: client.degraded)
    assert "the token refresh failed" in (client.reason or "") and "endpoint is down" in (client.reason or "")
    assert stream.synced  # the token in use is still valid: the listens go on
    tokens.fail = False
    await eventually(lambda: not client.degraded)

    tokens.token = "not-accepted"  # a refreshed token the server refuses
    await eventually(lambda: client.degraded)
    assert "refused the credential" in (client.reason or "") and "invalid_token" in (client.reason or "")
    tokens.token = TOKEN
    await eventually(lambda: stream.synced and not client.degraded)
    assert tokens.forced >= 1  # the connection started again asking for a fresh token


async def test_a_revoked_credential_reconnects_with_a_fresh_token(
    make: Callable[..., WireClient], own: Callable[..., RtdbStandin], ns: str
) -> None:
    server = own(token=TOKEN)  # its own: the revocation changes the token it wants
    tokens = Tokens()
    client = make(url=server.url, tokens=tokens)
    stream = client.stream("clients/t3/direct_message_notif", lambda tree: None)
    await eventually(lambda: stream.synced)
    forced = tokens.forced
    await server.revoke("wire-token-3")
    await eventually(lambda: client.degraded)
    assert "revoked the credential" in (client.reason or "") or "refused" in (client.reason or "")
    tokens.token = "wire-token-3"
    await eventually(lambda: stream.synced and stream.reconnects == 1 and not client.degraded)
    assert tokens.forced > forced


async def test_a_cancelled_or_refused_listen_fails_alone(
    make: Callable[..., WireClient], rest: RtdbClient, standin: RtdbStandin, ns: str
) -> None:
    client = make()
    gone, kept = Mirror(), Mirror()
    one = gone.open(client, "clients/c1/direct_message_notif")
    two = kept.open(client, "clients/c2/direct_message_notif")
    await eventually(lambda: one.synced and two.synced)
    assert await standin.cancel("clients/c1", ns=ns) >= 1
    await eventually(lambda: one.failed)
    assert not one.active and "no longer permitted" in (one.reason or "") and gone.failures == [one.reason]
    # the path stays denied: a new listen there is refused, and fails alone too
    again = Mirror()
    three = again.open(client, "clients/c1/direct_message_notif")
    await eventually(lambda: three.failed)
    assert "permission_denied" in (three.reason or "")
    await rest.set("clients/c2/direct_message_notif/m", 1)
    await eventually(lambda: two.tree == {"m": 1})
    assert two.active and not client.degraded


async def test_the_server_moves_the_client_to_another_host(
    make: Callable[..., WireClient], rest: RtdbClient, standin: RtdbStandin
) -> None:
    client = make()
    stream = client.stream("clients/h1/direct_message_notif", lambda tree: None)
    await eventually(lambda: stream.synced)
    assert client.host == f"127.0.0.1:{standin.port}"
    await standin.wire_reset(f"localhost:{standin.port}")  # a reset (`r`) to the database's own host
    # the reconnect is the sentinel: `synced` alone may still be the first connection's
    await eventually(lambda: client.host == f"localhost:{standin.port}" and stream.reconnects >= 1)
    await eventually(lambda: stream.synced)
    assert stream.reconnects == 1
    await standin.wire_reset("elsewhere.example.com:443")  # not a database host: not followed
    await eventually(lambda: stream.synced and stream.reconnects == 2)
    assert client.host == f"localhost:{standin.port}"


async def test_writes_over_the_wire(make: Callable[..., WireClient], rest: RtdbClient) -> None:
    client = make()
    await client.set("clients/w1/direct_message_notif", {"m1": {"text": "one"}})
    await client.update("clients/w1/direct_message_notif/m1", {"read": True, "meta/by": "me"})
    name = await client.push("clients/w1/direct_message_notif", {"text": "two"})
    assert len(name) == 20
    assert await rest.get("clients/w1/direct_message_notif") == {
        "m1": {"text": "one", "read": True, "meta": {"by": "me"}},
        name: {"text": "two"},
    }
    assert await client.get("clients/w1/direct_message_notif/m1/read") is True
    await client.delete("clients/w1/direct_message_notif/m1")
    assert await rest.get("clients/w1/direct_message_notif") == {name: {"text": "two"}}
    with pytest.raises(ValueError):
        await client.update("a", {"": 1})
    refused = make(tokens=Tokens("wrong"), request_timeout=1.0)
    with pytest.raises(RtdbError):
        await refused.set("x", 1)  # never authenticated: no connection becomes ready


async def test_keepalive_pings_and_a_silent_server(
    make: Callable[..., WireClient], standin: RtdbStandin
) -> None:
    client = make(keepalive=0.2, idle_timeout=30.0)
    stream = client.stream("clients/k1/direct_message_notif", lambda tree: None)
    await eventually(lambda: stream.synced)
    pings = (await standin.wire())["pings"]
    await until(lambda: _more_pings(standin, pings))
    assert stream.reconnects == 0  # the pongs keep it alive


async def test_a_half_open_connection_is_noticed_and_replaced(
    make: Callable[..., WireClient], rest: RtdbClient, standin: RtdbStandin
) -> None:
    """A connection that goes silent (a NAT entry dropped: no FIN, no RST) is given up after
    `idle_timeout` without anything received, the ping unanswered, and a new one takes over."""
    with TcpProxy(target_port=standin.port) as proxy:
        client = make(url=f"http://127.0.0.1:{proxy.port}", keepalive=0.3, idle_timeout=1.5)
        stream = client.stream("clients/k2/direct_message_notif", lambda tree: None)
        await eventually(lambda: stream.synced)
        proxy.freeze()
        await rest.set("clients/k2/direct_message_notif/m", 1)  # held in the frozen link
        await eventually(lambda: stream.reconnects == 1 and stream.synced, timeout=30)
        assert stream.tree == {"m": 1}
        assert "nothing received" in (client.stats()["connections"][0]["last_error"] or "")


async def _more_pings(standin: RtdbStandin, pings: int) -> bool:
    return bool((await standin.wire())["pings"] >= pings + 2)


async def test_invalid_paths_and_queries_raise_at_once(make: Callable[..., WireClient]) -> None:
    client = make()
    with pytest.raises(ValueError):
        client.stream("clients/a.b/direct_message_notif", lambda tree: None)
    with pytest.raises(ValueError):
        client.stream("x", lambda tree: None, query={"limitToLast": "3"})
    assert client.open_streams == 0 and client.stats()["connections"] == []


async def test_a_server_shutdown_degrades_until_the_next_connection(
    make: Callable[..., WireClient], standin: RtdbStandin, ns: str
) -> None:
    client = make(backoff=Backoff(base=2.0, cap=2.0))  # a second or two before the next attempt
    stream = client.stream("clients/s1/direct_message_notif", lambda tree: None)
    await eventually(lambda: stream.synced)
    assert await standin.wire_shutdown("database disabled by the owner") >= 1
    await eventually(lambda: client.degraded)
    assert "shut the connection down: database disabled by the owner" in (client.reason or "")
    await eventually(lambda: stream.synced and stream.reconnects == 1 and not client.degraded)


async def test_service_account_tokens_are_refreshed_before_expiry_on_the_open_connection(
    make: Callable[..., WireClient], own: Callable[..., RtdbStandin]
) -> None:
    """The service's own provider (`ServiceAccountTokens`, refreshing `refresh_margin` before
    expiry): each new access token goes on the connection already open."""
    server = own()  # takes any credential, and records them
    credentials = FakeCredentials(lifetime=3.0)
    tokens = ServiceAccountTokens(credentials, refresh_margin=2.0, min_refresh_interval=0)
    client = make(url=server.url, tokens=tokens, token_check_interval=0.3)
    stream = client.stream("clients/sa/direct_message_notif", lambda tree: None)
    await eventually(lambda: stream.synced)
    stats = await until(lambda: _last_cred(server, "sa-3"))
    assert stats["creds"][:3] == ["sa-1", "sa-2", "sa-3"] and stats["connects"] == 1
    assert stream.synced and stream.reconnects == 0 and not client.degraded
