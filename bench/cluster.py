"""Several instances sharing the users: latency and throughput with 1, 2 and 3 of them, and
the takeover of a killed instance's users.

Load (for each K in --instances): a private redis-server, a fresh Firestore emulator and
project, --users registry documents written before anything starts (heartbeat_at in 2999,
so no heartbeat write is needed), then K service processes (`uvicorn app.main:app`), each
with its own LISTENERS_INSTANCE_ID, the same Redis and the same project. Once the users are
spread as rendezvous hashing says (each instance's /healthz listeners_count is its share,
the sum is --users) and every user has had a first notif.sync, --seconds of notification
writes at each --rate (writes per second), each to a random user; latency from just before
the write call to the receipt of that document's notif.add by one subscriber on the exact
channels `user:{uid}`.

Takeover (for each K in --takeover-instances): --takeover-users users spread over K
instances, then kill -9 of one; the time from the kill until every user it served has had a
fresh notif.sync (from its new owner: the killed one cannot publish), split into detection
(the membership entry `{id}#{nonce}` lives 3 s) and re-attaching, and until the survivors'
listeners_count sums to --takeover-users; and how long each survivor's event loop was held up
meanwhile (the gaps between its answers, and its own `listeners_loop_lag_seconds`).

    .venv/bin/python -m bench.cluster

The results replace the generated block of this benchmark in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
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
from bench.latency import log_problems, percentile, report_head
from listeners.cluster import MEMBERS_KEY, entry_id, owner
from listeners_testkit.documents import FOREVER, notification_data, write_online
from listeners_testkit.processes import PROJECT_ROOT, FirestoreEmulator, RedisServer, ServiceProcess

DOC = PROJECT_ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench.cluster:start -->", "<!-- bench.cluster:end -->"
SECTION = "## Several instances (`bench/cluster.py`)"
TAKEOVER_START, TAKEOVER_END = "<!-- bench.cluster.takeover:start -->", "<!-- bench.cluster.takeover:end -->"
TAKEOVER_SECTION = "### Takeover after kill -9 (`bench/cluster.py`)"
ADMIN_TOKEN = "bench-cluster-admin-token-0123"
CONTROL_TOKEN = "bench-cluster-control-token-0123"
NAN = float("nan")
CORES = os.cpu_count() or 1


def log(text: str) -> None:
    print(f"[bench.cluster] {text}", file=sys.stderr, flush=True)


# -- the processes -----------------------------------------------------------------


class Instance:
    """One service process with its own LISTENERS_INSTANCE_ID, sampled with psutil."""

    def __init__(
        self,
        instance_id: str,
        redis_port: int,
        emulator_host: str,
        project: str,
        logs: Path,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.id = instance_id
        self.log_path = logs / f"{instance_id}.log"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("LISTENERS_", "FIREBASE", "FIRESTORE_", "GOOGLE_"))
        }
        env.update(
            LISTENERS_REDIS_HOST="127.0.0.1",
            LISTENERS_REDIS_PORT=str(redis_port),
            LISTENERS_INSTANCE_ID=instance_id,
            LISTENERS_ADMIN_TOKEN=ADMIN_TOKEN,
            LISTENERS_CONTROL_TOKEN=CONTROL_TOKEN,
            FIRESTORE_EMULATOR_HOST=emulator_host,
            FIREBASE_PROJECT_ID=project,
            LOG_LEVEL="WARNING",
        )
        env.update(extra_env or {})
        self.service = ServiceProcess(env, log_path=self.log_path)
        self.ps = psutil.Process(self.service.pid)
        self.rss_mb = 0.0  # peak, from the sampler
        self.threads = 0

    @property
    def alive(self) -> bool:
        return self.service.process.poll() is None

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.rss_mb = max(self.rss_mb, self.ps.memory_info().rss / 2**20)
            self.threads = max(self.threads, self.ps.num_threads())

    def cpu(self) -> float:
        """CPU % (100 = one core) since the previous call; NaN once it has exited."""
        try:
            return self.ps.cpu_percent(None)
        except psutil.Error:
            return NAN

    async def count(self, http: httpx.AsyncClient) -> int | None:
        """Its /healthz listeners_count (the users it serves, handovers included)."""
        try:
            body = (await http.get(f"http://127.0.0.1:{self.service.port}/healthz", timeout=5)).json()
        except (httpx.HTTPError, ValueError):
            return None
        count = body.get("listeners_count") if isinstance(body, dict) else None
        return count if isinstance(count, int) else None

    async def loop_lag(self, http: httpx.AsyncClient) -> LoopLag | None:
        """Its /metrics: the loop-lag histogram's cumulative bucket counts and the stall gauge."""
        try:
            # a loop held up by thousands of SDK threads answers late: wait, the figures are cumulative
            text = (await http.get(f"http://127.0.0.1:{self.service.port}/metrics", timeout=30)).text
        except httpx.HTTPError:
            return None
        return LoopLag.parse(text)

    async def members(self, http: httpx.AsyncClient, uid: str) -> list[str] | None:
        """The members this instance believes in (GET /v1/users/{uid}, admin token)."""
        try:
            response = await http.get(
                f"http://127.0.0.1:{self.service.port}/v1/users/{uid}",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                timeout=5,
            )
            members = response.json().get("members")
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return [str(m) for m in members] if isinstance(members, list) else None


_BUCKET = re.compile(r'^listeners_loop_lag_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)$')
_STALL_MAX = re.compile(r"^listeners_loop_stall_max_seconds ([0-9.e+-]+)$")


