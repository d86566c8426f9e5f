"""Soak: one service under mixed writes for a long time, a fault every few minutes; does it stay
flat?

One service instance in the fault lab (`bench/faultlab.py`), `--users` online (the first
`--chat-users` with a chat thread open), one Bridge consumer with the reducers per user, and
writes the whole time: notifications (add, update, read, delete), direct messages (add,
read) and chat messages. Every `--fault-every` seconds a fault from bench/faults.py, in turn.
Every `--sample-every` seconds: the service's RSS, threads and open file descriptors
(psutil), its asyncio tasks and open Firestore watch streams (/metrics), the stand-in's open
Realtime Database streams, and the p99 of write-to-consumer latency over the interval.

Pass: once writes stop the consumer equals the database (nothing lost, no duplicate);
RSS grows less than 5 % from the end of the warm-up to the end; tasks, file descriptors and
streams at rest after the run are no more than at rest before it (no leak); the p99 of the
intervals clear of faults stays within 3x their median (steady).

    flock /tmp/listeners-bench.lock .venv/bin/python -m bench.soak --minutes 30 --users 1000

It draws docs/soak.png and replaces the generated block of this benchmark in
docs/benchmarks.md. tests/test_soak.py runs the same for 2 minutes at 100 users in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
from google.cloud import firestore

from bench.cluster import Instance, describe_code
from bench.faultlab import (
    Consumer,
    Lab,
    Monitor,
    Writer,
    compare,
    firestore_truth,
    log,
    new_project,
    parse_metrics,
    process_figures,
    registry_batch,
    rtdb_truth,
    stop_run,
)
from bench.faults import BY_NAME, Durations, Run, Scenario
from bench.latency import _measuring, _terminate, percentile, report_head, update_doc
from bench.plot import Panel, save_panels
from listeners_testkit.processes import PROJECT_ROOT

DOC = PROJECT_ROOT / "docs" / "benchmarks.md"
FIGURE = PROJECT_ROOT / "docs" / "soak.png"
START, END = "<!-- bench.soak:start -->", "<!-- bench.soak:end -->"
SECTION = "## Soak (`bench/soak.py`)"
# In turn, one every `fault_every`: a 30-minute run with one every 5 minutes has five (the
# sixth would end after the writes), so the first five are those the soak at 1,000 users sees.
FAULTS = [
    "redis-blackhole",
    "redis-halfopen-reset",
    "rtdb-cut",
    "redis-firestore-halfopen",
    "firestore-lossy",
    "redis-restart",
    "rtdb-slow",
    "firestore-blackhole-restart",
]
RSS_GROWTH = 0.05
# Pooled keep-alive connections (httpx's for REST calls, redis-py's for commands) may be open
# or not at rest: a CI run ended with one more than it began. A leak per user, stream or fault
# shows in tens or hundreds at these sizes.
FD_SLACK = 4
# Likewise one or two tasks in the middle of their work at every reading (a CI run ended with
# one more, cause not found): a task leaked per user, stream or fault would be tens.
TASK_SLACK = 2
SLACK = {"fds": FD_SLACK, "tasks": TASK_SLACK}
P99_SPREAD = 3.0
CHAT_WINDOW = 100  # the service's chat history (streams/chat.py): messages of a thread held


@dataclass
class Sample:
    at: float  # seconds since the writes began
    rss_mb: float
    threads: int
    fds: int
    tasks: int
    watch_streams: int
    rtdb_streams: int
    p99_ms: float
    writes: int  # write operations started in the interval
    fault: bool  # a fault was on, or had ended less than 30 s ago, during the interval
    # To tell the service from the lab: the p99 timed from the attempt that succeeded (a write
    # retried through a fault is otherwise timed from its first attempt), per kind of item,
    # each process's CPU (% of one core) over the interval, and what the database holds.
    p99_landed_ms: float = float("nan")
    p99_kind_ms: dict[str, float] = field(default_factory=dict)
    service_cpu: float = float("nan")
    bench_cpu: float = float("nan")
    held: int = 0  # unread notifications, direct messages, chat messages in the windows
    inflight: int = 0  # writes started and not done (retrying through a fault)
    bench_lag_ms: float = float("nan")  # the benchmark's own event loop: its worst lag
    bench_gc_ms: float = float("nan")  # the benchmark's longest full (generation 2) collection


@dataclass
class Rest:
    """The counts with every user attached and nothing being written."""

    rss_mb: float
    threads: int
    fds: int
    tasks: int
    watch_streams: int
    rtdb_streams: int


@dataclass
class Soak:
    users: int
    seconds: float
    warmup: float
    samples: list[Sample] = field(default_factory=list)
    faults: list[tuple[float, float, str, str]] = field(default_factory=list)  # began, ended, name, how
    before: Rest | None = None
    after: Rest | None = None
    missing: int = -1
    extra: int = -1
    chat_lost: int = -1
    duplicates: int = 0
    examples: list[str] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)
    failed_writes: int = 0
    error: str = ""
    fault_on: bool = False  # a fault is being injected (it joins `faults` once it ends)

    def rss_growth(self) -> float:
        """From the first sample after the warm-up to the last (medians of three, against noise)."""
        after = [s.rss_mb for s in self.samples if s.at >= self.warmup]
        if len(after) < 2:
            return float("nan")
        first = statistics.median(after[:3])
        last = statistics.median(after[-3:])
        return (last - first) / first

    def p99s(self) -> list[float]:
        return [
            s.p99_ms for s in self.samples if not s.fault and s.at >= self.warmup and s.p99_ms == s.p99_ms
        ]

    def leaks(self) -> list[str]:
        if self.before is None or self.after is None:
            return ["not measured"]
        found = []
        for name in ("tasks", "fds", "watch_streams", "rtdb_streams"):
            b, a = getattr(self.before, name), getattr(self.after, name)
            if a > b + SLACK.get(name, 0):
                found.append(f"{name} {b} -> {a}")
        return found

    def verdicts(self) -> list[tuple[str, bool, str]]:
        growth, p99 = self.rss_growth(), self.p99s()
        spread = max(p99) / statistics.median(p99) if p99 else float("nan")
        lost = self.missing + self.extra + self.chat_lost
        return [
            (
                "nothing lost",
                lost == 0 and not self.error,
                f"{lost} item(s) wrong or missing" + (f"; {self.error}" if self.error else ""),
            ),
            ("no duplicate", self.duplicates == 0, f"{self.duplicates} duplicate event(s)"),
            (f"RSS growth after warm-up < {RSS_GROWTH:.0%}", growth < RSS_GROWTH, f"{growth:+.1%}"),
            ("no leaked task, fd or stream", not self.leaks(), ", ".join(self.leaks()) or "none"),
            (
                f"p99 steady (clear of faults, max within {P99_SPREAD:g}x median)",
                spread <= P99_SPREAD,
                f"median {statistics.median(p99) if p99 else float('nan'):.0f} ms, "
                f"max {max(p99, default=float('nan')):.0f} ms",
            ),
        ]


async def at_rest(instance: Instance, monitor: Monitor, lab: Lab, ns: str) -> Rest:
    """The counts once the loop has had a moment: a few readings, the smallest of each (a task
    or a connection in the middle of its work is not a leak)."""
    readings = []
    for _ in range(5):
        await asyncio.sleep(1.0)
        readings.append(await counts(instance, monitor, lab, ns))
    return Rest(
        min(r.rss_mb for r in readings),
        min(r.threads for r in readings),
        min(r.fds for r in readings),
        min(r.tasks for r in readings),
        min(r.watch_streams for r in readings),
        min(r.rtdb_streams for r in readings),
    )


async def counts(instance: Instance, monitor: Monitor, lab: Lab, ns: str) -> Rest:
    """One reading of the counts, now."""
    rss, threads, fds = process_figures(instance.ps)
    metrics = await read_metrics(monitor, instance)
    return Rest(
        rss,
        threads,
        fds,
        int(metrics.get("listeners_asyncio_tasks", -1)),
        int(metrics.get("listeners_open_streams", -1)),
        await standin_streams(lab, ns),
    )


async def standin_streams(lab: Lab, ns: str) -> int:
    """The stand-in's open streams; -1 when it cannot be asked (its namespace is blackholed:
    the sample is still taken, without this figure)."""
    try:
        async with asyncio.timeout(2.0):
            return await lab.standin.open_streams(ns)
    except (TimeoutError, httpx.HTTPError):
        return -1


async def read_metrics(monitor: Monitor, instance: Instance) -> dict[str, float]:
    try:
        text = (await monitor.http.get(f"http://127.0.0.1:{instance.service.port}/metrics", timeout=10)).text
    except httpx.HTTPError:
        return {}
    return parse_metrics(text)


@dataclass
class Settings:
    users: int = 1000
    seconds: float = 1800.0
    warmup: float = 300.0
    fault_every: float = 300.0
    sample_every: float = 10.0
    notif_rate: float = 10.0
    dm_rate: float = 5.0
    chat_rate: float = 2.0
    chat_users: int = 50
    # The data held steady (`Writer(steady=True)`), at this size from the start: per user,
    # unread notifications and direct messages; per chat thread, the service's whole window.
    steady: bool = True
    prefill_notifications: int = 3
    prefill_messages: int = 3
    # The benchmark's own heap (1,000 iterators, the consumer's lists, every write's times) is
    # frozen once set up, so that its full collections stay short: in a 30-minute run they
    # stalled its loop for 250-350 ms every few minutes, and each showed as a p99 spike.
    freeze_gc: bool = True
    faults: list[str] = field(default_factory=lambda: list(FAULTS))
    durations: Durations = field(default_factory=Durations)
    ready_timeout: float = 300.0
    converge_timeout: float = 180.0


async def run_soak(lab: Lab, s: Settings, logs: Path) -> Soak:
    soak = Soak(s.users, s.seconds, s.warmup)
    project, ns = new_project("soak")
    uids = [f"u{i:04d}" for i in range(s.users)]
    chat_uids = uids[: s.chat_users]
    db = firestore.Client(project=project)
    http = httpx.AsyncClient(base_url=f"http://{lab.rtdb.address}")
    instances: list[Instance] = []
    monitor = Monitor(instances)
    consumer = Consumer(lab.redis_settings(), uids, chat_uids)
    writer = Writer(
        db,
        http,
        ns,
        uids,
        s.notif_rate,
        s.dm_rate,
        chat_uids=chat_uids,
        chat_rate=s.chat_rate,
        steady=s.steady,
    )
    tasks: list[asyncio.Task[None]] = []
    try:
        await asyncio.to_thread(registry_batch, db, uids, chat_uids)
        if s.steady:
            count = await writer.prefill(s.prefill_notifications, s.prefill_messages, CHAT_WINDOW)
            log(f"soak: {count} items written before the service starts")
        instance = lab.instance("soak", project, ns, logs, LOG_LEVEL="INFO")
        instances.append(instance)
        monitor.start()
        await consumer.start()
        began = time.monotonic()
        if not await consumer.wait(lambda: consumer.ready() == s.users, s.ready_timeout):
            raise TimeoutError(f"only {consumer.ready()} of {s.users} users synced")
        log(f"soak: {s.users} users synced in {time.monotonic() - began:.0f} s")
        if s.freeze_gc:
            gc.collect()
            gc.freeze()
        soak.before = await at_rest(instance, monitor, lab, ns)
        log(f"soak: at rest before: {soak.before}")
        began = time.monotonic()
        tasks.append(asyncio.create_task(writer.run()))
        tasks.append(
            asyncio.create_task(sample(soak, instance, monitor, lab, ns, consumer, writer, began, s))
        )
        run = Run(lab, instances, writer, db, uids, monitor, s.durations)
        n = 0
        while True:
            next_fault = began + (n + 1) * s.fault_every
            if next_fault + s.durations.longest > began + s.seconds:
                break
            await asyncio.sleep(max(0.0, next_fault - time.monotonic()))
            if instance.service.process.poll() is not None:
                raise RuntimeError(f"the service exited ({instance.service.process.returncode})")
            scenario: Scenario = BY_NAME[s.faults[n % len(s.faults)]]
            log(f"soak: fault {n + 1}: {scenario.name}")
            soak.fault_on = True
            await scenario.inject(run)
            soak.fault_on = False
            soak.faults.append((run.began - began, run.healed - began, scenario.name, run.how))
            n += 1
        await asyncio.sleep(max(0.0, began + s.seconds - time.monotonic()))
        writer.paused = True
        tasks[1].cancel()  # the samples cover the writes only
        await writer.drain(300.0)
        stopped = time.monotonic()
        while True:
            notif = await asyncio.to_thread(firestore_truth, db, uids)
            dms = await rtdb_truth(http, ns)
            truth = {uid: {**notif[uid], **{f"m:{k}": "dm" for k in dms.get(uid, set())}} for uid in uids}
            soak.missing, soak.extra, soak.examples = compare(consumer.state(), truth)
            chat_missing = {uid: writer.chats[uid] - consumer.chat_ids(uid) for uid in chat_uids}
            soak.chat_lost = sum(len(v) for v in chat_missing.values())
            if (
                soak.missing + soak.extra + soak.chat_lost == 0
                or time.monotonic() - stopped > s.converge_timeout
            ):
                soak.examples += [f"{uid} chat {sorted(v)[:3]}" for uid, v in chat_missing.items() if v][:3]
                break
            await asyncio.sleep(1.0)
        log(
            f"soak: compared after {time.monotonic() - stopped:.0f} s: missing {soak.missing}, "
            f"extra {soak.extra}, chat {soak.chat_lost}"
        )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tasks.clear()
        soak.after = await at_rest(instance, monitor, lab, ns)
        log(f"soak: at rest after: {soak.after}")
        soak.duplicates = consumer.duplicates
        soak.ops, soak.failed_writes = writer.writes.ops, writer.writes.failed
    except Exception as exc:
        soak.error = f"{type(exc).__name__}: {exc}"
        log(f"soak: FAILED: {soak.error}")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await stop_run(writer, consumer, monitor, instances, http, db)
        gc.unfreeze()
    return soak


async def sample(
    soak: Soak,
    instance: Instance,
    monitor: Monitor,
    lab: Lab,
    ns: str,
    consumer: Consumer,
    writer: Writer,
    began: float,
    s: Settings,
) -> None:
    me = psutil.Process()
    me.cpu_percent(None)
    instance.ps.cpu_percent(None)
    lag = [0.0]
    full_gc = [0.0, 0.0]  # when the running one began, the longest since the last sample

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            full_gc[0] = time.monotonic()
        else:
            full_gc[1] = max(full_gc[1], time.monotonic() - full_gc[0])

    gc.callbacks.append(on_gc)

    async def watch_loop() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.05)
            lag[0] = max(lag[0], time.monotonic() - before - 0.05)

    watching = asyncio.create_task(watch_loop())
    last = began
    counted = 0
    try:
        while True:
            await asyncio.sleep(max(0.0, last + s.sample_every - time.monotonic()))
            now = time.monotonic()
            with contextlib.suppress(psutil.Error, httpx.HTTPError):
                now_counts = await counts(instance, monitor, lab, ns)
                sent, landed = writer.writes.sent, writer.writes.landed
                seen_now = {k: consumer.seen[k] for k in sent if last <= consumer.seen.get(k, -1.0) < now}
                latencies = sorted((at - sent[k]) * 1000 for k, at in seen_now.items())
                from_landed = sorted(
                    max(0.0, at - landed.get(k, sent[k])) * 1000 for k, at in seen_now.items()
                )
                by_kind: dict[str, list[float]] = {}
                for k, at in seen_now.items():
                    by_kind.setdefault(_kind(k), []).append((at - sent[k]) * 1000)
                held = (
                    sum(len(v) for v in writer.unread.values())
                    + sum(len(v) for v in writer.dms.values())
                    + sum(
                        min(len(v) + writer.chat_prefilled.get(uid, 0), CHAT_WINDOW)
                        for uid, v in writer.chats.items()
                    )
                )
                ops = sum(writer.writes.ops.values())
                faulty = soak.fault_on or any(
                    b <= now - began and last - began <= e + 30 for b, e, _, _ in soak.faults
                )
                soak.samples.append(
                    Sample(
                        now - began,
                        now_counts.rss_mb,
                        now_counts.threads,
                        now_counts.fds,
                        now_counts.tasks,
                        now_counts.watch_streams,
                        now_counts.rtdb_streams,
                        percentile(latencies, 99),
                        ops - counted,
                        faulty,
                        percentile(from_landed, 99),
                        {kind: percentile(sorted(v), 99) for kind, v in by_kind.items()},
                        instance.ps.cpu_percent(None),
                        me.cpu_percent(None),
                        held,
                        len(writer.inflight),
                        lag[0] * 1000,
                        full_gc[1] * 1000,
                    )
                )
                lag[0] = full_gc[1] = 0.0
                x = soak.samples[-1]
                log(
                    f"sample {x.at:.0f} s: rss {x.rss_mb:.1f} MB, cpu service {x.service_cpu:.0f} % "
                    f"bench {x.bench_cpu:.0f} %, p99 {x.p99_ms:.0f} (landed {x.p99_landed_ms:.0f}; "
                    + ", ".join(f"{k} {v:.0f}" for k, v in sorted(x.p99_kind_ms.items()))
                    + f") ms, writes {x.writes}, in flight {x.inflight}, held {x.held}, "
                    f"streams {x.watch_streams}/{x.rtdb_streams}, tasks {x.tasks}, fds {x.fds}, "
                    f"bench loop lag {x.bench_lag_ms:.0f} ms, full gc {x.bench_gc_ms:.0f} ms"
                )
                counted = ops
            last = now

    finally:
        watching.cancel()
        gc.callbacks.remove(on_gc)


def _kind(key: str) -> str:
    """An item key ("uid/n0000012") -> notification, dm or chat."""
    first = key.split("/", 1)[1][:1]
    return {"n": "notif", "p": "notif", "m": "dm", "q": "dm", "-": "chat"}.get(first, "?")


def render(
    soak: Soak,
    s: Settings,
    lab: str,
    load: str,
    command: str,
    code: str,
    started: datetime,
    elapsed: float,
    figure: str,
) -> str:
    lines = [
        START,
        "",
        *report_head(command, code, started, elapsed),
        f"Lab: {lab}. Load average at the start: {load}.",
        "",
        f"{s.users} users online ({s.chat_users} with a chat thread), {s.seconds / 60:g} minutes of writes: "
        f"{s.notif_rate:g} notification operations/s (add, update, read, delete), "
        f"{s.dm_rate:g} direct-message operations/s (add, read), {s.chat_rate:g} chat messages/s; "
        f"a fault every {s.fault_every / 60:g} min; "
        f"a sample every {s.sample_every:g} s; warm-up {s.warmup / 60:g} min. Writes: "
        + ", ".join(f"{k} {v}" for k, v in sorted(soak.ops.items()))
        + (f" ({soak.failed_writes} given up)" if soak.failed_writes else "")
        + ".",
        "",
        f"![soak]({figure})",
        "",
        "| check | pass | measured |",
        "|---|---|---|",
    ]
    for name, ok, measured in soak.verdicts():
        lines.append(f"| {name} | {'yes' if ok else '**no**'} | {measured} |")
    lines += ["", "Faults (seconds from the first write):", ""]
    for b, e, name, how in soak.faults:
        lines.append(f"- {b:.0f} to {e:.0f} s: {name} ({how})")
    b4, a = soak.before, soak.after
    if b4 and a:
        lines += [
            "",
            "| at rest | RSS MB | threads | fds | asyncio tasks | Firestore watch streams | RTDB streams |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *(
                f"| {when} | {r.rss_mb:.0f} | {r.threads} | {r.fds} | {r.tasks} | {r.watch_streams} "
                f"| {r.rtdb_streams} |"
                for when, r in (("before", b4), ("after", a))
            ),
        ]
    lines += [
        "",
        "Samples, one row a minute (the figure has them all):",
        "",
        "| minute | RSS MB | threads | fds | tasks | watch streams | RTDB streams | p99 ms | writes "
        "| fault |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    step = max(1, round(60 / s.sample_every))
    for x in soak.samples[step - 1 :: step]:
        lines.append(
            f"| {x.at / 60:.0f} | {x.rss_mb:.0f} | {x.threads} | {x.fds} | {x.tasks} | {x.watch_streams} "
            f"| {x.rtdb_streams} | {x.p99_ms:.0f} | {x.writes} | {'yes' if x.fault else ''} |"
        )
    if soak.examples:
        lines += ["", "Differences: " + "; ".join(soak.examples)]
    lines += ["", END]
    return "\n".join(lines)


def draw(soak: Soak, path: Path) -> Path:
    minutes = [x.at / 60 for x in soak.samples]

    def series(values: list[float]) -> list[tuple[float, float]]:
        return list(zip(minutes, values, strict=True))

    return save_panels(
        path,
        f"Soak: {soak.users} users, {soak.seconds / 60:g} min, a fault every few minutes",
        "minutes",
        [
            Panel("RSS MB", {"service": series([x.rss_mb for x in soak.samples])}),
            Panel(
                "count",
                {
                    "threads": series([x.threads for x in soak.samples]),
                    "fds": series([x.fds for x in soak.samples]),
                    "asyncio tasks / 10": series([x.tasks / 10 for x in soak.samples]),
                },
            ),
            Panel(
                "open streams",
                {
                    "Firestore watches": series([x.watch_streams for x in soak.samples]),
                    "RTDB streams": series([x.rtdb_streams for x in soak.samples]),
                },
            ),
            Panel(
                "p99 latency ms", {"write -> consumer": series([x.p99_ms for x in soak.samples])}, log_y=True
            ),
        ],
    )


async def run(s: Settings, logs: Path, use_netns: bool | None) -> tuple[Soak, str]:
    with Lab(use_netns) as lab:
        log(lab.describe())
        return await run_soak(lab, s, logs), lab.describe()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0, help="minutes")
    parser.add_argument("--fault-every", type=float, default=5.0, help="minutes")
    parser.add_argument("--fault", type=float, default=30.0, help="seconds of a blackhole, cut or slow link")
    parser.add_argument("--lossy", type=float, default=60.0, help="seconds of latency and loss")
    parser.add_argument(
        "--halfopen", type=float, default=20.0, help="seconds the service's Redis link is half-open"
    )
    parser.add_argument(
        "--halfopen-both",
        type=float,
        default=40.0,
        help="seconds the service's Redis and Firestore links are half-open together",
    )
    parser.add_argument("--notif-rate", type=float, default=10.0)
    parser.add_argument("--dm-rate", type=float, default=5.0)
    parser.add_argument("--chat-rate", type=float, default=2.0)
    parser.add_argument("--chat-users", type=int, default=50)
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help="comma-separated, taken in turn, of: " + ", ".join(BY_NAME)
    )
    parser.add_argument("--no-gc-freeze", action="store_true", help="leave the benchmark's heap unfrozen")
    parser.add_argument("--no-netns", action="store_true")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--figure", type=Path, default=FIGURE)
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--code")
    args = parser.parse_args(argv)
    s = Settings(
        users=args.users,
        seconds=args.minutes * 60,
        warmup=args.warmup * 60,
        fault_every=args.fault_every * 60,
        notif_rate=args.notif_rate,
        dm_rate=args.dm_rate,
        chat_rate=args.chat_rate,
        chat_users=min(args.chat_users, args.users),
        faults=[name for name in args.faults.split(",") if name],
        freeze_gc=not args.no_gc_freeze,
        durations=Durations(
            fault=args.fault, lossy=args.lossy, halfopen=args.halfopen, halfopen_both=args.halfopen_both
        ),
    )
    signal.signal(signal.SIGTERM, _terminate)
    started, began = datetime.now(UTC), time.monotonic()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    logs = Path(tempfile.mkdtemp(prefix="listeners-soak-"))
    log(f"logs in {logs}")
    soak, lab = asyncio.run(run(s, logs, False if args.no_netns else None))
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(
        ["flock /tmp/listeners-bench.lock .venv/bin/python -m bench.soak", shlex.join(_measuring(given))]
    ).strip()
    # a run that leaves the docs alone leaves their figure alone too: it goes with the logs
    figure = draw(soak, logs / args.figure.name if args.no_doc else args.figure)
    relative = os.path.relpath(figure, args.doc.parent)
    block = render(
        soak, s, lab, load, command, args.code or describe_code(), started, time.monotonic() - began, relative
    )
    print(block)
    if not args.no_doc:
        update_doc(args.doc, block, START, END, SECTION)
    if not all(ok for _, ok, _ in soak.verdicts()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
