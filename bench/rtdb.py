"""Direct messages from the Realtime Database through the service, and what each user costs.

For each size N, a fresh Firestore emulator, a fresh Realtime Database stand-in
(`listeners_testkit.rtdb_server`) and a fresh service process (`uvicorn app.main:app`, pointed
at the stand-in with FIREBASE_DATABASE_EMULATOR_HOST) with N users online in the registry,
written before the service starts. One private redis-server serves the whole run.

- Cost: with every user attached (one Firestore watch and one Realtime Database stream
  each) and nothing written, the service's RSS, threads, file descriptors and TCP
  connections (by peer), the stand-in's open streams, and CPU over `--idle` seconds.
  Per-user figures are deltas from the 0-user service of the same run.
- Latency: `--writes` direct messages at `--rate` per second, each a PUT of
  `clients/{uid}/direct_message_notif/{key}` on the stand-in for a random user, timed from
  just before the PUT to the receipt of that message's `msg.add` by a subscriber on the
  exact channels `user:{uid}`.
- Sizes given with `--without-rtdb` are measured a second time with the Realtime Database
  client off (Firestore only, no writes), which splits the per-user cost between the two.
- `--transports rest,wire`: each size once per Realtime Database transport, side by side
  (`LISTENERS_RTDB_TRANSPORT`, which the service reads: it selects the
  wire client in the service process). *msg synced s* is from starting the service to every
  user's first `msg.sync`. Such a run's block goes to its own section (docs/rtdb.md by
  default), not over the REST-only one.

    .venv/bin/python -m bench.rtdb --users 0,1,100,1000 --writes 300 --rate 20
    .venv/bin/python -m bench.rtdb --users 0,1000 --transports rest,wire --without-rtdb ""

The results replace the generated block of this benchmark in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis.asyncio as aioredis
from google.cloud import firestore

from bench import latency
from bench.latency import (
    BenchService,
    LoggedEmulator,
    _measuring,
    _message,
    _terminate,
    _version,
    check_alive,
    log_problems,
    percentile,
    report_head,
    update_doc,
    wait_healthy,
)
from listeners_testkit.documents import WEEK, a_day_from_now, write_online, write_unread
from listeners_testkit.processes import (
    PROJECT_ROOT,
    FirestoreEmulator,
    RedisServer,
    emulator_env,
    wait_for_port,
)
from listeners_testkit.rtdb_server import RtdbStandin

DOC = PROJECT_ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench.rtdb:start -->", "<!-- bench.rtdb:end -->"
SECTION = "## Realtime Database direct messages and the cost per user (`bench/rtdb.py`)"
TRANSPORTS_DOC = PROJECT_ROOT / "docs" / "rtdb.md"
TRANSPORTS_START = "<!-- bench.rtdb.transports:start -->"
TRANSPORTS_END = "<!-- bench.rtdb.transports:end -->"
TRANSPORTS_SECTION = "## Measured: REST against the wire (`bench/rtdb.py --transports rest,wire`)"
PEERS = ("firestore", "rtdb", "redis", "other")
MB = 2**20
GC_PROBE = Path(__file__).resolve().parent / "gc_probe"  # its sitecustomize logs collections
CORES = os.cpu_count() or 1


@dataclass
class Size:
    """What one size measured; filled in as the run goes, so a failed size still reports."""

    users: int
    rtdb: bool  # False: the Realtime Database client is off (Firestore only)
    transport: str  # LISTENERS_RTDB_TRANSPORT: rest or wire
    log_path: Path
    emulator_log: Path
    ready_s: float = float("nan")  # service started -> every user attached, synced and streaming
    msg_synced_s: float = float("nan")  # service started -> every user's first msg.sync
    notif_synced_s: float = float("nan")  # service started -> every user's first notif.sync
    # at idle: every user attached, no writes
    idle_s: float = float("nan")
    idle_cpu: float = float("nan")  # service CPU % over the idle window (100 = one core)
    idle_standin_cpu: float = float("nan")
    idle_emulator_cpu: float = float("nan")
    idle_machine_cpu: float = float("nan")  # 100 = every core
    idle_others_cpu: float = float("nan")  # 100 = one core: all but service, stand-in, emulator, bench
    load: list[float] = field(default_factory=list)  # 1-minute load average at the start and end
    rss_mb: float = float("nan")
    threads: int = 0
    fds: int = 0
    tcp: Counter[str] = field(default_factory=Counter)  # established connections by peer
    listening: int = 0
    standin_streams: int = 0  # REST streams, or wire listens
    standin_sockets: int = 0  # the stand-in's WebSockets
    standin_rss_mb: float = float("nan")
    emulator_rss_mb: float = float("nan")
    # writes
    sent: int = 0
    write_errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # sorted, one per msg.add received
    samples: list[tuple[str, float, float | None]] = field(default_factory=list)  # key, sent (epoch), ms
    # --gc-log: the service's collections (epoch s at the end, generation, pause ms) and windows
    gc_pauses: list[tuple[float, int, float]] = field(default_factory=list)
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> epoch s
    rate: float = float("nan")
    cpu: float = float("nan")  # service CPU % from the first write to the last event
    standin_cpu: float = float("nan")
    bench_cpu: float = float("nan")
    machine_cpu: float = float("nan")
    others_cpu: float = float("nan")
    peak_rss_mb: float = float("nan")
    drain_s: float = float("nan")
    duplicates: int = 0
    events: Counter[str] = field(default_factory=Counter)
    stop_s: float = float("nan")
    problems: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def received(self) -> int:
        return len(self.latencies_ms)

    @property
    def label(self) -> str:
        return f"{self.users}" + (f" {self.transport}" if self.rtdb else " (Firestore only)")


class Consumer(latency.Consumer):
    """The core benchmark's subscriber, counting direct messages and both kinds of sync."""

    def __init__(self, client: aioredis.Redis, uids: list[str]) -> None:
        super().__init__(client, uids)
        self.synced_by_kind: dict[str, set[str]] = {"notif.sync": set(), "msg.sync": set()}
        self.last_first_sync: dict[str, float] = {}  # kind -> when its latest user had a first sync

    def record(self, event: dict[str, Any], now: float) -> None:
        kind = event["type"]
        if kind in self.synced_by_kind:
            if event["uid"] not in self.synced_by_kind[kind]:
                self.last_first_sync[kind] = now
            self.synced_by_kind[kind].add(event["uid"])
        elif kind == "msg.add":
            self.received_once(event["payload"]["doc_id"], now)