@dataclass(frozen=True)
class LoopLag:
    """`listeners_loop_lag_seconds` (how late a 50 ms timer on the loop fires) as read from
    /metrics: cumulative counts by upper bound (inf last), and the longest stall since start."""

    buckets: tuple[tuple[float, int], ...]
    stall_max: float

    @classmethod
    def parse(cls, text: str) -> LoopLag | None:
        buckets, stall = [], NAN
        for line in text.splitlines():
            if found := _BUCKET.match(line):
                buckets.append((float(found[1]), int(float(found[2]))))
            elif found := _STALL_MAX.match(line):
                stall = float(found[1])
        return cls(tuple(sorted(buckets)), stall) if buckets else None

    def since(self, before: LoopLag) -> LoopLag:
        """The observations made after `before` was read (same process)."""
        old = dict(before.buckets)
        return LoopLag(tuple((le, n - old.get(le, 0)) for le, n in self.buckets), self.stall_max)

    @property
    def count(self) -> int:
        return self.buckets[-1][1] if self.buckets else 0

    def over(self, seconds: float) -> int:
        """Observations later than `seconds` (a bucket bound)."""
        return self.count - dict(self.buckets).get(seconds, 0)

    @property
    def worst(self) -> float:
        """The upper bound of the largest observation's bucket (inf: beyond the last bound)."""
        return next((le for le, n in self.buckets if n == self.count), NAN)


def stop_all(instances: Iterable[Instance]) -> None:
    """SIGTERM each one that still runs (SIGKILL after 20 s); reaps the killed ones too."""
    for instance in instances:
        with contextlib.suppress(Exception):
            instance.service.stop(signal.SIGTERM, 20.0)


def check_alive(instances: Iterable[Instance], emulator: FirestoreEmulator) -> None:
    for instance in instances:
        if not instance.alive:
            raise RuntimeError(f"instance {instance.id} exited ({instance.service.process.returncode})")
    if emulator.process is None or emulator.process.poll() is not None:
        raise RuntimeError("the Firestore emulator exited")


async def start_instances(
    ids: list[str],
    redis_port: int,
    emulator: FirestoreEmulator,
    project: str,
    logs: Path,
) -> list[Instance]:
    """Started together on an empty membership. Each instance's first heartbeat enters it as
    `{id}#{nonce}`; an entry written for it beforehand would be another live process holding
    its id (it would wait for that entry to expire, or refuse to serve). Each waits up to 3 s
    for its first view before attaching anyone; one that joins before the others takes their
    users for a moment and hands them over (1.5 s), which *ready s* includes."""
    instances: list[Instance] = []
    try:
        for instance_id in ids:
            instances.append(Instance(instance_id, redis_port, emulator.host, project, logs))
        await asyncio.gather(*(asyncio.to_thread(i.service.wait_listening, 60.0) for i in instances))
    except BaseException:
        stop_all(instances)
        raise
    return instances


async def sampler(instances: list[Instance], emulator: psutil.Process, peaks: dict[str, float]) -> None:
    while True:
        for instance in instances:
            instance.sample()
        with contextlib.suppress(psutil.Error):
            peaks["emulator"] = max(peaks.get("emulator", 0.0), emulator.memory_info().rss / 2**20)
        await asyncio.sleep(0.5)


# -- the consumer ------------------------------------------------------------------


