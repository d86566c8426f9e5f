"""Scale: the SDK source against the multiplexed Listen source, side by side (issue 13).

For each user count and source, on a fresh Google Firestore emulator:
- the floor first: an in-process Listen client adds one notification query per user on a
  fresh project, all on one stream; the seconds until every target delivered its first
  snapshot are the emulator's own speed. Then `--floor-writes` notifications at `--rate`,
  each timed from its write to its arrival on that stream: the emulator's own latency (the
  first writes a fresh emulator takes, so its JIT warms up on them).
- then `bench.latency`'s run with `LISTENERS_FIRESTORE_SOURCE` set: users online before the
  service starts, time until every user got its first `notif.sync`, threads, idle CPU, RSS,
  write -> `notif.add` on Redis at `--rate` writes per second, SIGTERM to exit.
- `--gc`: one full collection timed in the service, as it runs and with nothing frozen.

    .venv/bin/python -m bench.scale --users 1000 --sources sdk,listen --rate 100 --writes-per-size 1000

`--rtdb-transports rest,wire` (issue 27) measures the Realtime Database's transports instead, side
by side: for each user count and transport, a fresh emulator and stand-in, the users online
with `--unread` unread notifications each, then
- the raw client: `google-cloud-firestore`'s own generated Listen client (no code of this
  project) adds every user's notification query on the same project, the same data and the
  same emulator, `--raw-targets-per-stream` targets a stream; the seconds until every target
  delivered its first consistent snapshot. A warm-up first on a project of its own (the
  emulator's JIT), so that neither the raw client nor the service meets a cold emulator; and
  the raw client again once the service stopped: the ratio takes the faster of the two, so
  neither order favours the service.
- then `bench.rtdb`'s run for one size with `LISTENERS_RTDB_TRANSPORT` set: every user's
  first `notif.sync` and `msg.sync`, the service's connections to the database, file
  descriptors, idle CPU, direct messages at `--rate` timed to `msg.add`, SIGTERM to exit.

    flock /tmp/listeners-bench.lock .venv/bin/python -m bench.scale --rtdb-transports rest,wire \
        --users 1000,3000,10000 --unread 1 --rate 100 --writes-per-size 1000

The results replace the generated block of this benchmark in docs/benchmarks.md (the RTDB
one's its own block and docs/scale-rtdb.png).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.cloud import firestore

from bench import rtdb
from bench.latency import (
    DOC,
    LoggedEmulator,
    Result,
    _measuring,
    _message,
    _terminate,
    _version,
    percentile,
    report_head,
    run_size,
    update_doc,
    write_notification,
)
from listeners.config import TARGETS_PER_STREAM
from listeners.source.listen import ListenSource
from listeners.source.snapshots import Query, Snapshot
from listeners_testkit.documents import write_unread
from listeners_testkit.processes import PROJECT_ROOT, RedisServer, emulator_env
from listeners_testkit.rtdb_server import RtdbStandin

START, END = "<!-- bench.scale:start -->", "<!-- bench.scale:end -->"
FIGURE = DOC.parent / "scale.png"
SECTION = "## Scale: SDK source against the Listen source (`bench/scale.py`)"
RTDB_START, RTDB_END = "<!-- bench.scale.rtdb:start -->", "<!-- bench.scale.rtdb:end -->"
RTDB_FIGURE = DOC.parent / "scale-rtdb.png"
RTDB_SECTION = (
    "## Scale with the Realtime Database: REST against the wire "
    "(`bench/scale.py --rtdb-transports`, issue 27)"
)


@dataclass
class Row:
    source: str
    result: Result
    floor: Floor = field(default_factory=lambda: Floor())


@dataclass
class Floor:
    """The emulator's own speed with a plain Listen client in this process: no service."""

    synced_s: float = float("nan")
    latencies_ms: list[float] = field(default_factory=list)  # write -> change on the stream


