"""The multiplexed Listen source against the SDK's source and a model of the writes.

A hypothesis-generated sequence of sets, merges and deletes moves documents in and out of
several equality queries on two collections. At each check the test writes one sentinel per
query after everything else and waits until both sources show it: a snapshot at a read time
past the sentinel's write holds every earlier write, so the result sets must then agree
(no sleeping, no "quiet for a while"). `LISTENERS_LISTEN_EXAMPLES` sets how many sequences
run (a few in CI; thousands for a long run).
"""

from __future__ import annotations

import asyncio
import gc
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
from google.api_core import exceptions
from google.cloud import firestore
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from listeners.source.firestore import FirestoreSource
from listeners.source.listen import ListenSource
from listeners.source.snapshots import Query, Snapshot, SnapshotSource
from listeners_testkit.processes import NPM, PROJECT_ROOT, FirestoreEmulator

from .conftest import google_emulator_only

EXAMPLES = int(os.environ.get("LISTENERS_LISTEN_EXAMPLES", "4"))
WAIT = 120.0  # generous: a loaded 2-core machine, an emulator in Java

QUERIES = (
    Query("alpha", (("k", 0),)),
    Query("alpha", (("k", 1),)),
    Query("alpha", (("on", True),)),
    Query("alpha", (("k", 1), ("on", False))),
    Query("beta"),
    Query("beta", (("k", 2),)),
)
DOCS = ("d0", "d1", "d2", "d3", "d4")

Docs = dict[str, dict[str, Any]]


def matches(query: Query, collection: str, data: dict[str, Any]) -> bool:
    # Firestore compares types too: 1 is not true; a missing field matches nothing
    return collection == query.collection and all(
        k in data and type(data[k]) is type(v) and data[k] == v for k, v in query.equals
    )


def sentinel_fields(query: Query) -> dict[str, Any]:
    """A document that matches `query`: its own equalities, the rest at values no filter picks."""
    return {"k": 9, "on": None, **dict(query.equals)}


SENTINELS = [
    [
        f"sentinel-{j}"
        for j, other in enumerate(QUERIES)
        if matches(query, other.collection, sentinel_fields(other))
    ]
    for query in QUERIES
]


@dataclass
class Recorder:
    """The latest result set of every query from one source; `changed` fires on each snapshot."""

    results: list[Docs | None] = field(default_factory=lambda: [None] * len(QUERIES))
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def handler(self, index: int) -> Callable[[Snapshot], None]:
        def on_snapshot(snapshot: Snapshot) -> None:
            self.results[index] = {d.id: dict(d.data) for d in snapshot.docs}
            self.changed.set()

        return on_snapshot

    def settled(self, seq: int) -> bool:
        """Every query shows the last sentinel write it matches (a sentinel can match several)."""
        return all(
            r is not None and all(r.get(s, {}).get("seq") == seq for s in SENTINELS[i])
            for i, r in enumerate(self.results)
        )


class Differential:
    """Both sources watching QUERIES, the writes, and the model of what Firestore holds."""

    def __init__(self, db: firestore.Client, sources: dict[str, SnapshotSource]) -> None:
        self.db = db
        self.sources = sources
        self.recorders = {name: Recorder() for name in sources}
        self.model: dict[tuple[str, str], dict[str, Any]] = {}
        self.seq = 0
        self.checks = 0

    def start(self) -> None:
        for name, source in self.sources.items():
            for i, query in enumerate(QUERIES):
                source.watch(query, self.recorders[name].handler(i))

    async def listening(self) -> None:
        """Until every query of every source has its first snapshot and every Listen target is
        CURRENT. Google's emulator can run a target's first query before a write that races
        the target's ADD yet stamp its CURRENT later, and never send that write to it (seen with
        several targets per stream: README.md); writes start after this."""
        async with asyncio.timeout(WAIT):
            for recorder in self.recorders.values():
                while any(r is None for r in recorder.results):
                    recorder.changed.clear()
                    await recorder.changed.wait()
            for source in self.sources.values():
                if isinstance(source, ListenSource):
                    await asyncio.gather(*(stream.current() for stream in source.pool.streams))

    async def apply(self, op: tuple[Any, ...]) -> None:
        kind, collection, doc_id, *rest = op
        ref = self.db.document(f"{collection}/{doc_id}")
        if kind == "set":
            data = {"k": rest[0], "on": rest[1], "n": rest[2]}
            await write(ref.set, data)
            self.model[collection, doc_id] = data
        elif kind == "merge":
            await write(ref.set, {rest[0]: rest[1]}, merge=True)
            self.model[collection, doc_id] = {**self.model.get((collection, doc_id), {}), rest[0]: rest[1]}
        else:
            await write(ref.delete)
            self.model.pop((collection, doc_id), None)

    async def check(self) -> None:
        """Write the sentinels, wait for every source to show them, then compare."""
        self.seq += 1
        for i, query in enumerate(QUERIES):
            data = {**sentinel_fields(query), "seq": self.seq}
            await write(self.db.document(f"{query.collection}/sentinel-{i}").set, data)
            self.model[query.collection, f"sentinel-{i}"] = data
        for name, recorder in self.recorders.items():
            try:
                async with asyncio.timeout(WAIT):
                    while not recorder.settled(self.seq):
                        recorder.changed.clear()
                        await recorder.changed.wait()
            except TimeoutError:
                raise AssertionError(f"{name} never showed sentinel {self.seq}: {recorder.results}") from None
        for i, query in enumerate(QUERIES):
            expected = {d: data for (c, d), data in self.model.items() if matches(query, c, data)}
            for name, recorder in self.recorders.items():
                assert recorder.results[i] == expected, f"{name}, {query}"
        self.checks += 1