class Recorder(latency.Consumer):
    """The core benchmark's subscriber on every user's exact channel, keeping every sync's
    arrival per user and each notification by (uid, doc_id)."""

    def __init__(self, client: aioredis.Redis, uids: list[str]) -> None:
        super().__init__(client, uids)
        self.adds: dict[tuple[str, str], float] = {}  # (uid, doc_id) -> first receipt
        self.add_counts: Counter[tuple[str, str]] = Counter()
        self.syncs: dict[str, list[float]] = defaultdict(list)  # uid -> receipts of notif.sync
        self.last_event = 0.0

    def record(self, event: dict[str, Any], now: float) -> None:
        kind, uid = event["type"], event["uid"]
        self.last_event = now
        if kind == "notif.sync":
            self.syncs[uid].append(now)
        elif kind == "notif.add":
            key = (uid, event["payload"]["doc_id"])
            self.add_counts[key] += 1
            if key in self.adds:
                self.duplicates += 1
            else:
                self.adds[key] = now

    def synced_after(self, uid: str, moment: float) -> float | None:
        return next((at for at in self.syncs.get(uid, ()) if at > moment), None)

    async def quiet(self, seconds: float, timeout: float) -> None:
        """Until nothing has arrived for `seconds` (at most `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() - self.last_event < seconds and time.monotonic() < deadline:
            await asyncio.sleep(0.1)


# -- Firestore ---------------------------------------------------------------------


def write_notification(
    db: firestore.Client, uid: str, doc_id: str, sent: dict[tuple[str, str], float]
) -> bool:
    """One notification; its send time goes in `sent` unless the write failed."""
    data = notification_data(doc_id)
    key = (uid, doc_id)
    sent[key] = time.monotonic()
    try:
        db.document(f"clients/{uid}/notifications/{doc_id}").set(data, retry=None, timeout=10)
    except Exception:  # counted and reported
        del sent[key]
        return False
    return True


async def settle(
    http: httpx.AsyncClient,
    instances: list[Instance],
    emulator: FirestoreEmulator,
    uids: list[str],
    recorder: Recorder,
    timeout: float,
) -> dict[str, int]:
    """Until every live instance serves exactly the users rendezvous hashing gives it (so
    their listeners_count sums to the number of users) and every user has had a notif.sync."""
    live = [i for i in instances if i.alive]
    expected = Counter(owner(uid, tuple(sorted(i.id for i in live))) for uid in uids)
    want = {i.id: expected.get(i.id, 0) for i in live}
    deadline = time.monotonic() + timeout
    counts: dict[str, int | None] = {}
    while True:
        check_alive(live, emulator)
        counts = dict(zip(want, await asyncio.gather(*(i.count(http) for i in live)), strict=True))
        synced = sum(uid in recorder.syncs for uid in uids)
        if counts == want and synced == len(uids):
            return want
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"not spread after {timeout:.0f} s: listeners_count {counts}, expected {want}; "
                f"{synced} of {len(uids)} users synced"
            )
        await asyncio.sleep(0.25)


# -- load: latency and throughput with K instances -----------------------------------


@dataclass
class Load:
    instances: int
    users: int
    rate_asked: float  # writes per second
    writes: int
    ids: list[str] = field(default_factory=list)
    shares: dict[str, int] = field(default_factory=dict)  # instance -> users it serves
    sent: int = 0
    write_errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # sorted
    by_instance_ms: dict[str, list[float]] = field(default_factory=dict)  # sorted, per owner
    duplicates: int = 0
    events: Counter[str] = field(default_factory=Counter)
    rate: float = NAN  # writes/s the writer achieved
    adds_per_s: float = NAN  # notif.add received per second, first write -> last notif.add
    events_per_s: float = NAN  # every event received per second over the same window
    ready_s: float = NAN  # instances started -> users spread and synced
    drain_s: float = NAN
    cpu: dict[str, float] = field(default_factory=dict)  # instance -> CPU % over the window
    rss_mb: dict[str, float] = field(default_factory=dict)
    threads: dict[str, int] = field(default_factory=dict)
    emulator_cpu: float = NAN
    emulator_rss_mb: float = NAN
    redis_cpu: float = NAN
    bench_cpu: float = NAN
    machine_cpu: float = NAN  # 100 = every core
    load_average: tuple[float, float] = (NAN, NAN)  # 1-minute, before and after the window
    problems: dict[str, list[str]] = field(default_factory=dict)
    error: str = ""

    @property
    def received(self) -> int:
        return len(self.latencies_ms)

    @property
    def total_cpu(self) -> float:
        return sum(self.cpu.values()) if self.cpu else NAN

    @property
    def others_cpu(self) -> float:
        """Everything but the instances, the emulator, redis-server and the benchmark
        (100 = one core): the kernel and the other jobs on the machine."""
        return self.machine_cpu * CORES - self.total_cpu - self.emulator_cpu - self.redis_cpu - self.bench_cpu


async def run_load(r: Load, args: argparse.Namespace, logs: Path) -> None:
    uids = [f"u{i:04d}" for i in range(r.users)]
    r.ids = [f"k{r.instances}-{chr(ord('a') + n)}" for n in range(r.instances)]
    rng = random.Random(f"{args.seed}-{r.rate_asked:g}-{r.instances}")
    project = f"bench-cluster-{r.instances}-{uuid.uuid4().hex[:6]}"
    with RedisServer() as redis_server, FirestoreEmulator() as emulator:
        try:
            await _run_load(r, args, logs, uids, rng, project, redis_server, emulator)
        except Exception:
            _emulator_fatal(emulator)
            raise


async def _run_load(
    r: Load,
    args: argparse.Namespace,
    logs: Path,
    uids: list[str],
    rng: random.Random,
    project: str,
    redis_server: RedisServer,
    emulator: FirestoreEmulator,
) -> None:
    os.environ["FIRESTORE_EMULATOR_HOST"] = emulator.host  # this process's writer
    assert emulator.process is not None and redis_server.process is not None
    emu, rds, me = (psutil.Process(p) for p in (emulator.process.pid, redis_server.process.pid, os.getpid()))
    loop = asyncio.get_running_loop()
    db = firestore.Client(project=project)
    client = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    recorder = Recorder(client, uids)
    pool = ThreadPoolExecutor(16, thread_name_prefix="bench-write")
    instances: list[Instance] = []
    peaks: dict[str, float] = {}
    sampling: asyncio.Task[None] | None = None
    sent: dict[tuple[str, str], float] = {}
    try:
        await loop.run_in_executor(
            pool, partial(write_online, db, uids, heartbeat=FOREVER)
        )  # before any instance starts
        await recorder.start()
        began = time.monotonic()
        instances = await start_instances(r.ids, redis_server.port, emulator, project, logs)
        sampling = asyncio.create_task(sampler(instances, emu, peaks))
        async with httpx.AsyncClient() as http:
            r.shares = await settle(http, instances, emulator, uids, recorder, args.ready_timeout)
        r.ready_s = time.monotonic() - began
        await recorder.quiet(1.0, 10.0)
        before = Counter(recorder.events)

        for p in (*(i.ps for i in instances), emu, rds, me):
            p.cpu_percent(None)
        psutil.cpu_percent(None)
        load_before = os.getloadavg()[0]
        began = time.monotonic()
        writes = []
        for n in range(r.writes):
            await asyncio.sleep(max(0.0, began + n / r.rate_asked - time.monotonic()))
            check_alive(instances, emulator)
            writes.append(
                loop.run_in_executor(pool, write_notification, db, rng.choice(uids), f"w{n:05d}", sent)
            )
        r.write_errors = (await asyncio.gather(*writes)).count(False)
        times = sorted(sent.values())
        r.rate = (len(times) - 1) / max(1e-9, times[-1] - times[0]) if times else NAN

        def all_received() -> bool:
            check_alive(instances, emulator)
            return all(key in recorder.adds for key in sent)

        drained = time.monotonic()
        while not await recorder.wait(all_received, args.quiet):  # nothing new for `quiet` s: give up
            if time.monotonic() - drained > args.drain or time.monotonic() - recorder.last_event > args.quiet:
                break
        r.drain_s = time.monotonic() - drained
        r.cpu = {i.id: i.cpu() for i in instances}
        r.emulator_cpu, r.redis_cpu, r.bench_cpu = (p.cpu_percent(None) for p in (emu, rds, me))
        r.machine_cpu = psutil.cpu_percent(None)
        r.load_average = (load_before, os.getloadavg()[0])
        window_end = max(recorder.adds.get(key, 0.0) for key in sent) if sent else NAN
        events_in_window = sum(1 for key in sent if key in recorder.adds)
        r.adds_per_s = events_in_window / max(1e-9, window_end - began)
        r.events_per_s = (recorder.events.total() - before.total()) / max(1e-9, window_end - began)
        await asyncio.sleep(0.5)  # late duplicates show up in the counts
        r.events = Counter(recorder.events)
    finally:
        if sampling is not None:
            sampling.cancel()
        r.sent = len(sent)
        r.latencies_ms = sorted(
            (recorder.adds[k] - t0) * 1000 for k, t0 in sent.items() if k in recorder.adds
        )
        ids = tuple(sorted(r.ids))
        for instance_id in r.ids:
            r.by_instance_ms[instance_id] = sorted(
                (recorder.adds[k] - t0) * 1000
                for k, t0 in sent.items()
                if k in recorder.adds and owner(k[0], ids) == instance_id
            )
        r.duplicates = recorder.duplicates
        r.emulator_rss_mb = peaks.get("emulator", NAN)
        try:
            stop_all(instances)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            await recorder.stop()
            await client.aclose()
            db.close()
            for instance in instances:
                r.rss_mb[instance.id], r.threads[instance.id] = instance.rss_mb, instance.threads
                r.problems[instance.id] = log_problems(instance.log_path)


def _emulator_fatal(emulator: FirestoreEmulator) -> None:
    with contextlib.suppress(OSError):
        lines = Path(emulator.log_path).read_text(errors="replace").splitlines()
        fatal = [line for line in lines if "FATAL" in line or "Error" in line]
        if fatal:
            log(f"emulator: {fatal[-1].strip()}")


# -- takeover after kill -9 ----------------------------------------------------------


@dataclass
class Takeover:
    instances: int
    users: int
    ids: list[str] = field(default_factory=list)
    shares: dict[str, int] = field(default_factory=dict)  # before the kill
    victim: str = ""
    moved: int = 0  # users the killed instance served
    moved_to: dict[str, int] = field(default_factory=dict)  # survivor -> users it took
    ready_s: float = NAN  # instances started -> users spread and synced (the start-up attach)
    idle_cpu: dict[str, float] = field(default_factory=dict)  # before the kill, nothing written
    rss_before_mb: dict[str, float] = field(default_factory=dict)
    rss_after_mb: dict[str, float] = field(default_factory=dict)
    expires_s: float = NAN  # kill -> the killed one's membership entry expires (Redis clock)
    removed_s: float = NAN  # kill -> the entry is gone from Redis (a survivor's beat removed it)
    # kill -> a survivor's view drops the killed one: (last answer still with it, first without)
    view_changed_s: dict[str, tuple[float, float]] = field(default_factory=dict)
    count_at_s: dict[str, float] = field(default_factory=dict)  # kill -> survivor's count is its share
    stall_s: dict[str, float] = field(default_factory=dict)  # longest gap between a survivor's answers
    # each survivor's listeners_loop_lag_seconds observed from just before the kill to 1 s
    # after the takeover settled, and its listeners_loop_stall_max_seconds before and after
    lag: dict[str, LoopLag] = field(default_factory=dict)
    idle_lag: dict[str, LoopLag] = field(default_factory=dict)  # over the idle seconds before the kill
    stall_max_before: dict[str, float] = field(default_factory=dict)
    victim_entry: str = ""  # its membership entry, `{id}#{nonce}`
    synced_s: list[float] = field(default_factory=list)  # sorted, kill -> each moved user's new sync
    synced_by: dict[str, list[float]] = field(default_factory=dict)  # per new owner, sorted
    missing: int = 0  # moved users with no new notif.sync before the timeout
    other_syncs: int = 0  # notif.sync of users that did not move, after the kill
    repeat_syncs: int = 0  # moved users with more than one notif.sync after the kill
    takeover_cpu: dict[str, float] = field(default_factory=dict)  # kill -> last new sync
    emulator_cpu: float = NAN
    machine_cpu: float = NAN  # 100 = every core
    bench_cpu: float = NAN
    redis_cpu: float = NAN
    load_average: tuple[float, float] = (NAN, NAN)  # 1-minute, at the kill and after the takeover
    problems: dict[str, list[str]] = field(default_factory=dict)
    error: str = ""

    @property
    def takeover_s(self) -> float:
        return self.synced_s[-1] if self.synced_s and not self.missing else NAN

    @property
    def count_s(self) -> float:
        """Kill -> the survivors' listeners_count sums to the users (each at its share)."""
        survivors = [i for i in self.ids if i != self.victim]
        if not survivors or any(s not in self.count_at_s for s in survivors):
            return NAN
        return max(self.count_at_s[s] for s in survivors)

    @property
    def others_cpu(self) -> float:
        """Everything but the survivors, emulator, redis-server and benchmark (100 = one core)."""
        mine = sum(self.takeover_cpu.values()) + self.emulator_cpu + self.redis_cpu + self.bench_cpu
        return self.machine_cpu * CORES - mine