async def floor(host: str, users: int, args: argparse.Namespace) -> Floor:
    """Seconds until `users` notification queries on one stream all delivered a snapshot; then
    `--floor-writes` notifications at `--rate`, each timed from just before its write to its
    arrival in its query's snapshot."""
    project = f"floor-{uuid.uuid4().hex[:6]}"
    source = ListenSource(project, emulator_host=host, targets_per_stream=users)
    result = Floor()
    seen: set[int] = set()
    done = asyncio.Event()
    sent: dict[str, float] = {}
    arrived: dict[str, float] = {}

    def handler(i: int) -> Callable[[Snapshot], None]:
        def on_snapshot(snapshot: Snapshot) -> None:
            now = time.monotonic()
            for doc in snapshot.changes.upserted if snapshot.changes else snapshot.docs:
                arrived.setdefault(doc.id, now)
            seen.add(i)
            if len(seen) == users:
                done.set()

        return on_snapshot

    began = time.monotonic()
    db = firestore.Client(project=project)
    pool = ThreadPoolExecutor(16, thread_name_prefix="floor-write")
    loop = asyncio.get_running_loop()
    try:
        for i in range(users):
            source.watch(Query(f"clients/u{i:04d}/notifications", (("read", False),)), handler(i))
        await asyncio.wait_for(done.wait(), args.ready_timeout)
        result.synced_s = time.monotonic() - began
        rng = random.Random(args.seed)
        writes = []
        began = time.monotonic()
        for n in range(args.floor_writes):
            await asyncio.sleep(max(0.0, began + n / args.rate - time.monotonic()))
            uid = f"u{rng.randrange(users):04d}"
            writes.append(loop.run_in_executor(pool, write_notification, db, uid, f"f{n:05d}", sent))
        await asyncio.gather(*writes)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.quiet):
                while not sent.keys() <= arrived.keys():
                    await asyncio.sleep(0.05)
        result.latencies_ms = sorted((arrived[d] - t0) * 1000 for d, t0 in sent.items() if d in arrived)
        return result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        db.close()
        await source.aclose()


@dataclass
class Raw:
    """A raw Firestore client's time to every user's first snapshot, on the service's own data."""

    synced_s: float = float("nan")  # before the service started
    after_s: float = float("nan")  # again once it stopped, on the same project and data
    docs: int = 0  # documents in those first snapshots
    warmup_s: float = float("nan")  # the same on the warm-up project, before
    project: str = ""

    @property
    def best_s(self) -> float:
        """The faster of the two runs (the emulator may favour whichever comes second)."""
        runs = [t for t in (self.synced_s, self.after_s) if t == t]
        return min(runs, default=float("nan"))


def raw_target(database: str, uid: str, target_id: int) -> Any:
    """The service's notification query, `clients/{uid}/notifications` where `read == false`,
    built from the library's own types."""
    from google.cloud.firestore_v1.types import document, query
    from google.cloud.firestore_v1.types import firestore as wire

    where = query.StructuredQuery.Filter(
        field_filter=query.StructuredQuery.FieldFilter(
            field=query.StructuredQuery.FieldReference(field_path="read"),
            op=query.StructuredQuery.FieldFilter.Operator.EQUAL,
            value=document.Value(boolean_value=False),
        )
    )
    structured = query.StructuredQuery(
        from_=[query.StructuredQuery.CollectionSelector(collection_id="notifications")], where=where
    )
    parent = f"{database}/documents/clients/{uid}"
    return wire.Target(
        query=wire.Target.QueryTarget(parent=parent, structured_query=structured), target_id=target_id
    )