async def write(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Retried on the transient errors a loaded emulator gives; each write is idempotent."""
    for attempt in range(6):
        try:
            await asyncio.to_thread(call, *args, **kwargs)
            return
        except (exceptions.Cancelled, exceptions.ServiceUnavailable, exceptions.DeadlineExceeded):
            if attempt == 5:
                raise
            await asyncio.sleep(0.2 * 2**attempt)  # a retry's backoff, not a wait for a result


def listen_source(project: str, host: str, targets_per_stream: int = 2) -> ListenSource:
    # 6 queries, 2 targets per stream, 2 streams per connection: 3 streams over 2 connections
    return ListenSource(
        project, emulator_host=host, targets_per_stream=targets_per_stream, max_streams_per_connection=2
    )


writes = st.one_of(
    st.tuples(
        st.just("set"),
        st.sampled_from(("alpha", "beta")),
        st.sampled_from(DOCS),
        st.sampled_from((0, 1, 2)),
        st.booleans(),
        st.integers(0, 3),
    ),
    st.tuples(
        st.just("merge"),
        st.sampled_from(("alpha", "beta")),
        st.sampled_from(DOCS),
        st.sampled_from(("k", "on", "n")),
        st.sampled_from((0, 1, 2, True, False)),
    ),
    st.tuples(st.just("delete"), st.sampled_from(("alpha", "beta")), st.sampled_from(DOCS)),
)
steps = st.lists(st.one_of(writes, writes, writes, st.just(("check",)), st.just(("cut",))), max_size=25)


async def run(
    differential: Differential, ops: list[tuple[Any, ...]], cut: Callable[[], Awaitable[None]] | None
) -> None:
    differential.start()
    await differential.listening()
    await differential.check()
    for op in ops:
        if op[0] == "check":
            await differential.check()
        elif op[0] == "cut":
            if cut is not None:
                await cut()
        else:
            await differential.apply(op)
    await differential.check()


def scenario(host: str, ops: list[tuple[Any, ...]], *, cut: bool, targets_per_stream: int = 2) -> None:
    project = f"test-{uuid.uuid4().hex[:12]}"
    db = firestore.Client(project=project)
    listen = listen_source(project, host, targets_per_stream)
    sdk = FirestoreSource(project, None)

    async def interrupt() -> None:
        for stream in listen.pool.streams:
            stream.interrupt()  # as a network failure would: every target resumes with its token
        await differential.listening()

    differential = Differential(db, {"listen": listen, "sdk": sdk})

    async def main() -> None:
        try:
            await run(differential, ops, interrupt if cut else None)
        finally:
            await listen.aclose()
            await sdk.aclose()

    try:
        asyncio.run(main())
    finally:
        db.close()


@google_emulator_only("the SDK source and the Listen source keep many targets per stream")
@pytest.mark.timeout(600)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
@given(ops=steps)
def test_listen_source_agrees_with_the_sdk_and_the_model(emulator: FirestoreEmulator, ops: list[Any]) -> None:
    scenario(emulator.host, ops, cut=False)


@google_emulator_only("the SDK source and the Listen source keep many targets per stream")
@pytest.mark.timeout(600)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=steps.map(lambda ops: [*ops[: len(ops) // 2], ("cut",), *ops[len(ops) // 2 :]]))
def test_listen_source_agrees_when_its_streams_are_cut_mid_sequence(
    emulator: FirestoreEmulator, ops: list[Any]
) -> None:
    scenario(emulator.host, ops, cut=True)


@google_emulator_only("the SDK source and the Listen source keep many targets per stream")
@pytest.mark.timeout(600)
def test_listen_source_recovers_when_the_emulator_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The emulator forgets every document and resume token; each source must converge on
    what the new one holds. An emulator of its own: the session's stays undisturbed."""
    with FirestoreEmulator() as own:
        monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", own.host)
        project = f"test-{uuid.uuid4().hex[:12]}"
        db = firestore.Client(project=project)
        listen = listen_source(project, own.host)
        sdk = FirestoreSource(project, None)
        before = [("set", "alpha", d, n % 3, n % 2 == 0, n) for n, d in enumerate(DOCS)]
        after = [("set", "beta", "d0", 2, True, 7), ("set", "alpha", "d1", 1, False, 8)]

        async def main() -> None:
            differential = Differential(db, {"listen": listen, "sdk": sdk})
            try:
                differential.start()
                await differential.listening()
                for op in before:
                    await differential.apply(op)
                await differential.check()
                await asyncio.to_thread(own.restart)
                differential.model.clear()  # the emulator keeps nothing across a restart
                for stream in listen.pool.streams:
                    stream.interrupt()  # so that `listening` waits for this stream's new call
                await differential.listening()
                for op in after:
                    await differential.apply(op)
                await differential.check()
                assert all(s.restarts >= 1 for s in listen.pool.streams)
            finally:
                await listen.aclose()
                await sdk.aclose()

        try:
            asyncio.run(main())
        finally:
            db.close()


NPM_PACKAGE = PROJECT_ROOT / "node_modules" / "@firestore-emulator" / "server"


@pytest.fixture(scope="module")
def npm_emulator() -> Iterator[FirestoreEmulator]:
    if not NPM_PACKAGE.exists():
        pytest.skip(f"the npm emulator is not installed ({NPM_PACKAGE}): run scripts/bootstrap")
    with FirestoreEmulator(kind=NPM) as server:
        yield server


@pytest.mark.timeout(600)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=steps)
def test_listen_source_works_on_the_npm_emulator_with_one_target_per_stream(
    npm_emulator: FirestoreEmulator, ops: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The npm emulator answers only the first target of a stream: one per stream there, so
    the pool holds six streams over three connections."""
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", npm_emulator.host)  # the SDK source's
    scenario(npm_emulator.host, ops, cut=True, targets_per_stream=1)


def own_connections_to(port: int) -> int:
    """This process's established TCP connections to `port`."""
    import psutil

    return sum(
        1
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


class Latest:
    """Each watch's latest result set, and an event per change."""

    def __init__(self) -> None:
        self.results: dict[str, set[str]] = {}
        self.changed = asyncio.Event()

    def handler(self, name: str) -> Callable[[Snapshot], None]:
        def on_snapshot(snapshot: Snapshot) -> None:
            self.results[name] = {d.id for d in snapshot.docs}
            self.changed.set()

        return on_snapshot

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


async def test_streams_spread_over_connections_and_closing_a_watch_keeps_its_stream(
    emulator: FirestoreEmulator, project_id: str
) -> None:
    """The pool on the emulator path: one target per stream and two streams per connection
    give five streams over three TCP connections. Closing a watch is a remove_target."""
    source = ListenSource(
        project_id, emulator_host=emulator.host, targets_per_stream=1, max_streams_per_connection=2
    )
    db = firestore.Client(project=project_id)
    latest = Latest()
    names = [f"c{n}" for n in range(5)]
    gc.collect()  # channels earlier tests dropped close now, not while this one counts
    before = own_connections_to(emulator.port)  # other clients of this process (`db` has none yet)
    try:
        watches = {name: source.watch(Query(name), latest.handler(name)) for name in names}
        await latest.until(lambda: len(latest.results) == 5)
        assert [len(c.streams) for c in source.pool.connections] == [2, 2, 1]
        assert source.open_streams == 5 and source.connections == 3
        assert own_connections_to(emulator.port) - before == 3
        closed = watches["c0"].stream
        await watches["c0"].close()
        await write(db.document("c0/after-close").set, {"n": 1})
        await write(db.document("c1/sentinel").set, {"n": 1})  # written after, on another stream
        await latest.until(lambda: latest.results["c1"] == {"sentinel"})
        assert latest.results["c0"] == set()  # nothing after its close
        assert closed.open and closed.restarts == 0 and closed.targets == 0
    finally:
        await source.aclose()
        db.close()


@google_emulator_only("the npm emulator answers only the first target of a stream")
async def test_a_target_error_ends_that_watch_only(emulator: FirestoreEmulator, project_id: str) -> None:
    source = ListenSource(project_id, emulator_host=emulator.host)
    db = firestore.Client(project=project_id)
    latest = Latest()
    try:
        good = source.watch(Query("good"), latest.handler("good"))
        await latest.until(lambda: "good" in latest.results)
        # the parent `documents/a` is a collection: the server refuses this target, and only it
        bad = source.watch(Query("a/b"), latest.handler("bad"))
        ended = asyncio.Event()
        failed = bad.failed

        def on_failed(error: Any) -> None:
            failed(error)
            ended.set()

        bad.failed = on_failed  # type: ignore[method-assign]
        async with asyncio.timeout(WAIT):
            await ended.wait()
        assert not bad.active and bad.error is not None and bad.error.code == 3  # INVALID_ARGUMENT
        await write(db.document("good/after").set, {"n": 1})
        await latest.until(lambda: latest.results["good"] == {"after"})
        assert good.active and good.stream is bad.stream and good.stream.restarts == 0
        assert "bad" not in latest.results
    finally:
        await source.aclose()
        db.close()


async def test_credentials_give_fresh_bearer_tokens_and_the_emulator_owner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tokens come from the credentials, refreshed before they expire (ServiceAccountTokens, as
    the Realtime Database client) and on the server's UNAUTHENTICATED; the emulator takes owner."""
    from listeners.source.access_tokens import ServiceAccountTokens

    from .test_rtdb import FakeCredentials

    monkeypatch.delenv("FIRESTORE_EMULATOR_HOST", raising=False)
    credentials = FakeCredentials()
    source = ListenSource("p", credentials=credentials)
    metadata = dict(await source._metadata(False))
    assert metadata["authorization"] == "Bearer sa-1"
    assert metadata["google-cloud-resource-prefix"] == "projects/p/databases/(default)"
    assert dict(await source._metadata(False))["authorization"] == "Bearer sa-1"  # still valid
    credentials.expiry = datetime(2000, 1, 1)
    assert dict(await source._metadata(False))["authorization"] == "Bearer sa-2"  # expiring: refreshed
    tokens = ServiceAccountTokens(FakeCredentials(), min_refresh_interval=0)
    given = ListenSource("p", tokens=tokens)
    assert dict(await given._metadata(False))["authorization"] == "Bearer sa-1"
    assert dict(await given._metadata(True))["authorization"] == "Bearer sa-2"  # the server said no
    emulated = ListenSource("p", emulator_host="127.0.0.1:1")
    assert dict(await emulated._metadata(False))["authorization"] == "Bearer owner"


async def test_a_silent_connection_is_found_by_a_probe_and_replaced(
    emulator: FirestoreEmulator, project_id: str
) -> None:
    """The connection to Firestore goes silent without closing (a proxy stops forwarding on it;
    new connections still work): the stream's probe gets no answer, the connection is replaced
    and the watch resumes, with what was written meanwhile. gRPC's own keepalive (minutes)
    would not have noticed within the test's wait."""
    from listeners_testkit.proxy import TcpProxy

    port = int(emulator.host.rpartition(":")[2])
    with TcpProxy(port) as proxy:
        source = ListenSource(project_id, emulator_host=f"127.0.0.1:{proxy.port}", silence=1.0, answer=2.0)
        db = firestore.Client(project=project_id)
        latest = Latest()
        try:
            watch = source.watch(Query("quiet"), latest.handler("quiet"))
            await latest.until(lambda: "quiet" in latest.results)
            assert proxy.freeze() >= 1  # the open connection: silent both ways from now on
            await write(db.document("quiet/while-silent").set, {"n": 1})  # not through the proxy
            await latest.until(lambda: latest.results["quiet"] == {"while-silent"})
            (connection,) = source.pool.connections
            assert connection.generation >= 1 and watch.stream.probes >= 1 and watch.stream.restarts >= 1
        finally:
            await source.aclose()
            db.close()


async def test_a_quiet_healthy_stream_is_probed_and_kept(
    emulator: FirestoreEmulator, project_id: str
) -> None:
    """Probes on a live, quiet stream are answered: no restart, no new connection."""
    source = ListenSource(project_id, emulator_host=emulator.host, silence=0.3, answer=30.0)
    db = firestore.Client(project=project_id)
    latest = Latest()
    try:
        watch = source.watch(Query("calm"), latest.handler("calm"))
        await latest.until(lambda: "calm" in latest.results)
        async with asyncio.timeout(WAIT):
            while watch.stream.probes < 3:
                await asyncio.sleep(0.1)
        await write(db.document("calm/after-probes").set, {"n": 1})
        await latest.until(lambda: latest.results["calm"] == {"after-probes"})
        (connection,) = source.pool.connections
        assert watch.stream.restarts == 0 and connection.generation == 0
    finally:
        await source.aclose()
        db.close()