@dataclass
class Answer:
    """One probe of a survivor after the kill, times in seconds from the kill."""

    sent: float
    received: float
    count: int | None
    has_victim: bool | None


async def run_takeover(r: Takeover, args: argparse.Namespace, logs: Path) -> None:
    uids = [f"t{i:04d}" for i in range(r.users)]
    r.ids = [f"t{r.instances}-{chr(ord('a') + n)}" for n in range(r.instances)]
    project = f"bench-takeover-{r.instances}-{uuid.uuid4().hex[:6]}"
    with RedisServer() as redis_server, FirestoreEmulator() as emulator:
        try:
            await _run_takeover(r, args, logs, uids, project, redis_server, emulator)
        except Exception:
            _emulator_fatal(emulator)
            raise


async def _run_takeover(
    r: Takeover,
    args: argparse.Namespace,
    logs: Path,
    uids: list[str],
    project: str,
    redis_server: RedisServer,
    emulator: FirestoreEmulator,
) -> None:
    os.environ["FIRESTORE_EMULATOR_HOST"] = emulator.host
    assert emulator.process is not None and redis_server.process is not None
    emu, rds, me = (psutil.Process(p) for p in (emulator.process.pid, redis_server.process.pid, os.getpid()))
    db = firestore.Client(project=project)
    client = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    recorder = Recorder(client, uids)  # every user's channel, subscribed before the kill
    instances: list[Instance] = []
    peaks: dict[str, float] = {}
    sampling: asyncio.Task[None] | None = None
    try:
        await asyncio.to_thread(write_online, db, uids, heartbeat=FOREVER)
        await recorder.start()
        began = time.monotonic()
        instances = await start_instances(r.ids, redis_server.port, emulator, project, logs)
        sampling = asyncio.create_task(sampler(instances, emu, peaks))
        async with httpx.AsyncClient() as http:
            r.shares = await settle(http, instances, emulator, uids, recorder, args.attach_timeout)
            r.ready_s = time.monotonic() - began
            log(f"takeover, {r.instances} instances: {r.users} users spread {r.shares} in {r.ready_s:.1f} s")
            await recorder.quiet(2.0, 20.0)
            victim, survivors = instances[-1], instances[:-1]
            for instance in instances:
                instance.cpu()
            idle_lags = await asyncio.gather(*(s.loop_lag(http) for s in survivors))
            await asyncio.sleep(args.idle)
            r.idle_cpu = {i.id: i.cpu() for i in instances}
            r.rss_before_mb = {i.id: i.ps.memory_info().rss / 2**20 for i in instances}

            r.victim = victim.id
            live = tuple(sorted(s.id for s in survivors))
            moved = [uid for uid in uids if owner(uid, tuple(sorted(r.ids))) == victim.id]
            new_owner = {uid: owner(uid, live) for uid in moved}
            r.moved, r.moved_to = len(moved), dict(Counter(new_owner.values()))
            target = {s.id: r.shares[s.id] + r.moved_to.get(s.id, 0) for s in survivors}
            for p in (*(s.ps for s in survivors), emu, rds, me):
                p.cpu_percent(None)
            psutil.cpu_percent(None)
            load_before = os.getloadavg()[0]

            entries = [
                e.decode() if isinstance(e, bytes) else str(e)
                for e in await client.zrange(MEMBERS_KEY, 0, -1)
            ]
            r.victim_entry = next((e for e in entries if entry_id(e) == victim.id), "")
            if not r.victim_entry:
                raise RuntimeError(f"no membership entry for {victim.id} in {entries}")
            lags = await asyncio.gather(*(s.loop_lag(http) for s in survivors))
            lag_before = dict(zip([s.id for s in survivors], lags, strict=True))
            for survivor, idle_start, idle_end in zip(survivors, idle_lags, lags, strict=True):
                if idle_start is not None and idle_end is not None:
                    r.idle_lag[survivor.id] = idle_end.since(idle_start)
            r.stall_max_before = {k: v.stall_max for k, v in lag_before.items() if v is not None}

            killed_at = time.monotonic()
            victim.service.process.send_signal(signal.SIGKILL)
            seconds, micros = await client.time()
            score = await client.zscore(MEMBERS_KEY, r.victim_entry) if r.victim_entry else None
            if score is not None:
                r.expires_s = score - (seconds + micros / 1e6) + (time.monotonic() - killed_at)
            await asyncio.to_thread(victim.service.process.wait, 10)
            log(
                f"killed {victim.id} ({r.moved} users); its entry {r.victim_entry!r} expires "
                f"{r.expires_s:.1f} s after the kill"
            )

            stop = asyncio.Event()
            answers: dict[str, list[Answer]] = {s.id: [] for s in survivors}
            watchers = [
                asyncio.create_task(_watch_entry(client, r.victim_entry, killed_at, r)),
                *(
                    asyncio.create_task(_probe(http, s, victim.id, uids[0], killed_at, stop, answers[s.id]))
                    for s in survivors
                ),
            ]

            def settled() -> bool:
                return all(recorder.synced_after(uid, killed_at) is not None for uid in moved) and all(
                    a and a[-1].count == target[s] and a[-1].has_victim is False for s, a in answers.items()
                )

            try:
                if not await recorder.wait(settled, args.takeover_timeout):
                    log("not every moved user had a new sync (or counts/views not final) before the timeout")
                r.takeover_cpu = {s.id: s.cpu() for s in survivors}
                r.emulator_cpu, r.redis_cpu, r.bench_cpu = (p.cpu_percent(None) for p in (emu, rds, me))
                r.machine_cpu = psutil.cpu_percent(None)
                r.load_average = (load_before, os.getloadavg()[0])
                await asyncio.sleep(1.0)  # a few more answers, for the stall after the last sync
                lag_after = await asyncio.gather(*(s.loop_lag(http) for s in survivors))
                for survivor, after in zip(survivors, lag_after, strict=True):
                    if after is not None and (before := lag_before.get(survivor.id)) is not None:
                        r.lag[survivor.id] = after.since(before)
            finally:
                stop.set()
                for watcher in watchers:
                    watcher.cancel()
                await asyncio.gather(*watchers, return_exceptions=True)
            for s, got in answers.items():
                _read_answers(r, s, target[s], got)
            await recorder.quiet(2.0, 10.0)
            r.rss_after_mb = {s.id: s.ps.memory_info().rss / 2**20 for s in survivors}
            for uid in moved:
                at = recorder.synced_after(uid, killed_at)
                if at is None:
                    r.missing += 1
                    continue
                r.synced_s.append(at - killed_at)
                r.synced_by.setdefault(new_owner[uid], []).append(at - killed_at)
                r.repeat_syncs += sum(1 for t in recorder.syncs[uid] if t > killed_at) > 1
            r.synced_s.sort()
            for times in r.synced_by.values():
                times.sort()
            r.other_syncs = sum(
                1
                for uid in uids
                if uid not in new_owner
                for t in recorder.syncs.get(uid, ())
                if t > killed_at
            )
            await settle(http, survivors, emulator, uids, recorder, 30.0)  # exactly as hashing says
    finally:
        if sampling is not None:
            sampling.cancel()
        try:
            stop_all(instances)
        finally:
            await recorder.stop()
            await client.aclose()
            db.close()
            for instance in instances:
                r.problems[instance.id] = log_problems(instance.log_path)