async def raw_listen(project: str, uids: list[str], per_stream: int, timeout: float) -> tuple[float, int]:
    """`google-cloud-firestore`'s generated async client (`FirestoreAsyncClient.listen`, grpc.aio),
    nothing of this project: every user's notification query as a target, `per_stream` targets
    a Listen stream, all streams on the client's one channel. Returns the seconds until every
    target was CURRENT and then covered by a consistent snapshot (a NO_CHANGE for all targets:
    what the SDK's and the service's first snapshot wait for), and the documents received."""
    from google.cloud.firestore_v1.types import firestore as wire

    client = firestore.AsyncClient(project=project)
    api = client._firestore_api
    database = f"projects/{project}/databases/(default)"
    metadata = [("google-cloud-resource-prefix", database)]
    synced: set[int] = set()
    everyone = asyncio.Event()
    stop = asyncio.Event()
    docs = 0
    current = wire.TargetChange.TargetChangeType.CURRENT
    no_change = wire.TargetChange.TargetChangeType.NO_CHANGE

    async def one_stream(first: int, chunk: list[str]) -> None:
        nonlocal docs
        ids = range(first, first + len(chunk))

        async def requests() -> AsyncIterator[Any]:
            for target_id, uid in zip(ids, chunk, strict=True):
                yield wire.ListenRequest(database=database, add_target=raw_target(database, uid, target_id))
            await stop.wait()

        is_current: set[int] = set()
        call = await api.listen(requests=requests(), metadata=metadata)
        async for response in call:
            if "document_change" in response:
                docs += 1
            elif "target_change" in response:
                change = response.target_change
                if change.target_change_type == current:
                    is_current.update(change.target_ids)
                elif change.target_change_type == no_change and not change.target_ids:
                    synced.update(is_current)  # a consistent point: these hold their first snapshot
                    if len(synced) == len(uids):
                        everyone.set()

    began = time.monotonic()
    streams = [
        asyncio.create_task(one_stream(1 + i, uids[i : i + per_stream]))
        for i in range(0, len(uids), per_stream)
    ]
    try:
        async with asyncio.timeout(timeout):
            waiting = asyncio.create_task(everyone.wait())
            done, _ = await asyncio.wait([waiting, *streams], return_when=asyncio.FIRST_COMPLETED)
            if waiting not in done:
                waiting.cancel()
                for task in done:
                    task.result()  # a stream that failed: its error
                raise RuntimeError("a raw Listen stream ended before every target synced")
        return time.monotonic() - began, docs
    finally:
        stop.set()
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        await api.transport.close()


async def warm_up(users: int, args: argparse.Namespace) -> float:
    """The raw client on a project of its own with `users` users: the emulator's JIT warms up
    here, not on the measured run."""
    project = f"warm-{uuid.uuid4().hex[:6]}"
    uids = [f"u{i:04d}" for i in range(users)]
    db = firestore.Client(project=project)
    try:
        await asyncio.to_thread(write_unread, db, uids, max(1, args.unread))
    finally:
        db.close()
    return (await raw_listen(project, uids, args.raw_targets_per_stream, args.ready_timeout))[0]


@dataclass
class RtdbRow:
    transport: str
    size: rtdb.Size
    raw: Raw = field(default_factory=Raw)


async def run_rtdb(args: argparse.Namespace) -> list[RtdbRow]:
    """Each user count once per transport: a fresh emulator and stand-in, the warm-up, the raw
    client on the run's data, then the service (bench.rtdb's run for one size)."""
    rows: list[RtdbRow] = []
    tmp = Path(tempfile.gettempdir())
    with RedisServer() as redis_server:
        for users in args.users:
            for transport in args.rtdb_transports:
                name = f"listeners-scale-rtdb-{transport}-{users}-{uuid.uuid4().hex[:6]}"
                size = rtdb.Size(users, True, transport, tmp / f"{name}.log", tmp / f"{name}-emulator.log")
                row = RtdbRow(transport, size)
                rows.append(row)
                print(f"[scale] {users} users, rtdb {transport} ...", file=sys.stderr, flush=True)
                size.load.append(os.getloadavg()[0])

                async def raw(project: str, uids: list[str], row: RtdbRow = row) -> None:
                    row.raw.project = project
                    row.raw.synced_s, row.raw.docs = await raw_listen(
                        project, uids, args.raw_targets_per_stream, args.ready_timeout
                    )
                    print(f"[scale] raw client: {row.raw.synced_s:.1f} s", file=sys.stderr, flush=True)

                try:
                    with LoggedEmulator(size.emulator_log) as emulator, RtdbStandin() as standin:
                        emulator_env(emulator.host)
                        if args.warmup:
                            row.raw.warmup_s = await warm_up(min(users, args.warmup), args)
                        await rtdb.run_size(size, args, redis_server.port, emulator, standin, raw)
                        if args.raw_after and not size.error:
                            uids = [f"u{i:04d}" for i in range(users)]
                            row.raw.after_s = (
                                await raw_listen(
                                    row.raw.project, uids, args.raw_targets_per_stream, args.ready_timeout
                                )
                            )[0]
                except Exception as exc:  # reported; the next run still goes
                    size.error = f"{type(exc).__name__}: {exc}"
                size.load.append(os.getloadavg()[0])
                lat = size.latencies_ms
                print(
                    f"[scale] {users} rtdb {transport}: raw {row.raw.synced_s:.1f} s and after "
                    f"{row.raw.after_s:.1f} s, notif.sync "
                    f"{size.notif_synced_s:.1f} s, msg.sync {size.msg_synced_s:.1f} s, "
                    f"tcp {dict(size.tcp)}, fds {size.fds}, idle {size.idle_cpu:.1f} %, "
                    f"p99 {percentile(lat, 99):.0f} ms, stop {size.stop_s:.1f} s; log {size.log_path}"
                    + (f", FAILED: {size.error}" if size.error else ""),
                    file=sys.stderr,
                    flush=True,
                )
    return rows


