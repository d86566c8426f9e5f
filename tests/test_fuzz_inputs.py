"""No single input stops the service: arbitrary values, bytes and strings, fed through the
real service into each of its entry points.

One service runs for the module (Google's Firestore emulator, the Realtime Database
stand-in, a real redis-server, Direct mode on a real port) on an event loop of its own
thread; hypothesis drives each entry point from this thread. After every case, an ordinary
notification of the canary user must still reach both a Redis subscriber and an open
WebSocket: if any task died, the canary stops arriving and the case fails.

`LISTENERS_FUZZ_EXAMPLES` sets the cases per entry point (a few dozen in CI); `bench/fuzz.py`
runs 10,000 per entry point outside CI and records the counts in docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import threading
import uuid
from collections import Counter
from collections.abc import Awaitable, Iterator
from concurrent.futures import Future
from datetime import UTC
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from google.cloud import firestore
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from listeners.config import FirebaseSettings, RedisSettings, Secret, Settings
from listeners.source.rtdb import RtdbClient
from listeners_testkit.auth import LocalIssuer
from listeners_testkit.processes import FirestoreEmulator, RedisServer
from listeners_testkit.rtdb_server import RtdbStandin
from tests.conftest import CONTROL_TOKEN
from tests.test_websocket import serving, ws_settings

T = TypeVar("T")
EXAMPLES = int(os.environ.get("LISTENERS_FUZZ_EXAMPLES", "15"))
REPORT = os.environ.get("LISTENERS_FUZZ_REPORT")  # a JSON file of counts, for bench/fuzz.py
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,  # every run explores afresh; failures print their reproducing example
    # No shrinking: each step replays through the whole service, and the first failing case
    # is small already (a handful of fields).
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
COMPANY = "acme"
THREAD = f"{COMPANY}/chats/t1/messages"

# -- what outside input can be -----------------------------------------------------------

lone_surrogates = st.sampled_from(["\udcff", "\ud800", "a\udfffb"])
texts = st.one_of(st.text(max_size=40), lone_surrogates, st.sampled_from(["", ":", "a:b", "\x00", "é" * 300]))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
    st.sampled_from([1e20, -1, 0, "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
# Firestore holds no lone surrogate (its client cannot encode one), but a string field may hold
# JSON text with an escaped one, as additional_info does: json.dumps escapes them.
safe_texts = st.text(max_size=40)
firestore_scalars = st.one_of(
    scalars.filter(lambda v: not isinstance(v, str)),
    safe_texts,
    json_values.map(json.dumps),
    st.datetimes(timezones=st.just(UTC)),
)
firestore_values = st.recursive(
    firestore_scalars,
    lambda inner: (
        st.lists(firestore_scalars, max_size=4) | st.dictionaries(safe_texts.filter(bool), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "status", "heartbeat_at", "ttl_seconds", "authorized_companies_ids", "chat_threads", "instance_id",
    "job_id", "file_id", "file_name", "collection_id", "collection_name", "function_name",
    "timestamp", "read", "additional_info", "message", "sender_id",
]  # fmt: skip
documents = st.dictionaries(
    st.one_of(st.sampled_from(FIELDS), safe_texts.filter(bool)), firestore_values, max_size=8
)
deep = st.integers(min_value=30, max_value=3000).map(lambda n: "[" * n + "]" * n)
raw_bytes = st.one_of(
    st.binary(max_size=200),
    texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
    deep.map(str.encode),
    st.sampled_from([b"\xff\xfe", b'{"uid":"\\udcff","type":"resync"}', b"null", b"{}"]),
)


# -- the service under test, on a loop of its own ----------------------------------------


@dataclasses.dataclass
class Canary:
    """Where the ordinary write must keep arriving: a Redis subscriber and a WebSocket."""

    redis_seen: set[str] = dataclasses.field(default_factory=set)
    socket_seen: set[str] = dataclasses.field(default_factory=set)
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class Harness:
    def __init__(self, redis_server: RedisServer, emulator: FirestoreEmulator, standin: RtdbStandin) -> None:
        self.redis_server, self.emulator, self.standin = redis_server, emulator, standin
        self.project = f"fuzz-{uuid.uuid4().hex[:10]}"
        self.ns = f"fuzz-{uuid.uuid4().hex[:10]}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-service", daemon=True)
        self.db = firestore.Client(project=self.project)
        self.issuer = LocalIssuer(self.project)
        self.counts: Counter[str] = Counter()
        self.canary = Canary()
        self.n = 0
        self._stop: asyncio.Event | None = None
        self._served: Future[None] | None = None
        self._ready = threading.Event()

    def run(self, work: Awaitable[T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(_awaited(work), self.loop).result(timeout)

    def start(self) -> None:
        self.thread.start()
        self.certs_url = self.issuer.serve()
        self._served = asyncio.run_coroutine_threadsafe(self._serve(), self.loop)
        if not self._ready.wait(120):
            raise TimeoutError("the fuzzed service did not start")

    def settings(self) -> Settings:
        base = Settings(
            redis=RedisSettings(
                host="127.0.0.1", port=self.redis_server.port, control_token=Secret(CONTROL_TOKEN)
            ),
            firebase=FirebaseSettings(
                project_id=self.project,
                emulator_host=self.emulator.host,
                database_url=f"https://{self.ns}.firebaseio.com",
                database_emulator_host=f"127.0.0.1:{self.standin.port}",
            ),
            sweep_interval_seconds=0.2,
            instance_id="fuzz",
        )
        # Every example connects from 127.0.0.1, half of them without a token in the upgrade.
        return ws_settings(
            base, self.certs_url, first_message_auth_origins=("*",),
            handshakes_per_second_per_address=10_000, handshake_burst_per_address=1_000_000,
        )  # fmt: skip

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self.redis = aioredis.Redis(host="127.0.0.1", port=self.redis_server.port)
        self.rtdb = RtdbClient(self.standin.url, namespace=self.ns, tokens=_owner)
        async with serving(self.settings()) as (url, _app):
            self.url = url
            pubsub = self.redis.pubsub()
            await pubsub.subscribe("user:canary")
            reader = asyncio.create_task(self._read_redis(pubsub))
            await self.online("canary")
            await self.online("victim", threads=True)
            async with (
                connect(f"{url}?token={self.issuer.mint('canary')}") as canary_ws,
                connect(f"{url}?token={self.issuer.mint('victim')}") as victim_ws,
            ):
                self.victim_ws = victim_ws
                self.victim_received: list[str] = []
                sockets = [
                    asyncio.create_task(self._read_socket(canary_ws, self.canary.socket_seen)),
                    asyncio.create_task(self._read_victim(victim_ws)),
                ]
                self._ready.set()
                await self._stop.wait()
                for task in [*sockets, reader]:
                    task.cancel()
            await pubsub.aclose()
        await self.rtdb.aclose()
        await self.redis.aclose()

    async def online(self, uid: str, threads: bool = False) -> None:
        entry: dict[str, Any] = {
            "status": "online",
            "heartbeat_at": firestore.SERVER_TIMESTAMP,
            "ttl_seconds": 86_400,
            "authorized_companies_ids": [COMPANY],
        }
        if threads:
            entry["chat_threads"] = [{"space_code": COMPANY, "thread_key": "t1", "mode": "chats"}]
        await asyncio.to_thread(self.db.document(f"listeners_registry/{uid}").set, entry)

    async def _read_redis(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                self._saw(json.loads(message["data"]), self.canary.redis_seen)

    async def _read_socket(self, ws: ClientConnection, seen: set[str]) -> None:
        async for text in ws:
            self._saw(json.loads(text), seen)

    async def _read_victim(self, ws: ClientConnection) -> None:
        async for text in ws:
            self.victim_received.append(str(text))

    def _saw(self, event: dict[str, Any], seen: set[str]) -> None:
        if event.get("type") == "notif.add":
            seen.add(str(event["payload"].get("doc_id")))
            self.canary.changed.set()

    async def alive(self) -> None:
        """The ordinary write: a canary notification reaches Redis and the open socket."""
        self.n += 1
        doc_id = f"canary-{self.n}"
        await asyncio.to_thread(
            self.db.document(f"clients/canary/notifications/{doc_id}").set,
            {
                "job_id": doc_id,
                "file_name": "ok.pdf",
                "status": "completed",
                "read": False,
                "collection_id": COMPANY,
            },
        )
        async with asyncio.timeout(30):
            while doc_id not in self.canary.redis_seen or doc_id not in self.canary.socket_seen:
                self.canary.changed.clear()
                await self.canary.changed.wait()
        # keep the canary's list short: its next sync stays small whatever the case count
        await asyncio.to_thread(self.db.document(f"clients/canary/notifications/{doc_id}").delete)

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._served is not None:
            with contextlib.suppress(Exception):
                self._served.result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.issuer.close()
        self.db.close()
        if REPORT:
            Path(REPORT).write_text(json.dumps({"examples_per_entry_point": EXAMPLES, **self.counts}))

    def case(self, entry_point: str, work: Awaitable[object]) -> None:
        """One case: feed it, then the ordinary write must still arrive."""
        try:
            self.run(work)
        except Exception as exc:  # refused before it reached us (Firestore said no): still a case
            self.counts[f"{entry_point}: refused upstream ({type(exc).__name__})"] += 1
        self.counts[entry_point] += 1
        self.run(self.alive())


async def _awaited(work: Awaitable[T]) -> T:
    return await work


async def _owner(*, refresh: bool = False) -> str:
    return "owner"


@pytest.fixture(scope="module")
def harness(redis_server: RedisServer, emulator: FirestoreEmulator) -> Iterator[Harness]:
    with RtdbStandin(keepalive=1.0, token="owner") as standin:
        harness = Harness(redis_server, emulator, standin)
        harness.start()
        try:
            yield harness
        finally:
            harness.stop()


# -- one test per entry point -------------------------------------------------------------

POOL = [f"fz{n}" for n in range(6)]  # a bounded set of document ids: state stays small


@FUZZ
@example(uid="fz1", data={"status": "online", "heartbeat_at": "2025-01-01T00:00:00Z", "ttl_seconds": 1e20})
@example(uid="fz1", data={"status": "online", "heartbeat_at": "9999-12-31T23:59:59Z", "ttl_seconds": 90})
@example(uid="fz1", data={"status": "online", "heartbeat_at": "2025-01-01T00:00:00Z", "chat_threads": [{}]})
@given(uid=st.sampled_from(POOL), data=documents)
def test_registry_document(harness: Harness, uid: str, data: dict[str, Any]) -> None:
    harness.case(
        "registry document", asyncio.to_thread(harness.db.document(f"listeners_registry/{uid}").set, data)
    )


@FUZZ
@example(doc_id="fz1", data={"additional_info": '{"message": "\\udcff"}', "job_id": "x"}, ours=True)
@example(doc_id="fz1", data={"timestamp": float("nan"), "additional_info": "[" * 3000}, ours=True)
@given(doc_id=st.sampled_from(POOL), data=documents, ours=st.booleans())
def test_notification_document(harness: Harness, doc_id: str, data: dict[str, Any], ours: bool) -> None:
    if ours:  # unread and of the victim's company: it passes the query and the filter, and is published
        data = {**data, "collection_id": COMPANY, "read": False}
    document = harness.db.document(f"clients/victim/notifications/{doc_id}")
    harness.case("notification document", asyncio.to_thread(document.set, data))


@FUZZ
@given(key=st.sampled_from(POOL), value=json_values, chat=st.booleans())
def test_realtime_database_node(harness: Harness, key: str, value: Any, chat: bool) -> None:
    path = f"{THREAD}/{key}" if chat else f"clients/victim/direct_message_notif/{key}"
    harness.case("realtime database node", harness.rtdb.set(path, _rtdb_safe(value)))


@FUZZ
@example(event="put", raw=b'{"path": "/", "data": {"x": "\\udcff"}}', chat=False)
@example(event="patch", raw=b"[" * 3000, chat=True)
@given(event=st.sampled_from(["put", "patch"]), raw=raw_bytes, chat=st.booleans())
def test_realtime_database_event(harness: Harness, event: str, raw: bytes, chat: bool) -> None:
    path = THREAD if chat else "clients/victim/direct_message_notif"
    harness.case("realtime database event", harness.standin.inject(path, event, raw, ns=harness.ns))


@FUZZ
@example(raw=b"\xff\xfe", authenticated=True, as_text=False)
@example(raw=b'{"type": "chat.subscribe", "space_code": "\\ud800", "thread_key": "t", "mode": "chats"}',
         authenticated=True, as_text=True)  # fmt: skip
@given(raw=raw_bytes, authenticated=st.booleans(), as_text=st.booleans())
def test_websocket_frame(harness: Harness, raw: bytes, authenticated: bool, as_text: bool) -> None:
    async def send() -> None:
        url = f"{harness.url}?token={harness.issuer.mint('fuzzer')}" if authenticated else harness.url
        async with connect(url, open_timeout=30) as ws:
            frame = raw.decode("utf-8", "replace") if as_text else raw
            with contextlib.suppress(ConnectionClosed):  # closing the socket is the service's right
                await ws.send(frame)
                await ws.send(json.dumps({"type": "ping"}))
                async with asyncio.timeout(30):  # answered (the pong) or closed, never ignored
                    async for text in ws:
                        if '"pong"' in str(text):
                            break

    harness.case("websocket frame", send())


@FUZZ
@example(raw=b"[" * 3000 + b"]" * 3000)
@example(raw=b'{"type": "resync", "uid": "\\udcff", "ts": 1, "nonce": "n", "sig": "x"}')
@given(raw=raw_bytes)
def test_control_message(harness: Harness, raw: bytes) -> None:
    harness.case("control message", harness.redis.publish("listeners:control", raw))


@FUZZ
@example(raw=b"\xff\xfe not UTF-8")
@example(raw=b'{"type": "notif.add", "uid": "someone-else", "event_id": "e", "payload": {}}')
@given(raw=raw_bytes)
def test_hub_channel_message(harness: Harness, raw: bytes) -> None:
    harness.case("hub channel message", harness.redis.publish("user:victim", raw))
    # the hub forwards only valid envelopes of the socket's own user
    for text in harness.victim_received:
        event = json.loads(text)
        assert isinstance(event, dict) and event.get("uid", "victim") == "victim", text[:200]


def _rtdb_safe(value: Any) -> Any:
    """What the Realtime Database can hold: keys without . # $ [ ] / and not empty; no NaN."""
    if isinstance(value, dict):
        return {
            (k.translate(str.maketrans("", "", ".#$[]/")) or "_"): _rtdb_safe(v) for k, v in value.items()
        } or None
    if isinstance(value, list):
        return [_rtdb_safe(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value
