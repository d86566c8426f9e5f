"""The fault lab: Redis, the Firestore emulator and the Realtime Database stand-in behind links
that can be blackholed, cut, slowed or made lossy, with users online, writes flowing, and the
consumers compared with the database truth.

Each dependency runs in a network namespace of its own (`listeners_testkit.netns`: a veth pair,
a private /30 in 10.215.0.0/16) where `ip netns` works, and always behind a `TcpProxy` on
loopback, in a process of its own (`ProxyProcess`), which is what the services and consumers
connect to:

    service ──► 127.0.0.1:proxy ──► 10.215.N.2:port (inside lsn15-…) ──► redis-server

- blackhole: the namespace's inner veth end set down (packets dropped both ways, SYNs too);
  without namespaces, the proxy's blackhole (every connection frozen, new ones held);
- cut: the proxy resets every connection (RST both ways), then a blackhole;
- delay/loss: `tc netem` where the kernel has it; where it has not (a Firecracker VM has no
  sch_netem), the proxy's `shape` (each chunk delayed, a "lost" one held one RTO more, as TCP
  stalls on a lost segment). Which one ran is reported.
- restart: the process stopped (SIGTERM) and started again on the same address; Redis, the
  emulator and the stand-in keep nothing in memory across it, as after a failover to an
  empty replica.

Traffic stays on this machine: loopback and the namespaces the lab creates; everything it
makes (processes by pid, proxies, namespaces) is removed when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import psutil
from google.api_core import exceptions as gexc
from google.cloud import firestore

from bench.browsers import Browsers
from bench.cluster import ADMIN_TOKEN, CONTROL_TOKEN, Instance
from bench.rtdb import message as dm_message
from listeners.config import TARGETS_PER_STREAM, RedisSettings, Secret
from listeners_bridge import Bridge
from listeners_bridge.consumer import _Reader
from listeners_bridge.events import POSITION_TYPES, stream_of
from listeners_bridge.ordering import Verdict
from listeners_bridge.reducers import ChatThreads, DirectMessages, Notifications
from listeners_bridge.registry import ChatThread
from listeners_testkit import netns
from listeners_testkit.documents import WEEK, a_day_from_now, notification_data, write_online
from listeners_testkit.processes import NPM, FirestoreEmulator, RedisServer, _Child, emulator_kind
from listeners_testkit.proxy import ProxyProcess
from listeners_testkit.rtdb_server import RtdbStandin

__all__ = ["ADMIN_TOKEN", "Consumer", "Lab", "Monitor", "Positions", "Writer", "is_position", "log"]


def log(text: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {text}", file=sys.stderr, flush=True)


# -- the dependencies, each behind a link -------------------------------------------------------


def _inside(child: _Child, ns: netns.Namespace | None, command: list[str]) -> list[str]:
    if ns is None:
        return command
    return ns.command([part.replace("127.0.0.1", ns.address) for part in command])


class _Redis(RedisServer):
    def __init__(self, ns: netns.Namespace | None) -> None:
        super().__init__()
        self.ns = ns
        self.listen_host = ns.address if ns else "127.0.0.1"

    def command(self) -> list[str]:
        extra = ["--protected-mode", "no"] if self.ns else []
        return _inside(self, self.ns, super().command() + extra)


class _Emulator(FirestoreEmulator):
    def __init__(self, ns: netns.Namespace | None) -> None:
        super().__init__()
        self.ns = ns
        self.listen_host = ns.address if ns else "127.0.0.1"

    def command(self) -> list[str]:
        return _inside(self, self.ns, super().command())


class _Standin(RtdbStandin):
    def __init__(self, ns: netns.Namespace | None) -> None:
        super().__init__(keepalive=10.0)
        self.ns = ns
        self.listen_host = ns.address if ns else "127.0.0.1"

    def command(self) -> list[str]:
        return _inside(self, self.ns, [*super().command(), "--host", "127.0.0.1"])

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.port}"  # the hooks bypass the link


@dataclass
class Dependency:
    """One dependency: its process, its namespace (or None), and two proxies in front of it:
    `proxy`, which the consumers, the writers and the truth reader use, and `service_proxy`,
    the service instances' own link, so that a fault can hit the services' link alone (a
    half-open that only the service's connections see, as when a NAT in front of it drops its
    connection state)."""

    name: str
    child: _Child
    ns: netns.Namespace | None
    proxy: ProxyProcess
    service_proxy: ProxyProcess
    netem: bool

    @property
    def port(self) -> int:
        """Where the consumers and writers connect: their proxy, on 127.0.0.1."""
        return self.proxy.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"

    @property
    def service_port(self) -> int:
        """Where the service instances connect: their own proxy, on 127.0.0.1."""
        return self.service_proxy.port

    @property
    def service_address(self) -> str:
        return f"127.0.0.1:{self.service_proxy.port}"

    @property
    def proxies(self) -> tuple[ProxyProcess, ProxyProcess]:
        return self.proxy, self.service_proxy

    @property
    def mechanism(self) -> str:
        return "netns" if self.ns else "proxy"

    def blackhole(self) -> str:
        """The whole path dead, for everyone."""
        if self.ns is not None:
            self.ns.blackhole()
            return "veth down in a netns"
        for proxy in self.proxies:
            proxy.blackhole()
        return "proxy blackhole"

    def cut(self) -> str:
        for proxy in self.proxies:
            proxy.reset()
        return "proxy RST + " + self.blackhole()

    def halfopen_service(self) -> str:
        """The services' link alone goes half-open: every connection on it frozen (bytes
        accepted, nothing forwarded either way, nothing closed), new ones accepted and held.
        The consumers' and writers' link keeps working."""
        self.service_proxy.blackhole()
        return "the service's link half-open (its proxy: connections frozen, new ones held)"

    def reset_service(self) -> int:
        """Every connection on the services' link reset (RST to both ends: SO_LINGER 0), then
        the link forwards again; how many were reset."""
        reset = self.service_proxy.reset()
        self.service_proxy.thaw()
        return reset

    def shape(self, delay: float, loss: float) -> str:
        if self.ns is not None and self.netem:
            self.ns.shape(delay * 1000, loss * 100)
            return "tc netem"
        for proxy in self.proxies:
            proxy.shape(delay, loss)
        return "proxy shaping (no netem in this kernel)" if self.ns else "proxy shaping"

    def heal(self) -> None:
        if self.ns is not None:
            self.ns.heal()
        for proxy in self.proxies:
            proxy.thaw()
            proxy.shape(0.0, 0.0)

    def stop(self) -> None:
        self.child.stop()

    def start(self) -> None:
        self.child.start()

    def restart(self) -> None:
        self.child.stop()
        self.child.start()


class Lab:
    """Redis, the emulator and the stand-in, each behind its link; `use_netns=None`: where
    available."""

    def __init__(self, use_netns: bool | None = None) -> None:
        ok, why = netns.available()
        if use_netns and not ok:
            raise RuntimeError(f"network namespaces asked for but unavailable: {why}")
        self.use_netns = ok if use_netns is None else use_netns
        self.why_no_netns = "" if self.use_netns else (why or "not asked for")
        self.netem = self.use_netns and netns.netem_available()
        self.dependencies: list[Dependency] = []
        self.kind = emulator_kind()

    def _add(self, name: str, make: Callable[[netns.Namespace | None], _Child]) -> Dependency:
        ns = netns.Namespace.create(name) if self.use_netns else None
        proxies: list[ProxyProcess] = []
        try:
            child = make(ns)
            child.start()
            for _ in range(2):  # the consumers' and writers' link, and the services' own
                proxies.append(ProxyProcess(child.port, child.listen_host).start())
        except BaseException:
            for made in proxies:
                with contextlib.suppress(Exception):
                    made.close()
            if ns is not None:
                ns.close()
            raise
        dependency = Dependency(name, child, ns, proxies[0], proxies[1], self.netem)
        self.dependencies.append(dependency)
        return dependency

    def __enter__(self) -> Self:
        try:
            self.redis = self._add("redis", _Redis)
            self.firestore = self._add("firestore", _Emulator)
            self.rtdb = self._add("rtdb", _Standin)
        except BaseException:
            self.close()
            raise
        # The SDK clients made here (writers, truth) find the emulator through the environment;
        # what was there before comes back in close().
        self._saved_emulator_host = os.environ.get("FIRESTORE_EMULATOR_HOST")
        os.environ["FIRESTORE_EMULATOR_HOST"] = self.firestore.address
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        saved = getattr(self, "_saved_emulator_host", None)
        if saved is not None:
            os.environ["FIRESTORE_EMULATOR_HOST"] = saved
        elif hasattr(self, "_saved_emulator_host"):
            os.environ.pop("FIRESTORE_EMULATOR_HOST", None)
        for dependency in reversed(self.dependencies):
            for proxy in dependency.proxies:
                with contextlib.suppress(Exception):
                    proxy.close()
            with contextlib.suppress(Exception):
                dependency.child.stop()
            dependency.child.cleanup()
            if dependency.ns is not None:
                dependency.ns.close()
        self.dependencies.clear()

    def describe(self) -> str:
        links = (
            "each dependency in its own network namespace (veth pair, 10.215.0.0/16), behind a "
            "TCP proxy on loopback (a process each; the services have proxies of their own)"
            if self.use_netns
            else "each dependency behind a TCP proxy on loopback (a process each; the services have "
            f"proxies of their own; no namespaces: {self.why_no_netns})"
        )
        shaping = "tc netem" if self.netem else "the proxy's shaping (this kernel has no netem)"
        return f"{links}; latency and loss by {shaping}; {FirestoreEmulator.describe(self.kind)}"

    @property
    def standin(self) -> _Standin:
        child = self.rtdb.child
        assert isinstance(child, _Standin)
        return child

    def service_env(self, rtdb_ns: str) -> dict[str, str]:
        env = {
            "FIREBASE_DATABASE_EMULATOR_HOST": self.rtdb.service_address,
            "FIREBASE_REALTIME_DB_URL": f"https://{rtdb_ns}.firebaseio.com",
            "LISTENERS_FIRESTORE_TARGETS_PER_STREAM": str(1 if self.kind == NPM else TARGETS_PER_STREAM),
        }
        return env

    def instance(self, instance_id: str, project: str, rtdb_ns: str, logs: Path, **extra: str) -> Instance:
        env = {**self.service_env(rtdb_ns), **extra}
        return Instance(
            instance_id, self.redis.service_port, self.firestore.service_address, project, logs, env
        )

    def redis_settings(self) -> RedisSettings:
        return RedisSettings(host="127.0.0.1", port=self.redis.port, control_token=Secret(CONTROL_TOKEN))


# -- the consumer: the bridge's reducers, one iterator per user -----------------------------------


@dataclass
class UserView:
    notifications: Notifications = field(default_factory=Notifications)
    messages: DirectMessages = field(default_factory=DirectMessages)
    chat: ChatThreads = field(default_factory=ChatThreads)
    synced: set[str] = field(default_factory=set)  # "notif", "msg"
    event_ids: dict[str, str] = field(default_factory=dict)  # event id -> how it was first seen
    # Per stream family, the events applied since its last sync: the state they changed.
    since_sync: dict[str, set[str]] = field(default_factory=dict)
    trail: list[str] = field(default_factory=list)  # the last events, to explain a duplicate


def is_position(event: Any) -> bool:
    """A tail position (`notif.position`, `msg.position`, `chat.position`): where a stream
    stands after it has been quiet, never a change (docs/events.md)."""
    return isinstance(event, Mapping) and event.get("type") in POSITION_TYPES


@dataclass
class Positions:
    """The tail positions one consumer was given, and those that showed it a gap: a position
    ahead of what it held, because the stream's last events never reached it."""

    seen: int = 0
    gaps: int = 0
    gap_examples: list[str] = field(default_factory=list)  # the first few
    applied: int = 0  # handed on as a change: must stay 0
    # Seconds from the receipt of a stream's last event to the receipt of its position (the
    # service sends it once the stream has been quiet about 2 s): how late a lost tail is seen.
    delays: list[float] = field(default_factory=list)
    last_event: dict[tuple[str, str], float] = field(default_factory=dict)  # (uid, stream) -> when

    def event(self, uid: str, event: Mapping[str, Any]) -> None:
        self.last_event[(uid, stream_of(event))] = time.monotonic()

    def count(self, uid: str, event: dict[str, Any], gap: bool, held: Any) -> None:
        self.seen += 1
        last = self.last_event.get((uid, stream_of(event)))
        if last is not None:
            self.delays.append(time.monotonic() - last)
        if gap:
            self.gaps += 1
            if len(self.gap_examples) < 5:
                self.gap_examples.append(
                    f"{uid}: {event.get('type')} {event.get('epoch')}:{event.get('seq')} while holding {held}"
                )