@dataclass(frozen=True)
class Goal:
    measure: str
    limit: float
    unit: str
    value: Callable[[RtdbRow], float]
    digits: int = 0
    short: str = ""  # the figure's axis label


GOALS = [
    Goal(
        "connections to the Realtime Database",
        4,
        "",
        lambda r: float(r.size.tcp["rtdb"]),
        short="TCP connections to the database",
    ),
    Goal("file descriptors", 200, "", lambda r: float(r.size.fds)),
    Goal("idle CPU, Firestore and RTDB on", 3, " %", lambda r: r.size.idle_cpu, 1, "idle CPU (% of a core)"),
    Goal(
        "every user's `msg.sync` published", 20, " s", lambda r: r.size.msg_synced_s, 1, "every msg.sync (s)"
    ),
    Goal(
        "DM write → publish p99",
        100,
        " ms",
        lambda r: percentile(r.size.latencies_ms, 99),
        short="DM write → msg.add p99 (ms)",
    ),
    Goal("SIGTERM → exit", 2, " s", lambda r: r.size.stop_s, 1, "SIGTERM → exit (s)"),
    Goal(
        "every user's `notif.sync` / the raw client's time",
        1.5,
        " x",
        lambda r: r.size.notif_synced_s / r.raw.best_s,
        2,
        "every notif.sync / raw client",
    ),
]


def _f(value: float, digits: int = 0) -> str:
    return "n/a" if value != value else f"{value:,.{digits}f}"


def render_rtdb(
    rows: list[RtdbRow], args: argparse.Namespace, command: str, code: str, started: datetime, elapsed: float
) -> str:
    lines = [
        RTDB_START,
        *report_head(command, code, started, elapsed),
        f"Each user online with {args.unread} unread notification(s) and a direct-message stream; "
        f"the raw client with {args.raw_targets_per_stream} targets a Listen stream"
        + (f", after a warm-up of {args.warmup:,} users" if args.warmup else "")
        + (", before the service started and again once it stopped" if args.raw_after else "")
        + f"; {args.writes_per_size} direct messages at {args.rate:g}/s, PUT on the stand-in to "
        "`msg.add` at a Redis subscriber; idle CPU over "
        f"{args.idle:g} s (100 = one core).",
        "",
        "| users | transport | TCP to RTDB | fds | idle CPU % | raw client s: before / after "
        "| notif.sync s | notif.sync / raw (the faster) | msg.sync s | DM writes | received | writes/s "
        "| p50 ms | p99 ms | max ms | stop s | RSS MB | threads |",
        "|---:|---|" + "---:|" * 16,
    ]
    for row in rows:
        s, lat = row.size, row.size.latencies_ms
        lines.append(
            f"| {s.users} | {row.transport} | {s.tcp['rtdb']} | {s.fds} | {_f(s.idle_cpu, 1)} "
            f"| {_f(row.raw.synced_s, 1)} / {_f(row.raw.after_s, 1)} | {_f(s.notif_synced_s, 1)} "
            f"| {_f(s.notif_synced_s / row.raw.best_s, 2)} | {_f(s.msg_synced_s, 1)} "
            f"| {s.sent} | {s.received} | {_f(s.rate, 1)} | {_f(percentile(lat, 50))} "
            f"| {_f(percentile(lat, 99))} | {_f(percentile(lat, 100))} | {_f(s.stop_s, 1)} "
            f"| {_f(s.rss_mb)} | {s.threads} |"
        )
    largest = max((row.size.users for row in rows), default=0)
    at = [row for row in rows if row.size.users == largest]
    if at:
        lines += [
            "",
            f"Issue 27's goals at {largest:,} users (met: ✓, missed: ✗):",
            "",
            "| measure | goal | " + " | ".join(row.transport for row in at) + " |",
            "|---|---:|" + "---:|" * len(at),
        ]
        for goal in GOALS:
            cells = []
            for row in at:
                value = goal.value(row)
                mark = "" if value != value else " ✓" if value <= goal.limit else " ✗"
                cells.append(f"{_f(value, goal.digits)}{goal.unit}{mark}")
            lines.append(f"| {goal.measure} | ≤ {goal.limit:g}{goal.unit} | " + " | ".join(cells) + " |")
    lines += ["", "Per run:"]
    for row in rows:
        s = row.size
        events = ", ".join(f"{k} {v}" for k, v in sorted(s.events.items())) or "none"
        kinds = Counter(_message(line) for line in s.problems)
        logged = "; ".join(f"{n} x `{m[:160]}`" for m, n in kinds.most_common(3))
        lines.append(
            f"- {s.users} {row.transport}: "
            + (f"**FAILED: {s.error}**; " if s.error else "")
            + f"raw client: {row.raw.docs:,} documents in the first snapshots "
            f"(warm-up {_f(row.raw.warmup_s, 1)} s); TCP by peer {dict(s.tcp)}; stand-in: "
            f"{s.standin_streams:,} listens or streams on {s.standin_sockets} WebSockets; "
            f"{s.write_errors} write errors, {s.duplicates} duplicate msg.add; events: {events}; "
            f"idle CPU of everything else {_f(s.idle_others_cpu)} % (of {100 * rtdb.CORES}); "
            f"load average " + " -> ".join(f"{v:.1f}" for v in s.load) + f"; service log "
            f"warnings/errors: {len(s.problems)}" + (f" ({logged})" if logged else "")
        )
    lines.append(RTDB_END)
    return "\n".join(lines)