def _read_answers(r: Takeover, survivor: str, target: int, got: list[Answer]) -> None:
    for before, after in zip([None, *got], got, strict=False):
        if after.has_victim is False and survivor not in r.view_changed_s:
            r.view_changed_s[survivor] = (NAN if before is None else before.received, after.received)
        if after.count == target and survivor not in r.count_at_s:
            r.count_at_s[survivor] = after.received
    gaps = [b.received - a.received for a, b in itertools.pairwise(got)]
    r.stall_s[survivor] = max(gaps, default=NAN)


async def _watch_entry(client: aioredis.Redis, entry: str, killed_at: float, r: Takeover) -> None:
    """When the killed instance's entry (`{id}#{nonce}`) leaves Redis: the first survivor's beat
    after it expired (that beat's own view, read in the same pipeline, is the first to drop it;
    it then announces the departure on `listeners:members:changes`)."""
    while await client.zscore(MEMBERS_KEY, entry) is not None:
        await asyncio.sleep(0.02)
    r.removed_s = time.monotonic() - killed_at


async def _probe(
    http: httpx.AsyncClient,
    survivor: Instance,
    victim: str,
    uid: str,
    killed_at: float,
    stop: asyncio.Event,
    answers: list[Answer],
) -> None:
    """Every 50 ms, a survivor's /healthz count and its view of the members (/v1/users). An
    answer is late by however long its event loop is busy: a long gap between two answers is
    a stall of that loop."""
    while not stop.is_set():
        sent = time.monotonic() - killed_at
        count, members = await asyncio.gather(survivor.count(http), survivor.members(http, uid))
        has_victim = None if members is None else victim in members
        answers.append(Answer(sent, time.monotonic() - killed_at, count, has_victim))
        await asyncio.sleep(0.05)