class _RecordingBridge(Bridge):
    """The bridge, noting when its connection was (re)made, and the tail positions its order
    rules saw (never handed on: they are not changes)."""

    def __init__(self, settings: RedisSettings) -> None:
        super().__init__(settings)
        self.connects: list[float] = []
        self.positions = Positions()

    def _on_connect(self, reconnected: bool) -> None:
        self.connects.append(time.monotonic())
        super()._on_connect(reconnected)

    async def _join(self, reader: _Reader) -> None:
        # Every event of this reader goes through its ordering's verdict: count positions there.
        ordering = reader.follower.ordering
        admit = ordering.admit

        def admit_counting(event: Mapping[str, Any]) -> Verdict:
            if not is_position(event):
                self.positions.event(reader.uid, event)
                return admit(event)
            held = ordering.position(stream_of(event))
            verdict = admit(event)
            self.positions.count(reader.uid, dict(event), verdict is Verdict.GAP, held)
            return verdict

        ordering.admit = admit_counting  # type: ignore[method-assign]
        await super()._join(reader)


class Consumer:
    """One Bridge (one Redis connection) and an `events()` iterator per user, feeding the
    reducers; what each write's first sighting was (for latency), and duplicates seen."""

    def __init__(self, settings: RedisSettings, uids: list[str], chat_uids: Iterable[str] = ()) -> None:
        self.bridge = _RecordingBridge(settings)
        self.views = {uid: UserView() for uid in uids}
        self.chat_uids = set(chat_uids)
        self.seen: dict[str, float] = {}  # item key (notif/msg doc id) -> first sighting
        # An event applied twice to the same state: twice since the last sync of its stream.
        self.duplicates = 0
        self.duplicate_examples: list[str] = []  # the first few, each with what came before it
        # Seen before, but before a sync that replaced the state (another instance's, in a
        # handover, made before it saw the change): applied again to that state, as it must be.
        self.reapplied = 0
        self.events: Counter[str] = Counter()
        self.tasks: list[asyncio.Task[None]] = []
        self.changed = asyncio.Event()

    async def start(self) -> None:
        self.tasks = [asyncio.create_task(self._follow(uid)) for uid in self.views]

    async def _follow(self, uid: str) -> None:
        view = self.views[uid]
        threads = [chat_thread(uid)] if uid in self.chat_uids else []
        async for event in self.bridge.events(uid, threads):
            now = time.monotonic()
            kind, payload = event["type"], event["payload"]
            if is_position(event):  # never a change: neither delivered nor a duplicate
                self.bridge.positions.applied += 1
                continue
            self.events[kind] += 1
            family = kind.split(".")[0]
            sighting = f"{kind} {event.get('epoch', '')}:{event.get('seq', '')} {event['event_id'][:24]}"
            applied = view.since_sync.setdefault(family, set())
            if kind.endswith(".sync"):
                applied.clear()
            elif event["event_id"] in view.event_ids and event["event_id"] not in applied:
                self.reapplied += 1
            elif event["event_id"] in applied:
                self.duplicates += 1
                if len(self.duplicate_examples) < 5:
                    first = view.event_ids[event["event_id"]]
                    self.duplicate_examples.append(
                        f"{uid}: {sighting} (first: {first}; between: {' | '.join(view.trail[-6:])})"
                    )
            view.event_ids.setdefault(event["event_id"], sighting)
            if not kind.endswith(".sync"):
                applied.add(event["event_id"])
            view.trail = [*view.trail[-7:], sighting]
            if kind == "notif.sync":
                items = payload.get("notifications", [])
            elif kind == "msg.sync":
                items = payload.get("messages", [])
            elif family == "chat":
                items = [
                    {"doc_id": m["id"]}
                    for m in payload.get("raw_messages", [])
                    if isinstance(m, dict) and "id" in m
                ]
            else:
                items = [payload]
            if kind.endswith(".sync"):
                view.synced.add(family)
            for item in items:
                if isinstance(item, dict) and "doc_id" in item:
                    self.seen.setdefault(f"{uid}/{item['doc_id']}", now)
            view.notifications.apply(event)
            view.messages.apply(event)
            view.chat.apply(event)
            self.changed.set()

    @property
    def positions(self) -> Positions:
        return self.bridge.positions

    def ready(self) -> int:
        return sum(
            1
            for uid, v in self.views.items()
            if {"notif", "msg"} <= v.synced and ("chat" in v.synced or uid not in self.chat_uids)
        )

    def chat_ids(self, uid: str) -> set[str]:
        t = chat_thread(uid)
        return {str(m["id"]) for m in self.views[uid].chat.messages(t.space_code, t.thread_key)}

    async def wait(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 0.5)
        return True

    def state(self) -> dict[str, dict[str, str]]:
        """Per user: notification doc id -> status, and DM key -> "dm"."""
        out: dict[str, dict[str, str]] = {}
        for uid, view in self.views.items():
            items = {f"n:{n['doc_id']}": str(n.get("status", "")) for n in view.notifications.items}
            items.update({f"m:{m['doc_id']}": "dm" for m in view.messages.view["messages"]})
            out[uid] = items
        return out

    async def stop(self) -> None:
        """Bounded: a run must report even if the bridge hangs while letting its channels go."""
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            _, stuck = await asyncio.wait(self.tasks, timeout=30.0)
            if stuck:
                log(f"consumer: {len(stuck)} iterators did not end within 30 s of being cancelled")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10.0):
                await self.bridge.aclose()