def plot_rtdb(rows: list[RtdbRow], path: Path) -> Path:
    """Each goal's measure against online users, one line per transport, the goal dashed."""
    from bench.plot import Panel, save_panels

    panels = []
    for goal in GOALS:
        lines: dict[str, list[tuple[float, float]]] = {}
        for row in rows:
            value = goal.value(row)
            if value == value:
                lines.setdefault(row.transport, []).append((row.size.users, value))
        log_y = goal.unit == "" and any(y > 100 for points in lines.values() for _, y in points)
        panels.append(Panel(goal.short or goal.measure, lines, log_y=log_y, log_x=True, goal=goal.limit))
    return save_panels(
        path, "Issue 27: the Realtime Database over REST and over the wire", "online users", panels, columns=4
    )


def variants(args: argparse.Namespace, users: int) -> list[tuple[str, int | None]]:
    """(source, targets per Listen stream or None for the service's default) to run at a size."""
    runs: list[tuple[str, int | None]] = []
    for source in args.sources:
        if source == "sdk" and users > args.sdk_max_users:
            continue
        per_stream = args.targets_per_stream if source == "listen" and args.targets_per_stream else [None]
        runs += [(source, n) for n in per_stream]
    return runs


async def run(args: argparse.Namespace) -> list[tuple[int, list[Row]]]:
    runs: list[tuple[int, list[Row]]] = []
    with RedisServer() as redis_server:
        for users in args.users:
            rows: list[Row] = []
            for source, per_stream in variants(args, users):
                label = source if per_stream is None else f"{source} ({per_stream}/stream)"
                name = f"listeners-scale-{source}-{users}-{uuid.uuid4().hex[:6]}"
                tmp = Path(tempfile.gettempdir())
                row = Row(label, Result(users, tmp / f"{name}.log", tmp / f"{name}-emulator.log"))
                rows.append(row)
                args.service_env = {"LISTENERS_FIRESTORE_SOURCE": source}
                if per_stream is not None:
                    args.service_env["LISTENERS_FIRESTORE_TARGETS_PER_STREAM"] = str(per_stream)
                if args.gc:
                    probe = str(Path(__file__).resolve().parent / "gc_probe")
                    args.service_env["PYTHONPATH"] = os.pathsep.join(
                        filter(None, [probe, os.environ.get("PYTHONPATH")])
                    )
                    args.service_env["BENCH_GC_LOG"] = str(tmp / f"{name}.gc.jsonl")
                print(f"[scale] {users} users, {label} ...", file=sys.stderr, flush=True)
                emulator = LoggedEmulator(row.result.emulator_log)
                try:
                    with emulator:
                        emulator_env(emulator.host)
                        row.floor = await floor(emulator.host, users, args)
                        await run_size(row.result, args, redis_server.port, emulator)
                except Exception as exc:  # reported; the next run still goes
                    row.result.error = f"{type(exc).__name__}: {exc}"
                r = row.result
                print(
                    f"[scale] {users} {label}: floor {row.floor.synced_s:.1f} s, synced {r.ready_s:.1f} s, "
                    f"threads {r.threads}, idle {r.idle_cpu:.1f} %, rss {r.rss_mb:.0f} MB, "
                    f"p50 {percentile(r.latencies_ms, 50):.0f} p99 {percentile(r.latencies_ms, 99):.0f} ms, "
                    f"stop {r.stop_s:.1f} s" + (f", FAILED: {r.error}" if r.error else ""),
                    file=sys.stderr,
                    flush=True,
                )
            runs.append((users, rows))
    return runs


