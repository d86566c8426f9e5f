"""Latency of the core pipeline: Firestore write -> service -> Redis Pub/Sub subscriber.

Starts a private redis-server and Firestore emulator, then for each user count N a fresh
service process (`uvicorn app.main:app`), N online users in the registry, and notification
writes at a fixed rate over random users. Latency is measured from just before the
Firestore write call to the receipt of that document's `notif.add` by a subscriber on the
exact channels `user:{uid}`. The service's CPU, RSS and threads are sampled with psutil.

    .venv/bin/python -m bench.latency --users 1,100,500 --writes-per-size 300 --rate 20

The results replace the generated block of this benchmark in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import psutil
import redis.asyncio as aioredis
from google.cloud import firestore

from listeners_testkit.documents import notification_data, write_online
from listeners_testkit.processes import (
    GOOGLE,
    PROJECT_ROOT,
    FirestoreEmulator,
    RedisServer,
    ServiceProcess,
    emulator_env,
    emulator_kind,
    wait_for_port,
)

DOC = PROJECT_ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench.latency:start -->", "<!-- bench.latency:end -->"
SECTION = "## Core pipeline latency (`bench/latency.py`)"


@dataclass
class Result:
    """What one size measured; filled in as the run goes, so a failed size still reports."""

    users: int
    log_path: Path  # the service's stdout and stderr
    emulator_log: Path
    sent: int = 0
    write_errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # sorted, one per notif.add received
    rate: float = float("nan")  # writes per second achieved
    ready_s: float = float("nan")  # service started -> every user attached and synced
    idle_cpu: float = float("nan")  # service CPU % (100 = one core), every user attached, no writes
    cpu: float = float("nan")  # service CPU % from the first write to the last event (or drain end)
    emulator_cpu: float = float("nan")
    bench_cpu: float = float("nan")  # this process: writer, subscriber
    machine_cpu: float = float("nan")  # both cores, 100 = all of them
    drain_s: float = float("nan")  # last write sent -> last event received or gave up
    rss_mb: float = float("nan")  # the maxima sampled over the write window
    threads: int = 0
    emulator_rss_mb: float = float("nan")
    stop_s: float = float("nan")
    duplicates: int = 0
    events: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # warnings, errors, non-JSON lines of the log
    error: str = ""
    gc: dict[str, dict[str, Any]] = field(default_factory=dict)  # forced full collections (--gc)

    @property
    def received(self) -> int:
        return len(self.latencies_ms)

    @property
    def others_cpu(self) -> float:
        """CPU % (100 = one core) of everything but the service, emulator and bench: redis-server,
        the kernel, and whatever else shares the machine."""
        return self.machine_cpu * (os.cpu_count() or 1) - self.cpu - self.emulator_cpu - self.bench_cpu


class LoggedEmulator(FirestoreEmulator):
    """The Firestore emulator with its output copied to a file, to see why it failed if it does."""

    def __init__(self, log_path: Path) -> None:
        super().__init__()
        self.output = log_path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        super().stop(sig)
        shutil.copyfile(self.log_path, self.output)


class Consumer:
    """Subscribes to the exact channels `user:{uid}` (no PSUBSCRIBE), as the Reflex bridge does."""

    def __init__(self, client: aioredis.Redis, uids: list[str]) -> None:
        self.pubsub = client.pubsub()
        self.channels = [f"user:{uid}" for uid in uids]
        self.subscribed = 0
        self.synced: set[str] = set()
        self.added: dict[str, float] = {}  # doc_id -> monotonic time of receipt
        self.duplicates = 0
        self.events: Counter[str] = Counter()
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if not self.channels:
            return  # nothing to subscribe to; redis-py's listen() would end at once
        await self.pubsub.subscribe(*self.channels)
        self.task = asyncio.create_task(self._read())
        if not await self.wait(lambda: self.subscribed >= len(self.channels), 30):
            raise TimeoutError(f"subscribed to {self.subscribed} of {len(self.channels)} channels")

    async def _read(self) -> None:
        async for message in self.pubsub.listen():
            now = time.monotonic()
            if message["type"] == "subscribe":
                self.subscribed += 1
            elif message["type"] == "message":
                event = json.loads(message["data"])
                self.events[event["type"]] += 1
                self.record(event, now)
            self.changed.set()

    def record(self, event: dict[str, Any], now: float) -> None:
        """What this benchmark counts: first syncs per user, and each notif.add once."""
        if event["type"] == "notif.sync":
            self.synced.add(event["uid"])
        elif event["type"] == "notif.add":
            self.received_once(event["payload"]["doc_id"], now)

    def received_once(self, key: str, now: float) -> None:
        if key in self.added:
            self.duplicates += 1
        else:
            self.added[key] = now

    async def wait(self, done: Callable[[], bool], timeout: float) -> bool:
        """True once `done()` holds, False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not done():
            if self.task is not None and self.task.done():
                self.task.result()  # the reader failed: raise its error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))
        return True

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.pubsub.aclose()