# -- the database truth -----------------------------------------------------------------------------


def firestore_truth(db: firestore.Client, uids: Iterable[str]) -> dict[str, dict[str, str]]:
    """Unread notifications of every user, as the service's view defines them."""
    truth: dict[str, dict[str, str]] = {uid: {} for uid in uids}
    query = db.collection_group("notifications").where(filter=firestore.FieldFilter("read", "==", False))
    for doc in query.stream(timeout=60):
        uid = doc.reference.parent.parent.id if doc.reference.parent.parent else ""
        if uid in truth:
            truth[uid][f"n:{doc.id}"] = str((doc.to_dict() or {}).get("status", ""))
    return truth


async def rtdb_truth(http: httpx.AsyncClient, ns: str) -> dict[str, set[str]]:
    response = await http.get("/clients.json", params={"ns": ns, "shallow": "false"}, timeout=60)
    response.raise_for_status()
    data = response.json() or {}
    out: dict[str, set[str]] = {}
    for uid, node in data.items():
        messages = node.get("direct_message_notif") if isinstance(node, dict) else None
        if isinstance(messages, dict):
            out[uid] = set(messages)
    return out


def compare(
    consumer: dict[str, dict[str, str]], truth: dict[str, dict[str, str]]
) -> tuple[int, int, list[str]]:
    """(items missing or stale in the consumer, items the consumer has that the truth has
    not, a few examples)."""
    missing = extra = 0
    examples: list[str] = []
    for uid, items in truth.items():
        held = consumer.get(uid, {})
        for key, value in items.items():
            if held.get(key) != value:
                missing += 1
                if len(examples) < 5:
                    examples.append(f"{uid} {key}: truth {value!r}, consumer {held.get(key)!r}")
        for key in held.keys() - items.keys():
            extra += 1
            if len(examples) < 5:
                examples.append(f"{uid} {key}: consumer has it, the database has not")
    return missing, extra, examples