# -- the report ----------------------------------------------------------------------


def _f(value: float, digits: int = 0) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


def _per(values: dict[str, float], ids: list[str], digits: int = 0) -> str:
    return " / ".join(_f(values.get(i, NAN), digits) for i in ids) or "n/a"


def _message(line: str) -> str:
    try:
        return str(json.loads(line).get("message", line))
    except (ValueError, AttributeError):
        return line


def _problems(problems: dict[str, list[str]]) -> str:
    lines = [line for found in problems.values() for line in found]
    kinds = Counter(_message(line) for line in lines)
    shown = "; ".join(f"{n} x `{m[:140]}`" for m, n in kinds.most_common(3))
    return f"{len(lines)}" + (f" ({shown})" if shown else "")


def _lags(t: Takeover, survivors: list[str], seconds: float) -> str:
    """Per survivor: observations of the loop lag above `seconds`, of all observations."""
    return " / ".join(
        f"{lag.over(seconds)} of {lag.count}" if (lag := t.lag.get(s)) is not None else "n/a"
        for s in survivors
    )


def render(
    loads: list[Load],
    takeovers: list[Takeover],
    args: argparse.Namespace,
    command: str,
    code: str,
    started: datetime,
    elapsed: float,
) -> dict[tuple[str, str], str]:
    """The generated blocks, by their markers: the load's and the takeover's, for those that ran
    (each run of the bench replaces only the blocks of what it measured)."""
    head = report_head(command, code, started, elapsed)
    blocks = {}
    if loads:
        blocks[START, END] = "\n".join([START, *head, *render_loads(loads, args), END])
    if takeovers:
        blocks[TAKEOVER_START, TAKEOVER_END] = "\n".join(
            [TAKEOVER_START, *head, *render_takeovers(takeovers, args), TAKEOVER_END]
        )
    return blocks