# Called once the users and their data are written, before the service starts: (project, uids).
BeforeService = Callable[[str, list[str]], Awaitable[None]]


def message(key: str) -> dict[str, str]:
    """A direct message node as the application writes one."""
    return {
        "job_id": key,
        "file_name": f"{key}.pdf",
        "status": "pending",
        "collection_id": "c1",
        "message": "A document needs your review",
        "sender_id": "bench-sender",
        "chat_mode": "chats",
        "timestamp": datetime.now(UTC).isoformat(),
    }


async def write_message(http: httpx.AsyncClient, ns: str, uid: str, key: str, sent: dict[str, float]) -> bool:
    """One PUT; its send time goes in `sent` unless the write failed."""
    body = json.dumps(message(key))
    sent[key] = time.monotonic()
    try:
        response = await http.put(
            f"/clients/{uid}/direct_message_notif/{key}.json",
            params={"ns": ns, "print": "silent"},
            content=body,
            timeout=10,
        )
        response.raise_for_status()
    except httpx.HTTPError:
        del sent[key]
        return False
    return True


def tcp_by_peer(ps: psutil.Process, ports: dict[int, str]) -> tuple[Counter[str], int]:
    """The process's TCP connections by peer (`ports`: remote port -> name), and its listeners."""
    peers: Counter[str] = Counter()
    listening = 0
    for conn in ps.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN:
            listening += 1
        elif conn.raddr:
            peers[ports.get(conn.raddr.port, "other")] += 1
    return peers, listening