# -- the writers: mixed writes at a fixed rate ------------------------------------------------------

WRITE_GIVE_UP = 240.0  # seconds a write is retried (a fault may last 60 s, a restart more)


SPACE = "c1"  # the company of every item written; the chat users have a thread open in it


def chat_thread(uid: str) -> ChatThread:
    return ChatThread(SPACE, f"thread-{uid}", "chats")


def chat_message(content: str, timestamp: str) -> dict[str, Any]:
    """A chat message node as the web app writes it."""
    return {
        "message_type": "MESSAGE",
        "content": content,
        "sender_id": "bench-sender",
        "read": False,
        "timestamp": timestamp,
    }


def registry_batch(db: firestore.Client, uids: list[str], chat_uids: Iterable[str] = ()) -> None:
    """Every user online for a day; those in `chat_uids` with one chat thread open."""
    threads = {uid: chat_thread(uid) for uid in chat_uids}
    write_online(db, uids, heartbeat=a_day_from_now(), ttl_seconds=WEEK, companies=[SPACE], threads=threads)


@dataclass
class Writes:
    sent: dict[str, float] = field(default_factory=dict)  # item key of an add -> first attempt
    # item key of an add -> when the attempt that succeeded began: a write first tried during a
    # fault and retried is timed from `sent`; from here it is timed as the service sees it
    landed: dict[str, float] = field(default_factory=dict)
    ops: Counter[str] = field(default_factory=Counter)
    failed: int = 0  # gave up after WRITE_GIVE_UP
    retried: int = 0