def render_loads(loads: list[Load], args: argparse.Namespace) -> list[str]:
    lines = [
        f"Load: {args.users} users, {args.seconds:g} s of notification writes at each rate, each to a random "
        "user. Latency: write call -> that document's `notif.add` at the subscriber. CPU % over the "
        "window from the first write to the last `notif.add` (100 = one core); per-instance values "
        "are separated by /.",
        "",
        "| writes/s asked | instances | users per instance | writes sent | received | missing | duplicates "
        "| p50 ms | p95 ms | p99 ms | max ms | writes/s sent | notif.add/s received | events/s received "
        "| CPU % per instance | CPU % all instances | emulator CPU % | RSS MB per instance | ready s |",
        "|" + "---:|" * 19,
    ]
    for r in loads:
        p = [percentile(r.latencies_ms, q) for q in (50, 95, 99, 100)]
        shares = {k: float(v) for k, v in r.shares.items()}
        lines.append(
            f"| {r.rate_asked:g} | {r.instances} | {_per(shares, r.ids)} | {r.sent} "
            f"| {r.received} | {r.sent - r.received} | {r.duplicates} "
            + "".join(f"| {_f(v)} " for v in p)
            + f"| {_f(r.rate, 1)} | {_f(r.adds_per_s, 1)} | {_f(r.events_per_s, 1)} | {_per(r.cpu, r.ids)} "
            f"| {_f(r.total_cpu)} | {_f(r.emulator_cpu)} | {_per(r.rss_mb, r.ids)} | {_f(r.ready_s, 1)} |"
        )
    lines += ["", "Per configuration:"]
    for r in loads:
        events = ", ".join(f"{k} {v}" for k, v in sorted(r.events.items())) or "none"
        threads = {k: float(v) for k, v in r.threads.items()}
        per_instance = "; ".join(
            f"{i} p50 {_f(percentile(v, 50))} / p99 {_f(percentile(v, 99))} ms ({len(v)} writes)"
            for i, v in r.by_instance_ms.items()
        )
        lines.append(
            f"- {r.rate_asked:g} writes/s, {r.instances} instance{'' if r.instances == 1 else 's'} "
            f"({', '.join(r.ids)}): "
            + (f"**FAILED: {r.error}**; " if r.error else "")
            + f"{r.write_errors} write errors; events received: {events}; latency by owner: {per_instance}; "
            f"drain {_f(r.drain_s, 1)} s; peak threads {_per(threads, r.ids)}; "
            f"CPU % over the window: redis-server {_f(r.redis_cpu)}, bench {_f(r.bench_cpu)}, "
            f"whole machine {_f(r.machine_cpu)} (of 100), "
            f"everything else {_f(r.others_cpu)} (of {100 * CORES}); "
            f"load average {_f(r.load_average[0], 1)} -> {_f(r.load_average[1], 1)}; "
            f"emulator peak RSS {_f(r.emulator_rss_mb)} MB; "
            f"instance log warnings/errors: {_problems(r.problems)}"
        )
    return lines


def render_takeovers(takeovers: list[Takeover], args: argparse.Namespace) -> list[str]:
    lines = [
        f"Takeover after kill -9 of the last instance, {args.takeover_users} users, nothing written. "
        "Seconds from the kill. *Entry expires*: the killed instance's membership score minus "
        "Redis's `TIME`; *entry removed*: gone from Redis (polled every 20 ms), i.e. the first "
        "survivor's heartbeat after expiry, whose view drops it in the same pipeline; *views "
        "changed*: each survivor's `/v1/users` answer, polled every 50 ms, first without the killed "
        "instance; *new sync*: a moved user's first `notif.sync` after the kill, at the subscriber "
        "on all the users' channels; *count*: the survivors' `/healthz` listeners_count sum to the "
        "users; *loop stall*: the longest gap between two answers of a survivor; *lag > 50 ms*, "
        "*> 100 ms*: "
        "observations of each survivor's `listeners_loop_lag_seconds` (a 50 ms timer on its loop, "
        "how late it fired) above 50 and 100 ms, from just before the kill to 1 s after the takeover "
        "settled (bucket counts read from `/metrics`), out of all its observations then; *worst lag "
        "≤ s*: the upper bound of the bucket of the largest of them.",
        "",
        "| instances | users per instance before | moved | entry expires s | entry removed s "
        "| views changed s | first new sync s | p50 s | p99 s | last new sync s | attach s "
        "| count = users s | loop stall s | lag > 50 ms | lag > 100 ms | worst lag ≤ s "
        "| missing | ready s |",
        "|" + "---:|" * 18,
    ]
    for t in takeovers:
        survivors = [i for i in t.ids if i != t.victim]
        views = _per({s: v[1] for s, v in t.view_changed_s.items()}, survivors, 1)
        shares = {k: float(v) for k, v in t.shares.items()}
        lines.append(
            f"| {t.instances} | {_per(shares, t.ids)} | {t.moved} | {_f(t.expires_s, 1)} "
            f"| {_f(t.removed_s, 1)} | {views} | {_f(t.synced_s[0] if t.synced_s else NAN, 1)} "
            f"| {_f(percentile(t.synced_s, 50), 1)} | {_f(percentile(t.synced_s, 99), 1)} "
            f"| {_f(t.takeover_s, 1)} | {_f(t.takeover_s - t.removed_s, 1)} | {_f(t.count_s, 1)} "
            f"| {_per(t.stall_s, survivors, 2)} | {_lags(t, survivors, 0.05)} "
            f"| {_lags(t, survivors, 0.1)} "
            f"| {_per({s: lag.worst for s, lag in t.lag.items()}, survivors, 3)} | {t.missing} "
            f"| {_f(t.ready_s, 1)} |"
        )
    lines += [
        "",
        "*attach s* = last new sync minus entry removed: the re-attaching, after the detection.",
        "",
        "Per takeover:",
    ]
    for t in takeovers:
        survivors = [i for i in t.ids if i != t.victim]
        parts = []
        for s, v in sorted(t.synced_by.items()):
            low, high = t.view_changed_s.get(s, (NAN, NAN))
            parts.append(
                f"{s} took {t.moved_to.get(s, 0)}: "
                f"view changed between {_f(low, 2)} and {_f(high, 2)} s, "
                f"count at its new share {_f(t.count_at_s.get(s, NAN), 2)} s, "
                f"new syncs {_f(v[0], 2)} to {_f(v[-1], 2)} s"
            )
        by = "; ".join(parts)
        idle = "; ".join(
            f"{s} {lag.over(0.05)} > 50 ms, {lag.over(0.1)} > 100 ms of {lag.count}, "
            f"worst ≤ {_f(lag.worst, 3)} s"
            for s, lag in t.idle_lag.items()
        )
        stall_max = "; ".join(
            f"{s} {_f(t.stall_max_before.get(s, NAN), 3)} -> {_f(lag.stall_max, 3)}"
            for s, lag in t.lag.items()
        )
        lines.append(
            f"- {t.instances} instances, killed {t.victim} (entry `{t.victim_entry}`): "
            + (f"**FAILED: {t.error}**; " if t.error else "")
            + f"{by}; loop lag over the {args.idle:g} idle seconds before the kill, for comparison: "
            f"{idle or 'n/a'}; `listeners_loop_stall_max_seconds` (max since start) before the kill "
            f"-> after the takeover: {stall_max or 'n/a'}; moved users with more than one new sync: "
            f"{t.repeat_syncs}; notif.sync of users that did not move, after the kill: {t.other_syncs}; "
            "idle CPU % before the kill "
            f"{_per(t.idle_cpu, t.ids, 1)}; CPU % from the kill to the last new sync: survivors "
            f"{_per(t.takeover_cpu, survivors)}, emulator {_f(t.emulator_cpu)}, redis-server "
            f"{_f(t.redis_cpu)}, bench {_f(t.bench_cpu)}, whole machine {_f(t.machine_cpu)} (of 100), "
            f"everything else {_f(t.others_cpu)} (of {100 * CORES}); load average "
            f"{_f(t.load_average[0], 1)} -> {_f(t.load_average[1], 1)}; RSS MB before "
            f"{_per(t.rss_before_mb, t.ids)}, after {_per(t.rss_after_mb, survivors)}; "
            f"instance log warnings/errors: {_problems(t.problems)}"
        )
    return lines