def ratio(a: float, b: float) -> str:
    return f"{a / b:.0f} x" if b > 0 else "∞ (0 below)"


def render(
    runs: list[tuple[int, list[Row]]], command: str, code: str, started: datetime, elapsed: float
) -> str:
    lines = [
        START,
        *report_head(command, code, started, elapsed),
        "| users | source | floor s | synced s | synced / floor | threads | idle CPU % | RSS MB "
        "| writes | received | p50 ms | p99 ms | max ms | floor p50 ms | floor p99 ms | stop s |",
        "|---:|---|" + "---:|" * 14,
    ]
    for users, rows in runs:
        for row in rows:
            r, f = row.result, row.floor
            lat = r.latencies_ms
            lines.append(
                f"| {users} | {row.source} | {f.synced_s:.1f} | {r.ready_s:.1f} "
                f"| {r.ready_s / f.synced_s:.2f} "
                f"| {r.threads} | {r.idle_cpu:.1f} | {r.rss_mb:.0f} | {r.sent} | {r.received} "
                f"| {percentile(lat, 50):.0f} | {percentile(lat, 99):.0f} | {percentile(lat, 100):.0f} "
                f"| {percentile(f.latencies_ms, 50):.0f} | {percentile(f.latencies_ms, 99):.0f} "
                f"| {r.stop_s:.1f} |"
            )
    lines.append("")
    for users, rows in runs:
        by = {row.source: row.result for row in rows}
        if "sdk" in by and "listen" in by:
            sdk, listen = by["sdk"], by["listen"]
            lines.append(
                f"- {users} users, SDK / Listen: threads {ratio(sdk.threads, listen.threads)}, "
                f"idle CPU {ratio(sdk.idle_cpu, listen.idle_cpu)}, RSS {ratio(sdk.rss_mb, listen.rss_mb)}, "
                f"time to sync {sdk.ready_s / listen.ready_s:.1f} x."
            )
        for row in rows:
            forced = row.result.gc
            if forced:
                lines.append(
                    f"- {users} {row.source}, one full collection (the GC pause, `--gc`): "
                    f"{forced['as-is']['ms']:.1f} ms as the service runs ({forced['as-is']['tracked']:,} "
                    f"objects tracked, {forced['as-is']['frozen']:,} frozen at start-up); "
                    f"{forced['unfrozen']['ms']:.1f} ms with all {forced['unfrozen']['tracked']:,} tracked."
                )
            if row.result.error or row.result.problems:
                lines.append(
                    f"- {users} {row.source}: "
                    + (f"**FAILED: {row.result.error}**; " if row.result.error else "")
                    + f"{len(row.result.problems)} warnings/errors in the service log"
                )
    lines.append(END)
    return "\n".join(lines)