class Writer:
    """Notifications (add, update, read, delete) through the Firestore SDK and direct messages
    (add, read = delete) through the Realtime Database REST API, on random users, at a fixed
    rate each. An operation only touches an item whose last write has completed; a failed
    write is retried (the same write, idempotent) until it succeeds or WRITE_GIVE_UP."""

    def __init__(
        self,
        db: firestore.Client,
        http: httpx.AsyncClient,
        rtdb_ns: str,
        uids: list[str],
        notif_rate: float,
        dm_rate: float,
        seed: int = 1,
        chat_uids: Iterable[str] = (),
        chat_rate: float = 0.0,
        steady: bool = False,
    ) -> None:
        self.chat_uids, self.chat_rate = sorted(chat_uids), chat_rate
        # steady: a removal (read, delete, direct message read) goes to a user who holds an item,
        # and direct messages are added and read alike (50 % each), so as many items go as come
        # and the data the service mirrors keeps its size: a soak then measures the service's
        # memory, not the growth of the data. Otherwise (the scenarios) a random user, and an
        # add when that user holds nothing, so the data grows.
        self.steady = steady
        self.chats: dict[str, set[str]] = {uid: set() for uid in self.chat_uids}  # push ids written
        self.chat_prefilled: dict[str, int] = {}  # messages a thread had before (`prefill`)
        self.db, self.http, self.ns, self.uids = db, http, rtdb_ns, uids
        self.notif_rate, self.dm_rate = notif_rate, dm_rate
        self.rng = random.Random(seed)
        self.pool = ThreadPoolExecutor(24, thread_name_prefix="fault-write")
        self.unread: dict[str, set[str]] = {uid: set() for uid in uids}
        self.dms: dict[str, set[str]] = {uid: set() for uid in uids}
        self.busy: set[str] = set()
        self.writes = Writes()
        self.inflight: set[asyncio.Task[None]] = set()
        self.numbers = iter(range(10**9))
        self.paused = False

    def forget_firestore(self) -> None:
        """The emulator restarted empty: no notification exists any more."""
        for docs in self.unread.values():
            docs.clear()

    async def run(self) -> None:
        await asyncio.gather(
            self._loop(self.notif_rate, self._notification),
            self._loop(self.dm_rate, self._dm),
            self._loop(self.chat_rate if self.chat_uids else 0.0, self._chat),
        )

    async def _loop(self, rate: float, op: Callable[[], asyncio.Task[None] | None]) -> None:
        if rate <= 0:
            return
        began, i = time.monotonic(), 0
        while True:
            i += 1
            await asyncio.sleep(max(0.0, began + i / rate - time.monotonic()))
            if not self.paused:
                task = op()
                if task is not None:
                    self.inflight.add(task)
                    task.add_done_callback(self.inflight.discard)

    async def drain(self, timeout: float) -> None:
        if self.inflight:
            await asyncio.wait(set(self.inflight), timeout=timeout)

    def _holder(self, items: dict[str, set[str]]) -> str:
        holders = [uid for uid in self.uids if items[uid] - self.busy]
        return self.rng.choice(holders or self.uids)

    def _notification(self) -> asyncio.Task[None] | None:
        if self.steady:
            roll = self.rng.random()
            uid = self.rng.choice(self.uids) if roll < 0.4 else self._holder(self.unread)
        else:
            uid = self.rng.choice(self.uids)
            roll = self.rng.random()
        ready = sorted(self.unread[uid] - self.busy)
        if not ready or roll < 0.4:
            doc_id = f"n{next(self.numbers):07d}"
            return self._start("add", doc_id, self._add_notification(uid, doc_id))
        doc_id = self.rng.choice(ready)
        if roll < 0.6:
            return self._start(
                "update", doc_id, self._update_notification(uid, doc_id, {"status": f"s{roll:.3f}"})
            )
        if roll < 0.8:
            return self._start(
                "read", doc_id, self._update_notification(uid, doc_id, {"read": True}, unread=False)
            )
        return self._start("delete", doc_id, self._delete_notification(uid, doc_id))

    def _dm(self) -> asyncio.Task[None] | None:
        if self.steady:
            adding = self.rng.random() < 0.5
            uid = self.rng.choice(self.uids) if adding else self._holder(self.dms)
        else:
            uid = self.rng.choice(self.uids)
        ready = sorted(self.dms[uid] - self.busy)
        if not ready or (adding if self.steady else self.rng.random() < 0.6):
            key = f"m{next(self.numbers):07d}"
            return self._start("dm add", key, self._add_dm(uid, key))
        key = self.rng.choice(ready)
        return self._start("dm read", key, self._delete_dm(uid, key))

    async def prefill(self, notifications: int, messages: int, chat: int) -> int:
        """Before the services start: `notifications` unread notifications and `messages` direct
        messages for every user, and `chat` messages on each chat thread (the service's window
        full), written in bulk and not timed. Returns the number of items written."""
        notes = [(uid, f"n{next(self.numbers):07d}") for uid in self.uids for _ in range(notifications)]

        def write_notifications() -> None:
            for i in range(0, len(notes), 500):
                batch = self.db.batch()
                for uid, doc_id in notes[i : i + 500]:
                    ref = self.db.document(f"clients/{uid}/notifications/{doc_id}")
                    batch.set(ref, notification_data(doc_id))
                batch.commit(timeout=60)

        await asyncio.to_thread(write_notifications)
        for uid, doc_id in notes:
            self.unread[uid].add(doc_id)
        limit = asyncio.Semaphore(16)

        async def patch(path: str, body: dict[str, Any]) -> None:
            async with limit:
                await self._write("PATCH", path, body, timeout=60)

        now = datetime.now(UTC).isoformat()  # the chat windows' messages
        patches = []
        for uid in self.uids:
            keys = [f"m{next(self.numbers):07d}" for _ in range(messages)]
            self.dms[uid].update(keys)
            body: dict[str, Any] = {key: dm_message(key) for key in keys}
            if body:
                patches.append(patch(f"/clients/{uid}/direct_message_notif", body))
        for uid in self.chat_uids:
            t = chat_thread(uid)
            keys = [f"-c{next(self.numbers):010d}" for _ in range(chat)]
            # not in `chats`: a chat.sync carries only the 50 most recent unread of a window, so
            # these are not all delivered; what the soak checks is every message written live
            self.chat_prefilled[uid] = len(keys)
            body = {key: chat_message(f"message {key}", now) for key in keys}
            if body:
                patches.append(patch(f"/{t.space_code}/{t.mode}/{t.thread_key}/messages", body))
        await asyncio.gather(*patches)
        return len(notes) + messages * len(self.uids) + chat * len(self.chat_uids)

    def _chat(self) -> asyncio.Task[None] | None:
        uid = self.rng.choice(self.chat_uids)
        n = next(self.numbers)
        return self._start("chat", f"c{n}", self._add_chat(uid, n))

    async def _add_chat(self, uid: str, n: int) -> None:
        t = chat_thread(uid)
        body = chat_message(f"message {n}", datetime.now(UTC).isoformat())
        # A name chosen here (as a push id would be: sorted by creation), so a retried write
        # is the same write.
        key = f"-c{n:010d}"
        self.writes.sent[f"{uid}/{key}"] = time.monotonic()

        async def put() -> None:
            await self._write("PUT", f"/{t.space_code}/{t.mode}/{t.thread_key}/messages/{key}", body)

        if await self._retry(put, is_async=True, key=f"{uid}/{key}"):
            self.chats[uid].add(key)

    def _start(self, kind: str, key: str, work: Any) -> asyncio.Task[None]:
        self.busy.add(key)
        self.writes.ops[kind] += 1

        async def run() -> None:
            try:
                await work
            finally:
                self.busy.discard(key)

        return asyncio.create_task(run())

    async def _retry(self, call: Callable[[], Any], is_async: bool = False, key: str = "") -> bool:
        """True once done; False after WRITE_GIVE_UP. NotFound counts as done (the item is gone:
        an emulator restarted empty). `key`: an add's item, whose successful attempt is timed."""
        deadline, delay = time.monotonic() + WRITE_GIVE_UP, 0.2
        loop = asyncio.get_running_loop()
        while True:
            attempt = time.monotonic()
            try:
                if is_async:
                    await call()
                else:
                    await loop.run_in_executor(self.pool, call)
                if key:
                    self.writes.landed[key] = attempt
                return True
            except gexc.NotFound:
                return True
            except (gexc.GoogleAPICallError, gexc.RetryError, httpx.HTTPError, OSError, TimeoutError):
                pass
            except Exception as exc:  # grpc may raise its own on a cut: retried the same
                if "grpc" not in type(exc).__module__:
                    raise
            if time.monotonic() > deadline:
                self.writes.failed += 1
                return False
            self.writes.retried += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _add_notification(self, uid: str, doc_id: str, track: bool = True) -> None:
        data = notification_data(doc_id)
        ref = self.db.document(f"clients/{uid}/notifications/{doc_id}")
        self.writes.sent[f"{uid}/{doc_id}"] = time.monotonic()
        if await self._retry(lambda: ref.set(data, retry=None, timeout=10), key=f"{uid}/{doc_id}") and track:
            self.unread[uid].add(doc_id)

    async def _update_notification(
        self, uid: str, doc_id: str, fields: dict[str, Any], unread: bool = True
    ) -> None:
        ref = self.db.document(f"clients/{uid}/notifications/{doc_id}")
        await self._retry(lambda: ref.update(fields, retry=None, timeout=10))
        if not unread:
            self.unread[uid].discard(doc_id)

    async def _delete_notification(self, uid: str, doc_id: str) -> None:
        ref = self.db.document(f"clients/{uid}/notifications/{doc_id}")
        await self._retry(lambda: ref.delete(retry=None, timeout=10))
        self.unread[uid].discard(doc_id)

    async def _add_dm(self, uid: str, key: str, track: bool = True) -> None:
        body = dm_message(key)
        self.writes.sent[f"{uid}/{key}"] = time.monotonic()

        async def put() -> None:
            await self._write("PUT", f"/clients/{uid}/direct_message_notif/{key}", body)

        if await self._retry(put, is_async=True, key=f"{uid}/{key}") and track:
            self.dms[uid].add(key)

    async def _write(self, method: str, path: str, body: dict[str, Any], timeout: float = 10) -> None:
        """One Realtime Database write through the stand-in's REST API; raises on an error status."""
        response = await self.http.request(
            method,
            f"{path}.json",
            params={"ns": self.ns, "print": "silent"},
            content=json.dumps(body),
            timeout=timeout,
        )
        response.raise_for_status()

    async def _delete_dm(self, uid: str, key: str) -> None:
        async def delete() -> None:
            response = await self.http.delete(
                f"/clients/{uid}/direct_message_notif/{key}.json", params={"ns": self.ns}, timeout=10
            )
            response.raise_for_status()

        await self._retry(delete, is_async=True)
        self.dms[uid].discard(key)

    async def probe(self, uids: list[str]) -> list[str]:
        """One new notification and one new direct message for each of `uids`, now; their keys."""
        keys = []
        tasks = []
        for uid in uids:
            doc_id, key = f"p{next(self.numbers):07d}", f"q{next(self.numbers):07d}"
            keys += [f"{uid}/{doc_id}", f"{uid}/{key}"]
            # not touched again by the mixed writes: each must be seen added
            tasks += [self._start("probe", doc_id, self._add_notification(uid, doc_id, track=False))]
            tasks += [self._start("probe", key, self._add_dm(uid, key, track=False))]
        for task in tasks:
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)
        return keys

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# -- what the services say: /metrics and /healthz ---------------------------------------------------