def update_doc(path: Path, blocks: dict[tuple[str, str], str]) -> None:
    """Replace each generated block in `path` (by its markers), or append a section holding it."""
    text = path.read_text()
    for (start, end), block in blocks.items():
        if start in text and end in text:
            head, rest = text.split(start, 1)
            text = head + block + rest.split(end, 1)[1]
        else:
            section = SECTION if start == START else TAKEOVER_SECTION
            text = text.rstrip("\n") + f"\n\n{section}\n\n{block}\n"
    path.write_text(text)


def _git(*args: str) -> str:
    try:
        result = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip()


def describe_code() -> str:
    head = _git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown (not a git checkout)"
    changed = _git("status", "--porcelain", "--", "src", "app", "pyproject.toml")
    if changed:
        return f"`{head}` with uncommitted changes to src/, app/ or pyproject.toml"
    return f"`{head}`; src/, app/ and pyproject.toml as committed (other uncommitted changes are not run)"


# -- main ------------------------------------------------------------------------------


async def run(args: argparse.Namespace, logs: Path) -> tuple[list[Load], list[Takeover]]:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)  # unwinds every finally
    loads: list[Load] = []
    takeovers: list[Takeover] = []
    for rate in args.rate:
        for k in args.instances:
            r = Load(k, args.users, rate, round(rate * args.seconds))
            loads.append(r)
            log(f"load: {k} instance(s), {args.users} users, {r.writes} writes at {rate:g}/s ...")
            try:
                await run_load(r, args, logs)
            except Exception as exc:  # reported; the next configuration still runs
                r.error = f"{type(exc).__name__}: {exc}"
            lat = r.latencies_ms
            log(
                f"load: {rate:g}/s, {k} instance(s): {r.received}/{r.sent} received, {r.duplicates} "
                f"duplicates, p50 {_f(percentile(lat, 50))} p99 {_f(percentile(lat, 99))} "
                f"max {_f(percentile(lat, 100))} ms, cpu {r.cpu}, shares {r.shares}"
                + (f", FAILED: {r.error}" if r.error else "")
            )
    for k in args.takeover_instances:
        t = Takeover(k, args.takeover_users)
        takeovers.append(t)
        log(f"takeover: {k} instances, {args.takeover_users} users ...")
        try:
            await run_takeover(t, args, logs)
        except Exception as exc:
            t.error = f"{type(exc).__name__}: {exc}"
        log(
            f"takeover: {k} instances: {t.moved} moved, entry expires {_f(t.expires_s, 1)} s, removed "
            f"{_f(t.removed_s, 1)} s, views {t.view_changed_s}, last new sync {_f(t.takeover_s, 1)} s, "
            f"stalls {t.stall_s}, missing {t.missing}" + (f", FAILED: {t.error}" if t.error else "")
        )
    return loads, takeovers


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


def _ints(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n.strip()]


def _floats(text: str) -> list[float]:
    return [float(n) for n in text.split(",") if n.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--instances", type=_ints, default=[1, 2, 3], help="instance counts for the load")
    parser.add_argument("--users", type=int, default=150)
    parser.add_argument("--rate", type=_floats, default=[10.0, 20.0], help="writes per second, each a run")
    parser.add_argument("--seconds", type=float, default=30.0, help="of writes, at each rate")
    parser.add_argument("--drain", type=float, default=60.0, help="most seconds to wait for late events")
    parser.add_argument("--quiet", type=float, default=15.0, help="stop waiting after this long with none")
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    parser.add_argument("--takeover-instances", type=_ints, default=[2, 3], help="'' for none")
    parser.add_argument("--takeover-users", type=int, default=1000)
    parser.add_argument("--attach-timeout", type=float, default=180.0, help="bound on the start-up attach")
    parser.add_argument("--takeover-timeout", type=float, default=60.0)
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of idle CPU before the kill")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file to update")
    parser.add_argument("--no-doc", action="store_true", help="print the results only")
    parser.add_argument("--code", help="what code was measured (default: from git)")
    args = parser.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="listeners-bench-cluster-"))
    log(f"instance logs in {logs}")
    started, began = datetime.now(UTC), time.monotonic()
    try:
        loads, takeovers = asyncio.run(run(args, logs))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted; every process it started is stopped")
        raise SystemExit(130) from None
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join([".venv/bin/python -m bench.cluster", shlex.join(_measuring(given))]).strip()
    blocks = render(
        loads, takeovers, args, command, args.code or describe_code(), started, time.monotonic() - began
    )
    print("\n\n".join(blocks.values()))
    if not args.no_doc:
        update_doc(args.doc, blocks)


if __name__ == "__main__":
    main()