async def peak_rss(ps: psutil.Process, s: Size) -> None:
    s.peak_rss_mb = 0.0
    while True:
        s.peak_rss_mb = max(s.peak_rss_mb, ps.memory_info().rss / MB)
        await asyncio.sleep(0.5)


async def run_size(
    s: Size,
    args: argparse.Namespace,
    redis_port: int,
    emulator: FirestoreEmulator,
    standin: RtdbStandin,
    before_service: BeforeService | None = None,
) -> None:
    """One size; `args.unread` (default 0) unread notifications per user are written with the
    registry, and `before_service` runs once they are, before the service starts."""
    project = f"bench-rtdb-{s.users}-{uuid.uuid4().hex[:6]}"
    ns = f"{project}-ns"
    uids = [f"u{i:04d}" for i in range(s.users)]
    rng = random.Random(args.seed + s.users)
    assert emulator.process is not None and standin.process is not None
    emu, rtdb = psutil.Process(emulator.process.pid), psutil.Process(standin.process.pid)
    loop = asyncio.get_running_loop()
    db = firestore.Client(project=project)
    client = aioredis.Redis(host="127.0.0.1", port=redis_port)
    consumer = Consumer(client, uids)
    http = httpx.AsyncClient(base_url=standin.url)
    sampler: asyncio.Task[None] | None = None
    service: BenchService | None = None
    sent: dict[str, float] = {}  # message key -> monotonic time just before its PUT
    extra: dict[str, str] = {}
    gc_log = s.log_path.with_suffix(".gc.jsonl")
    if args.gc_log:
        extra["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GC_PROBE), os.environ.get("PYTHONPATH")]))
        extra["BENCH_GC_LOG"] = str(gc_log)
    if s.rtdb:
        extra["FIREBASE_DATABASE_EMULATOR_HOST"] = f"127.0.0.1:{standin.port}"
        extra["FIREBASE_REALTIME_DB_URL"] = f"https://{ns}.firebaseio.com"
        extra["LISTENERS_RTDB_TRANSPORT"] = s.transport

    def alive() -> None:
        check_alive(service=service.process if service else None, emulator=emulator.process)
        check_alive(standin=standin.process)

    try:
        # Registered before the service starts, as after a deploy. (On the npm fallback
        # emulator, which resends every watched query on every write, registering them
        # under a running service would also cost O(N^2) resends.)
        await loop.run_in_executor(
            None, partial(write_online, db, uids, heartbeat=a_day_from_now(), ttl_seconds=WEEK)
        )
        unread = getattr(args, "unread", 0)
        if unread:
            await loop.run_in_executor(None, write_unread, db, uids, unread)
        if before_service is not None:
            await before_service(project, uids)
        await consumer.start()
        began = time.monotonic()
        service = BenchService(redis_port, emulator.host, project, s.log_path, extra)
        await loop.run_in_executor(None, wait_for_port, service.port, 60.0, service.process)
        await wait_healthy(service.port, s.users, args.ready_timeout)
        syncs = ["notif.sync", "msg.sync"] if s.rtdb else ["notif.sync"]

        def attached() -> bool:
            alive()
            return all(len(consumer.synced_by_kind[kind]) == s.users for kind in syncs)

        if not await consumer.wait(attached, args.ready_timeout):
            got = {kind: len(consumer.synced_by_kind[kind]) for kind in syncs}
            raise TimeoutError(f"first syncs of {s.users} users not all received: {got}")
        if s.users:
            s.notif_synced_s = consumer.last_first_sync["notif.sync"] - began
        if s.rtdb:
            s.msg_synced_s = consumer.last_first_sync.get("msg.sync", began) - began
            deadline = time.monotonic() + args.ready_timeout
            while await standin_listens(standin, ns, s.transport) < s.users:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the stand-in never had {s.users} streams open")
                await asyncio.sleep(0.2)
        s.ready_s = time.monotonic() - began

        # Idle: everything attached, nothing written.
        await asyncio.sleep(args.settle)
        alive()
        me = psutil.Process()
        for ps in (service.ps, rtdb, emu, me):
            ps.cpu_percent(None)
        psutil.cpu_percent(None)
        idle_began, idle_wall = time.monotonic(), time.time()
        await asyncio.sleep(args.idle)
        s.idle_s = time.monotonic() - idle_began
        s.windows["idle"] = (idle_wall, time.time())
        s.idle_cpu, s.idle_standin_cpu = service.ps.cpu_percent(None), rtdb.cpu_percent(None)
        s.idle_emulator_cpu, s.idle_machine_cpu = emu.cpu_percent(None), psutil.cpu_percent(None)
        s.idle_others_cpu = (
            s.idle_machine_cpu * CORES - s.idle_cpu - s.idle_standin_cpu - s.idle_emulator_cpu
        ) - me.cpu_percent(None)
        alive()
        s.rss_mb = service.ps.memory_info().rss / MB
        s.threads = service.ps.num_threads()
        s.fds = service.ps.num_fds()
        ports = {emulator.port: "firestore", standin.port: "rtdb", redis_port: "redis"}
        s.tcp, s.listening = tcp_by_peer(service.ps, ports)
        s.standin_streams = await standin_listens(standin, ns, s.transport)
        s.standin_sockets = int((await standin.wire(ns))["connections"])
        s.standin_rss_mb = rtdb.memory_info().rss / MB
        s.emulator_rss_mb = emu.memory_info().rss / MB

        if not s.rtdb or not s.users or not args.writes:
            return
        sampler = asyncio.create_task(peak_rss(service.ps, s))
        for ps in (service.ps, rtdb, emu, me):
            ps.cpu_percent(None)
        psutil.cpu_percent(None)
        writes = []
        began = time.monotonic()
        for i in range(args.writes):
            await asyncio.sleep(max(0.0, began + i / args.rate - time.monotonic()))
            alive()
            uid, key = rng.choice(uids), f"m{i:05d}"
            writes.append(asyncio.create_task(write_message(http, ns, uid, key, sent)))
        s.write_errors = (await asyncio.gather(*writes)).count(False)
        times = sent.values()
        s.rate = (len(sent) - 1) / max(1e-9, max(times, default=0) - min(times, default=0))

        def all_received() -> bool:
            alive()
            return all(key in consumer.added for key in sent)

        drained = time.monotonic()
        while not await consumer.wait(all_received, args.quiet):  # no msg.add for `quiet` s: give up
            if time.monotonic() - drained > args.drain or not any(
                consumer.added.get(key, 0.0) > time.monotonic() - args.quiet for key in sent
            ):
                break
        s.drain_s = time.monotonic() - drained
        epoch = time.time() - time.monotonic()
        s.windows["writes"] = (epoch + began, time.time())
        s.cpu, s.standin_cpu = service.ps.cpu_percent(None), rtdb.cpu_percent(None)
        s.bench_cpu, s.machine_cpu = me.cpu_percent(None), psutil.cpu_percent(None)
        s.others_cpu = s.machine_cpu * CORES - s.cpu - s.standin_cpu - s.bench_cpu - emu.cpu_percent(None)
        await asyncio.sleep(0.5)  # late duplicates show up in the counts
    finally:
        if sampler is not None:
            sampler.cancel()
        s.sent = len(sent)
        s.latencies_ms = sorted(
            (consumer.added[key] - t0) * 1000 for key, t0 in sent.items() if key in consumer.added
        )
        epoch = time.time() - time.monotonic()
        s.samples = [
            (key, epoch + t0, (consumer.added[key] - t0) * 1000 if key in consumer.added else None)
            for key, t0 in sorted(sent.items(), key=lambda item: item[1])
        ]
        try:
            if service is not None:
                s.stop_s = service.stop_timed()
        finally:
            s.duplicates, s.events = consumer.duplicates, consumer.events
            await consumer.stop()
            await client.aclose()
            await http.aclose()
            db.close()
            if s.log_path.exists():
                s.problems = log_problems(s.log_path)
            if gc_log.exists():
                for line in gc_log.read_text().splitlines():
                    record = json.loads(line)
                    s.gc_pauses.append((record["at"], record["generation"], record["ms"]))


async def standin_listens(standin: RtdbStandin, ns: str, transport: str) -> int:
    """What the stand-in serves of this namespace: REST streams, or listens over its WebSockets."""
    if transport == "wire":
        return int((await standin.wire(ns))["listens"])
    return await standin.open_streams(ns)


def _f(value: float, digits: int = 0) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


def render(sizes: list[Size], command: str, code: str, started: datetime, elapsed: float) -> str:
    bases = {s.transport: s for s in reversed(sizes) if s.users == 0 and s.rtdb and not s.error}
    lines = [
        START,
        *report_head(command, code, started, elapsed),
        "Direct-message latency, PUT on the stand-in to `msg.add` at the subscriber:",
        "",
        "| users | writes sent | received | missing | p50 ms | p95 ms | p99 ms | max ms "
        "| service CPU % | stand-in CPU % | peak RSS MB | drain s |",
        "|" + "---:|" * 12,
    ]
    for s in sizes:
        if not s.sent:
            continue
        p = [percentile(s.latencies_ms, q) for q in (50, 95, 99, 100)]
        lines.append(
            f"| {s.label} | {s.sent} | {s.received} | {s.sent - s.received} "
            + "".join(f"| {_f(v)} " for v in p)
            + f"| {_f(s.cpu)} | {_f(s.standin_cpu)} | {_f(s.peak_rss_mb)} | {_f(s.drain_s, 1)} |"
        )
    lines += [
        "",
        f"Cost with every user attached and nothing written (idle CPU over {sizes[0].idle_s:.0f} s; "
        "Δ = difference from the 0-user service of this run; TCP = established connections "
        "of the service by peer):",
        "",
        "| users | RSS MB | Δ RSS per user KB | threads | Δ threads per user | fds "
        "| TCP Firestore | TCP RTDB | TCP Redis | TCP other | Δ TCP per user | stand-in streams "
        "| stand-in WebSockets | idle CPU % | Δ idle CPU % per 100 users | msg synced s | ready s | stop s |",
        "|" + "---:|" * 18,
    ]
    for s in sizes:
        base = bases.get(s.transport)
        tcp = sum(s.tcp.values())
        if base is not None and s.users and s.rss_mb == s.rss_mb:
            d_rss = _f((s.rss_mb - base.rss_mb) * 1024 / s.users)
            d_threads = _f((s.threads - base.threads) / s.users, 2)
            d_tcp = _f((tcp - sum(base.tcp.values())) / s.users, 2)
            d_cpu = _f((s.idle_cpu - base.idle_cpu) * 100 / s.users, 1)
        else:
            d_rss = d_threads = d_tcp = d_cpu = "n/a"
        lines.append(
            f"| {s.label} | {_f(s.rss_mb)} | {d_rss} | {s.threads} | {d_threads} | {s.fds} "
            + "".join(f"| {s.tcp[peer]} " for peer in PEERS)
            + f"| {d_tcp} | {s.standin_streams if s.rtdb else 'n/a'} "
            f"| {s.standin_sockets if s.rtdb else 'n/a'} | {_f(s.idle_cpu, 1)} | {d_cpu} "
            f"| {_f(s.msg_synced_s, 1)} | {_f(s.ready_s, 1)} | {_f(s.stop_s, 1)} |"
        )
    lines += ["", "Per size:"]
    for s in sizes:
        events = ", ".join(f"{k} {v}" for k, v in sorted(s.events.items())) or "none"
        kinds = Counter(_message(line) for line in s.problems)
        logged = "; ".join(f"{n} x `{m[:160]}`" for m, n in kinds.most_common(3))
        writes = (
            f"{_f(s.rate, 1)} writes/s achieved, {s.write_errors} write errors, duplicate msg.add "
            f"{s.duplicates}, CPU over the writes: bench {_f(s.bench_cpu)} %, "
            f"everything else {_f(s.others_cpu)} % (of {100 * CORES}); "
            if s.sent
            else ""
        )
        lines.append(
            f"- {s.label}: "
            + (f"**FAILED: {s.error}**; " if s.error else "")
            + writes
            + f"events received: {events}; at idle: stand-in CPU {_f(s.idle_standin_cpu, 1)} %, "
            f"emulator CPU {_f(s.idle_emulator_cpu, 1)} %, everything else {_f(s.idle_others_cpu)} % "
            f"(of {100 * CORES}), stand-in RSS {_f(s.standin_rss_mb)} MB, "
            f"emulator RSS {_f(s.emulator_rss_mb)} MB, "
            f"service listening sockets {s.listening}; load average "
            + " -> ".join(f"{v:.1f}" for v in s.load)
            + "; "
            f"service log warnings/errors: {len(s.problems)}" + (f" ({logged})" if logged else "")
        )
    if any(s.windows for s in sizes) and any(s.gc_pauses for s in sizes):
        lines += ["", "Garbage-collector pauses of the service (`--gc-log`):"]
        for s in sizes:
            lines.append(f"- {s.label}: {gc_summary(s)}")
    lines.append(END)
    return "\n".join(lines)


def gc_summary(s: Size) -> str:
    """Full collections and pauses over 100 ms, per window; the messages a long pause delayed."""
    parts = []
    first = min((start for start, _ in s.windows.values()), default=float("inf"))
    windows = {"before idle (start-up)": (0.0, first), **s.windows}
    for name, (start, end) in windows.items():
        inside = [(gen, ms) for at, gen, ms in s.gc_pauses if start <= at <= end]
        full = [ms for gen, ms in inside if gen == 2]
        long = [ms for _, ms in inside if ms >= 100]
        parts.append(
            f"{name}: {len(full)} full collections"
            + (f" (longest {max(full):.0f} ms)" if full else "")
            + f", {len(long)} pauses >= 100 ms"
        )
    long_pauses = [(at - ms / 1000, at) for at, _, ms in s.gc_pauses if ms >= 100]
    caught = [
        ms
        for _, sent, ms in s.samples
        if ms is not None and any(begin <= sent + ms / 1000 and sent <= end for begin, end in long_pauses)
    ]
    slow = [ms for _, _, ms in s.samples if ms is not None and ms >= 100]
    if s.samples:
        parts.append(
            f"messages >= 100 ms: {len(slow)}, of which {sum(1 for ms in caught if ms >= 100)} "
            "were in flight during a pause >= 100 ms"
        )
    return "; ".join(parts)


async def run(args: argparse.Namespace) -> list[Size]:
    """One redis-server for the whole run; a fresh emulator, stand-in and service per size."""
    plan = [(n, True, t) for n in args.users for t in args.transports]
    plan += [(n, False, "rest") for n in args.without_rtdb]
    sizes: list[Size] = []
    with RedisServer() as redis_server:
        for users, with_rtdb, transport in plan:
            name = f"listeners-bench-rtdb-{users}-{uuid.uuid4().hex[:6]}"
            s = Size(
                users,
                with_rtdb,
                transport,
                Path(tempfile.gettempdir()) / f"{name}.log",
                Path(tempfile.gettempdir()) / f"{name}-emulator.log",
            )
            sizes.append(s)
            print(f"[bench] {s.label} users ...", file=sys.stderr, flush=True)
            s.load.append(os.getloadavg()[0])
            try:
                with LoggedEmulator(s.emulator_log) as emulator, RtdbStandin() as standin:
                    emulator_env(emulator.host)
                    await run_size(s, args, redis_server.port, emulator, standin)
            except Exception as exc:  # reported in the results; the next size still runs
                s.error = f"{type(exc).__name__}: {exc}"
            s.load.append(os.getloadavg()[0])
            lat = s.latencies_ms
            print(
                f"[bench] {s.label} users: msg synced {s.msg_synced_s:.1f} s, ready {s.ready_s:.1f} s, "
                f"rss {s.rss_mb:.0f} MB, fds {s.fds}, "
                f"threads {s.threads}, tcp {dict(s.tcp)}, idle cpu {s.idle_cpu:.1f}%; "
                f"{s.received}/{s.sent} received, p50 {percentile(lat, 50):.0f} "
                f"p99 {percentile(lat, 99):.0f} max {percentile(lat, 100):.0f} ms; log {s.log_path}"
                + (f"; FAILED: {s.error}" if s.error else ""),
                file=sys.stderr,
                flush=True,
            )
    return sizes


def _sizes(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n.strip()]


def _transports(text: str) -> list[str]:
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    if not chosen or any(t not in ("rest", "wire") for t in chosen):
        raise argparse.ArgumentTypeError("transports are rest and wire, comma-separated")
    return chosen


def _without_samples(argv: list[str]) -> list[str]:
    """The arguments without --samples and its file, which says where output goes."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--samples":
            skip = True
        elif not arg.startswith("--samples="):
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rtdb", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=_sizes, default=[0, 1, 100, 1000], help="sizes; 0 is the baseline")
    parser.add_argument(
        "--without-rtdb", type=_sizes, default=[1000], help="sizes measured again, Firestore only"
    )
    parser.add_argument(
        "--transports",
        type=_transports,
        default=["rest"],
        help="LISTENERS_RTDB_TRANSPORT values, each size once per value: rest, wire or rest,wire",
    )
    parser.add_argument("--writes", type=int, default=300, help="direct messages per size (N > 0)")
    parser.add_argument("--rate", type=float, default=20.0, help="direct messages per second")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle measurement")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds between ready and idle")
    parser.add_argument("--drain", type=float, default=60.0, help="most seconds to wait for late events")
    parser.add_argument("--quiet", type=float, default=15.0, help="stop waiting after this long with none")
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--samples", type=Path, help="also write every message's latency here (JSON lines)")
    parser.add_argument(
        "--gc-log", action="store_true", help="log the service's garbage-collector pauses (bench/gc_probe)"
    )
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file to update")
    parser.add_argument("--no-doc", action="store_true", help="print the results only")
    parser.add_argument("--code", help="what code was measured (default: git describe --dirty)")
    args = parser.parse_args(argv)
    if 0 not in args.users:
        parser.error("--users must include 0, the baseline of the per-user deltas")
    if "wire" in args.transports and args.gc_log:
        parser.error("--gc-log and the wire transport both need the service's sitecustomize")
    if args.transports != ["rest"] and args.doc == DOC:
        args.doc = TRANSPORTS_DOC
    signal.signal(signal.SIGTERM, _terminate)
    started, began = datetime.now(UTC), time.monotonic()
    try:
        sizes = asyncio.run(run(args))
    except KeyboardInterrupt:
        print("[bench] interrupted; every process it started is stopped", file=sys.stderr)
        raise SystemExit(130) from None
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join([".venv/bin/python -m bench.rtdb", *_measuring(_without_samples(given))])
    described = _version(["git", "-C", str(PROJECT_ROOT), "describe", "--always", "--dirty"])
    code = args.code or (f"`{described}`" if described else "unknown (not a git checkout)")
    if not args.code and described.endswith("-dirty"):
        code += " (`-dirty`: with uncommitted changes)"
    if args.samples:
        with args.samples.open("w") as out:
            for s in sizes:
                for key, at, ms in s.samples:
                    out.write(json.dumps({"users": s.users, "key": key, "sent": at, "ms": ms}) + "\n")
    block = render(sizes, command, code, started, time.monotonic() - began)
    print(block)
    if not args.no_doc and args.transports == ["rest"]:
        update_doc(args.doc, block, START, END, SECTION)
    elif not args.no_doc:
        block = block.replace(START, TRANSPORTS_START).replace(END, TRANSPORTS_END)
        update_doc(args.doc, block, TRANSPORTS_START, TRANSPORTS_END, TRANSPORTS_SECTION)


if __name__ == "__main__":
    main()
