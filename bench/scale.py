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

The results replace the generated block of this benchmark in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from google.cloud import firestore

from bench.latency import (
    DOC,
    LoggedEmulator,
    Result,
    _measuring,
    _version,
    percentile,
    report_head,
    run_size,
    update_doc,
    write_notification,
)
from listeners.source.listen import ListenSource
from listeners.source.snapshots import Query, Snapshot
from listeners_testkit.processes import PROJECT_ROOT, RedisServer, emulator_env

START, END = "<!-- bench.scale:start -->", "<!-- bench.scale:end -->"
FIGURE = DOC.parent / "scale.png"
SECTION = "## Scale: SDK source against the Listen source (`bench/scale.py`)"


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
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--code")
    args = parser.parse_args(argv)
    started, began = datetime.now(UTC), time.monotonic()
    runs = asyncio.run(run(args))
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join([".venv/bin/python -m bench.scale", *_measuring(given)])
    described = _version(["git", "-C", str(PROJECT_ROOT), "describe", "--always", "--dirty"])
    code = args.code or (f"`{described}`" if described else "unknown")
    block = render(runs, command, code, started, time.monotonic() - began)
    print(block)
    if not args.no_doc:
        update_doc(args.doc, block, START, END, SECTION)
        plot(runs, args.doc.parent / FIGURE.name)


if __name__ == "__main__":
    os.environ.setdefault("LISTENERS_FIRESTORE_EMULATOR", "google")
    main()