class BenchService(ServiceProcess):
    """The service for a benchmark: the private Redis and the emulator only, output in a log file."""

    def __init__(
        self,
        redis_port: int,
        emulator_host: str,
        project: str,
        log_path: Path,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        env = {
            **os.environ,
            "LISTENERS_REDIS_HOST": "127.0.0.1",
            "LISTENERS_REDIS_PORT": str(redis_port),
            "FIRESTORE_EMULATOR_HOST": emulator_host,
            "FIREBASE_PROJECT_ID": project,
            "LISTENERS_INSTANCE_ID": "bench",
            "LOG_LEVEL": "WARNING",
        }
        for name in (
            "GOOGLE_PROJECT_ID",
            "FIREBASE_ADMIN_JSON",
            "LISTENERS_REDIS_PASSWORD",
            "FIREBASE_DATABASE_EMULATOR_HOST",  # Firestore only: no Realtime Database client
            "FIREBASE_REALTIME_DB_URL",
        ):
            env.pop(name, None)  # the emulator and the private Redis only
        env.update(extra_env or {})
        super().__init__(env, log_path=log_path)
        self.ps = psutil.Process(self.pid)

    def stop_timed(self) -> float:
        """SIGTERM, then SIGKILL after 60 s; the seconds it took."""
        began = time.monotonic()
        self.stop(signal.SIGTERM, 60.0)
        return time.monotonic() - began


def profile(args: argparse.Namespace, pid: int, phase: str, seconds: float) -> subprocess.Popen[bytes] | None:
    """With --profile DIR: py-spy samples the service for `seconds` (collapsed stacks DIR/PHASE.txt)."""
    folder: Path | None = getattr(args, "profile", None)
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    py_spy = os.environ.get("BENCH_PY_SPY", "/tmp/pyspy/bin/py-spy")
    out = folder / f"{phase}.txt"
    command = [py_spy, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", "50"]
    command += ["--format", "raw", "-o", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def finish(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None:
        await asyncio.get_running_loop().run_in_executor(None, process.wait)


async def forced_collections(pid: int, log: Path, timeout: float = 120.0) -> dict[str, dict[str, Any]]:
    """SIGUSR2 to a service started with bench/gc_probe: its full collections, timed as it is
    and with every object unfrozen ({"as-is": record, "unfrozen": record})."""
    os.kill(pid, signal.SIGUSR2)
    async with asyncio.timeout(timeout):
        while True:
            lines = log.read_text().splitlines() if log.exists() else []
            forced = {r["forced"]: r for r in map(json.loads, lines) if "forced" in r}
            if len(forced) == 2:
                return forced
            await asyncio.sleep(0.2)


def write_notification(db: firestore.Client, uid: str, doc_id: str, sent: dict[str, float]) -> bool:
    """One notification; its send time goes in `sent` unless the write failed."""
    data = notification_data(doc_id)
    ref = db.document(f"clients/{uid}/notifications/{doc_id}")
    t0 = time.monotonic()
    sent[doc_id] = t0
    try:
        ref.set(data, retry=None, timeout=10)
    except Exception:  # counted and reported; a dead emulator is caught by the write loop
        del sent[doc_id]
        return False
    return True


async def wait_healthy(port: int, users: int, timeout: float) -> None:
    """Until /healthz answers status ok with `users` listeners."""
    deadline = time.monotonic() + timeout
    body: object = None
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        while time.monotonic() < deadline:
            try:
                body = (await http.get("/healthz", timeout=5)).json()
            except (httpx.HTTPError, ValueError):
                body = None
            if isinstance(body, dict) and body.get("status") == "ok" and body.get("listeners_count") == users:
                return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"/healthz never showed {users} listeners in {timeout}s (last: {body})")


async def sample(service: psutil.Process, emulator: psutil.Process, r: Result) -> None:
    r.rss_mb = r.emulator_rss_mb = 0.0
    while True:
        r.rss_mb = max(r.rss_mb, service.memory_info().rss / 2**20)
        r.threads = max(r.threads, service.num_threads())
        r.emulator_rss_mb = max(r.emulator_rss_mb, emulator.memory_info().rss / 2**20)
        await asyncio.sleep(0.5)


def check_alive(**processes: subprocess.Popen[bytes] | None) -> None:
    for name, process in processes.items():
        if process is None or process.poll() is not None:
            code = None if process is None else process.returncode
            raise RuntimeError(f"the {name} process exited (status {code})")


def log_problems(path: Path) -> list[str]:
    problems = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            level = json.loads(line).get("level", "")
        except (ValueError, AttributeError):
            level = "TEXT"
        if level in ("WARNING", "ERROR", "CRITICAL", "TEXT") and line.strip():
            problems.append(line.strip())
    return problems


async def run_size(r: Result, args: argparse.Namespace, redis_port: int, emulator: FirestoreEmulator) -> None:
    project = f"bench-{r.users}-{uuid.uuid4().hex[:6]}"
    uids = [f"u{i:04d}" for i in range(r.users)]
    rng = random.Random(args.seed + r.users)
    assert emulator.process is not None
    emu = psutil.Process(emulator.process.pid)
    loop = asyncio.get_running_loop()
    db = firestore.Client(project=project)
    client = aioredis.Redis(host="127.0.0.1", port=redis_port)
    consumer = Consumer(client, uids)
    pool = ThreadPoolExecutor(16, thread_name_prefix="bench-write")
    sampler: asyncio.Task[None] | None = None
    service: BenchService | None = None
    sent: dict[str, float] = {}  # doc_id -> monotonic time just before its write call
    try:
        # The users are online before the service starts, as after a deploy. (On the npm
        # fallback emulator, which resends every watched query on every write, registering
        # them one by one under a running service would also cost O(N^2) resends.)
        await loop.run_in_executor(pool, write_online, db, uids)
        await consumer.start()
        began = time.monotonic()
        service = BenchService(
            redis_port, emulator.host, project, r.log_path, getattr(args, "service_env", None)
        )
        await loop.run_in_executor(None, wait_for_port, service.port, 60.0, service.process)
        await wait_healthy(service.port, r.users, args.ready_timeout)
        if not await consumer.wait(lambda: len(consumer.synced) == r.users, args.ready_timeout):
            raise TimeoutError(f"only {len(consumer.synced)} of {r.users} users got their first notif.sync")
        r.ready_s = time.monotonic() - began

        idle_profile = profile(args, service.pid, "idle", args.idle)
        service.ps.cpu_percent(None)
        await asyncio.sleep(args.idle)
        r.idle_cpu = service.ps.cpu_percent(None)
        await finish(idle_profile)
        gc_log = (getattr(args, "service_env", None) or {}).get("BENCH_GC_LOG")
        if gc_log:
            r.gc = await forced_collections(service.pid, Path(gc_log))
        write_profile = profile(args, service.pid, "writes", args.writes_per_size / args.rate)

        sampler = asyncio.create_task(sample(service.ps, emu, r))
        writes = []
        me = psutil.Process()
        emu.cpu_percent(None)
        me.cpu_percent(None)
        psutil.cpu_percent(None)
        service.ps.cpu_percent(None)
        began = time.monotonic()
        for i in range(args.writes_per_size):
            await asyncio.sleep(max(0.0, began + i / args.rate - time.monotonic()))
            check_alive(service=service.process, emulator=emulator.process)
            uid, doc_id = rng.choice(uids), f"w{i:05d}"
            writes.append(loop.run_in_executor(pool, write_notification, db, uid, doc_id, sent))
        r.write_errors = (await asyncio.gather(*writes)).count(False)
        r.rate = (len(sent) - 1) / max(1e-9, max(sent.values(), default=0) - min(sent.values(), default=0))

        def all_received() -> bool:
            check_alive(service=service.process, emulator=emulator.process)
            return all(doc_id in consumer.added for doc_id in sent)

        drained = time.monotonic()
        while not await consumer.wait(all_received, args.quiet):  # no notif.add for `quiet` s: give up
            if time.monotonic() - drained > args.drain or not any(
                consumer.added.get(doc_id, 0.0) > time.monotonic() - args.quiet for doc_id in sent
            ):
                break
        r.drain_s = time.monotonic() - drained
        await finish(write_profile)
        r.cpu, r.emulator_cpu = service.ps.cpu_percent(None), emu.cpu_percent(None)
        r.bench_cpu, r.machine_cpu = me.cpu_percent(None), psutil.cpu_percent(None)
        await asyncio.sleep(0.5)  # let late duplicates or stray events show up in the counts
    finally:
        if sampler is not None:
            sampler.cancel()
        r.sent = len(sent)  # what was measured so far, also when the size failed
        r.latencies_ms = sorted(
            (consumer.added[doc_id] - t0) * 1000 for doc_id, t0 in sent.items() if doc_id in consumer.added
        )
        try:
            if service is not None:
                r.stop_s = service.stop_timed()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            r.duplicates, r.events = consumer.duplicates, consumer.events
            await consumer.stop()
            await client.aclose()
            db.close()
            r.problems = log_problems(r.log_path)


def _message(line: str) -> str:
    try:
        return str(json.loads(line).get("message", line))
    except (ValueError, AttributeError):
        return line


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values; NaN when there are none."""
    if not values:
        return float("nan")
    return values[max(0, min(len(values), math.ceil(q / 100 * len(values))) - 1)]


def _version(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine() -> str:
    model = "?"
    with Path("/proc/cpuinfo").open() as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    redis_version = _version(["redis-server", "--version"]).split(" v=")[-1].split(" ")[0]
    kind = emulator_kind()
    if kind == GOOGLE:  # a Java program: its runtime and the Debian package's version
        try:
            java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=10).stderr
        except (OSError, subprocess.SubprocessError):
            java = ""
        java_version = java.split('"')[1] if java.count('"') >= 2 else "?"
        package = "google-cloud-cli-firestore-emulator"
        package_version = _version(["dpkg-query", "-W", "-f=${Version}", package]) or "?"
        runtime = f"Java {java_version}, {package} {package_version}"
    else:
        runtime = f"node {_version(['node', '--version'])}"
    return (
        f"{os.cpu_count()} cores ({model}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"redis-server {redis_version}, {runtime}, "
        f"{FirestoreEmulator.describe(kind)}"
    )


def report_head(command: str, code: str, started: datetime, elapsed: float) -> list[str]:
    """The lines every benchmark's block opens with: when, the exact command, the machine, the code."""
    return [
        f"Run of {started:%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s in all.",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}.",
        "",
        f"Code: {code}.",
        "",
    ]


def render(results: list[Result], command: str, code: str, started: datetime, elapsed: float) -> str:
    lines = [
        START,
        *report_head(command, code, started, elapsed),
        "| users | writes sent | received | missing | p50 ms | p95 ms | p99 ms | max ms "
        "| service CPU % | RSS MB | threads | idle CPU % | emulator CPU % | ready s | stop s |",
        "|" + "---:|" * 15,
    ]
    for r in results:
        p = [percentile(r.latencies_ms, q) for q in (50, 95, 99, 100)]
        lines.append(
            f"| {r.users} | {r.sent} | {r.received} | {r.sent - r.received} "
            + "".join(f"| {v:.0f} " for v in p)
            + f"| {r.cpu:.0f} | {r.rss_mb:.0f} | {r.threads} | {r.idle_cpu:.0f} | {r.emulator_cpu:.0f} "
            f"| {r.ready_s:.1f} | {r.stop_s:.1f} |"
        )
    lines += ["", "Per size:"]
    for r in results:
        events = ", ".join(f"{k} {v}" for k, v in sorted(r.events.items())) or "none"
        kinds = Counter(_message(line) for line in r.problems)
        logged = "; ".join(f"{n} x `{m[:160]}`" for m, n in kinds.most_common(3))
        lines.append(
            f"- {r.users} user{'' if r.users == 1 else 's'}: "
            + (f"**FAILED: {r.error}**; " if r.error else "")
            + f"{r.rate:.1f} writes/s achieved, {r.write_errors} write errors; events received: {events}; "
            f"duplicate notif.add: {r.duplicates}; drain {r.drain_s:.1f} s; CPU % over the window: "
            f"bench {r.bench_cpu:.0f}, whole machine {r.machine_cpu:.0f} (of 100), "
            f"everything else {r.others_cpu:.0f} (of {100 * (os.cpu_count() or 1)}); "
            f"emulator peak RSS {r.emulator_rss_mb:.0f} MB; "
            f"service log warnings/errors: {len(r.problems)}" + (f" ({logged})" if logged else "")
        )
    lines.append(END)
    return "\n".join(lines)


def update_doc(path: Path, block: str, start: str = START, end: str = END, section: str = SECTION) -> None:
    """Replace the generated block (from `start` to `end`) in `path`, or append a new section."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\nOne section per benchmark.\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{section}\n\n{block}\n"
    path.write_text(text)


async def run(args: argparse.Namespace) -> list[Result]:
    """One redis-server for the whole run; a fresh emulator and service for each size."""
    results: list[Result] = []
    with RedisServer() as redis_server:
        for users in args.users:
            print(f"[bench] {users} users ...", file=sys.stderr, flush=True)
            name = f"listeners-bench-{users}-{uuid.uuid4().hex[:6]}"
            r = Result(
                users,
                Path(tempfile.gettempdir()) / f"{name}.log",
                Path(tempfile.gettempdir()) / f"{name}-emulator.log",
            )
            results.append(r)
            emulator = LoggedEmulator(r.emulator_log)
            try:
                with emulator:
                    emulator_env(emulator.host)
                    await run_size(r, args, redis_server.port, emulator)
            except Exception as exc:  # reported in the results; the next size still runs
                r.error = f"{type(exc).__name__}: {exc}"
                log = r.emulator_log if r.emulator_log.exists() else Path(emulator.log_path)
                fatal = [line for line in log.read_text(errors="replace").splitlines() if "FATAL" in line]
                r.error += f" (emulator: {fatal[-1].strip()})" if fatal else ""
            lat = r.latencies_ms
            print(
                f"[bench] {users} users: {r.received}/{r.sent} received, "
                f"p50 {percentile(lat, 50):.0f} p99 {percentile(lat, 99):.0f} "
                f"max {percentile(lat, 100):.0f} ms, cpu {r.cpu:.0f}%, rss {r.rss_mb:.0f} MB, "
                f"threads {r.threads}, log {r.log_path} ({len(r.problems)} warnings/errors)"
                + (f", FAILED: {r.error}" if r.error else ""),
                file=sys.stderr,
                flush=True,
            )
    return results


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM as Ctrl-C (every benchmark): it unwinds through every finally, which stops the
    children and deletes a fault lab's namespaces."""
    raise KeyboardInterrupt


def _measuring(argv: list[str]) -> list[str]:
    """The arguments without those that say where results go (--doc, --no-doc, --code)."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg == "--no-doc" or arg.startswith(("--doc=", "--code=")):
            skip = False
        elif arg in ("--doc", "--code"):
            skip = True
        else:
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=lambda s: [int(n) for n in s.split(",")], default=[1, 100, 500])
    parser.add_argument("--writes-per-size", type=int, default=300)
    parser.add_argument("--rate", type=float, default=20.0, help="notification writes per second")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of idle CPU sampling")
    parser.add_argument("--drain", type=float, default=150.0, help="most seconds to wait for late events")
    parser.add_argument("--quiet", type=float, default=15.0, help="stop waiting after this long with none")
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file to update")
    parser.add_argument("--no-doc", action="store_true", help="print the results only")
    parser.add_argument("--code", help="what code was measured (default: git describe --dirty)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started, began = datetime.now(UTC), time.monotonic()
    try:
        results = asyncio.run(run(args))
    except KeyboardInterrupt:
        print("[bench] interrupted; every process it started is stopped", file=sys.stderr)
        raise SystemExit(130) from None
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join([".venv/bin/python -m bench.latency", *_measuring(given)])
    described = _version(["git", "-C", str(PROJECT_ROOT), "describe", "--always", "--dirty"])
    code = args.code or (f"`{described}`" if described else "unknown (not a git checkout)")
    if not args.code and described.endswith("-dirty"):
        code += " (`-dirty`: with uncommitted changes)"
    block = render(results, command, code, started, time.monotonic() - began)
    print(block)
    if not args.no_doc:
        update_doc(args.doc, block)


if __name__ == "__main__":
    main()