WATCHED = (
    "listeners_redis_reconnects_total",
    "listeners_pubsub_reconnects_total",
    "listeners_stream_restarts_total",
    "listeners_redis_up",
    "listeners_cluster_members",
    "listeners_task_restarts_total",
)
_LINE = re.compile(r"^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+|NaN|\+Inf)$")


async def stop_run(
    writer: Writer,
    consumer: Consumer,
    monitor: Monitor,
    instances: list[Instance],
    http: httpx.AsyncClient,
    db: firestore.Client,
    browsers: Browsers | None = None,
) -> None:
    """The end of a scenario or a soak: writes, readers, then the service instances, each
    stopped even when an earlier one failed to."""
    for task in list(writer.inflight):
        task.cancel()
    if browsers is not None:
        await browsers.stop()
    await consumer.stop()
    await monitor.stop()
    for instance in instances:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(instance.service.stop, signal.SIGTERM, 20.0)
    writer.close()
    await http.aclose()
    db.close()


def parse_metrics(text: str) -> dict[str, float]:
    """Each metric's value summed over its labels."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        found = _LINE.match(line)
        if found:
            with contextlib.suppress(ValueError):
                out[found.group(1)] = out.get(found.group(1), 0.0) + float(found.group(3))
    return out


@dataclass
class Reading:
    at: float
    instance: str
    status: str
    listeners: int
    metrics: dict[str, float]

    def signals(self) -> tuple[Any, ...]:
        return (self.status, *(self.metrics.get(name, 0.0) for name in WATCHED))


class Monitor:
    """Polls every live instance's /healthz and /metrics; keeps the last reading of each and
    the first moment any watched signal changed after `arm()`."""

    def __init__(self, instances: list[Instance], interval: float = 0.5) -> None:
        self.instances = instances
        self.interval = interval
        self.last: dict[str, Reading] = {}
        self.baseline: dict[str, tuple[Any, ...]] = {}
        self.noticed: float | None = None
        self.noticed_by = ""
        self.http = httpx.AsyncClient(timeout=5.0)
        self.task: asyncio.Task[None] | None = None

    async def read(self, instance: Instance) -> Reading | None:
        base = f"http://127.0.0.1:{instance.service.port}"
        try:
            health = (await self.http.get(f"{base}/healthz")).json()
            text = (await self.http.get(f"{base}/metrics")).text
        except (httpx.HTTPError, ValueError):
            return None
        return Reading(
            time.monotonic(),
            instance.id,
            str(health.get("status")) + ("" if health.get("redis") in (None, "ok") else "/redis-down"),
            int(health.get("listeners_count") or 0),
            parse_metrics(text),
        )

    async def poll_once(self) -> None:
        readings = await asyncio.gather(*(self.read(i) for i in self.instances if i.alive))
        for reading in readings:
            if reading is None:
                continue
            self.last[reading.instance] = reading
            before = self.baseline.get(reading.instance)
            if before is not None and self.noticed is None and reading.signals() != before:
                self.noticed = reading.at
                changed = [
                    name
                    for name, a, b in zip(("healthz", *WATCHED), before, reading.signals(), strict=True)
                    if a != b
                ]
                self.noticed_by = f"{reading.instance}: {', '.join(changed)}"

    def arm(self) -> None:
        """From now on, note the first change of any signal."""
        self.baseline = {name: r.signals() for name, r in self.last.items()}
        self.noticed, self.noticed_by = None, ""

    async def run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    def total_listeners(self) -> int:
        alive = {i.id for i in self.instances if i.alive}
        return sum(r.listeners for name, r in self.last.items() if name in alive)

    def all_ok(self) -> bool:
        alive = [i.id for i in self.instances if i.alive]
        return all(self.last.get(name) is not None and self.last[name].status == "ok" for name in alive)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.http.aclose()


def process_figures(ps: psutil.Process) -> tuple[float, int, int]:
    """RSS MB, threads, open file descriptors."""
    with ps.oneshot():
        return ps.memory_info().rss / 2**20, ps.num_threads(), ps.num_fds()


def new_project(prefix: str) -> tuple[str, str]:
    project = f"{prefix}-{uuid.uuid4().hex[:6]}"
    return project, f"{project}-ns"