def plot(runs: list[tuple[int, list[Row]]], path: Path) -> Path:
    """Threads, idle CPU and RSS against online users, one line per source."""
    from bench.plot import Panel, save_panels

    def series(metric: Callable[[Result], float]) -> dict[str, list[tuple[float, float]]]:
        lines: dict[str, list[tuple[float, float]]] = {}
        for users, rows in runs:
            for row in rows:
                if not row.result.error:
                    lines.setdefault(row.source, []).append((users, metric(row.result)))
        return lines

    panels = [
        Panel("threads", series(lambda r: r.threads), log_y=True, log_x=True),
        Panel("idle CPU (% of a core)", series(lambda r: r.idle_cpu), log_x=True),
        Panel("RSS (MB)", series(lambda r: r.rss_mb), log_x=True),
    ]
    return save_panels(path, "One instance: SDK source against the Listen source", "online users", panels)


def _transports(text: str) -> list[str]:
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    if not chosen or any(t not in ("rest", "wire") for t in chosen):
        raise argparse.ArgumentTypeError("transports are rest and wire, comma-separated")
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=lambda s: [int(n) for n in s.split(",")], default=[1000])
    parser.add_argument("--sources", type=lambda s: s.split(","), default=["sdk", "listen"])
    parser.add_argument(
        "--targets-per-stream",
        type=lambda s: [int(n) for n in s.split(",")],
        help="Listen source: one run per LISTENERS_FIRESTORE_TARGETS_PER_STREAM (default: the service's)",
    )
    parser.add_argument(
        "--sdk-max-users", type=int, default=1000, help="larger sizes run the Listen source only"
    )
    parser.add_argument("--writes-per-size", type=int, default=1000)
    parser.add_argument(
        "--floor-writes", type=int, default=300, help="writes timed on the floor client, at --rate"
    )
    parser.add_argument("--rate", type=float, default=100.0, help="notification writes per second")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU sampling")
    parser.add_argument("--drain", type=float, default=150.0)
    parser.add_argument("--quiet", type=float, default=15.0)
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--gc", action="store_true", help="time a full collection with and without gc.freeze (bench/gc_probe)"
    )
    parser.add_argument("--profile", type=Path, help="py-spy flame graphs of the idle and write phases here")
    parser.add_argument(
        "--rtdb-transports",
        type=_transports,
        help="issue 27: measure these LISTENERS_RTDB_TRANSPORT values (rest,wire) instead of --sources",
    )
    parser.add_argument(
        "--unread", type=int, default=1, help="--rtdb-transports: unread notifications a user"
    )
    parser.add_argument(
        "--raw-targets-per-stream",
        type=int,
        default=TARGETS_PER_STREAM,
        help="--rtdb-transports: the raw client's targets a Listen stream (default: the service's)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1000, help="--rtdb-transports: users of the warm-up project (0: none)"
    )
    parser.add_argument(
        "--no-raw-after",
        dest="raw_after",
        action="store_false",
        help="--rtdb-transports: no second raw client run once the service stopped",
    )
    parser.add_argument("--settle", type=float, default=3.0, help="--rtdb-transports: seconds before idle")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--code")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # the emulators, stand-ins and services stop with it
    started, began = datetime.now(UTC), time.monotonic()
    given = argv if argv is not None else sys.argv[1:]
    described = _version(["git", "-C", str(PROJECT_ROOT), "describe", "--always", "--dirty"])
    code = args.code or (f"`{described}`" if described else "unknown")
    if args.rtdb_transports:
        args.writes, args.gc_log = args.writes_per_size, False  # what bench.rtdb's run reads
        rows = asyncio.run(run_rtdb(args))
        command = " ".join(
            ["flock /tmp/listeners-bench.lock .venv/bin/python -m bench.scale", *_measuring(given)]
        )
        block = render_rtdb(rows, args, command, code, started, time.monotonic() - began)
        print(block)
        if not args.no_doc:
            update_doc(args.doc, block, RTDB_START, RTDB_END, RTDB_SECTION)
            plot_rtdb(rows, args.doc.parent / RTDB_FIGURE.name)
        return
    runs = asyncio.run(run(args))
    command = " ".join([".venv/bin/python -m bench.scale", *_measuring(given)])
    block = render(runs, command, code, started, time.monotonic() - began)
    print(block)
    if not args.no_doc:
        update_doc(args.doc, block, START, END, SECTION)
        plot(runs, args.doc.parent / FIGURE.name)


if __name__ == "__main__":
    os.environ.setdefault("LISTENERS_FIRESTORE_EMULATOR", "google")
    main()
