"""Tail positions (issue 23): what they cost, and how long a lost last event takes to heal.

One service as bench.scale runs it (`uvicorn app.main:app`, the Listen source, Google's
Firestore emulator, a private redis-server), with `--users` online in the registry before it
starts, every other one holding one unread notification, and a control token so that
consumers can ask for resyncs. Then, for each rate of `--rates` in turn (a phase):

- *the mix*: notification writes at that rate on random users, each one event: an add for a
  user who holds nothing, else a mark-read or a delete of the one they hold (half, a quarter
  and a quarter of the writes), written as bench.latency writes them;
- *the tally*: a subscriber on the benchmark's own Redis, `PSUBSCRIBE user:*`, counts every
  message by type and bytes (the JSON as Redis carries it). Per stream it cuts the events
  into bursts (a burst ends when its stream is quiet for `QUIET` seconds) and gives each
  position to the burst of the event it names (`epoch`, `seq`): how many positions a burst
  got, and how long after that event's arrival the position came (its wait under the
  budget). After `--warmup` seconds, a window of `--window` seconds is measured, and
  `listeners_tail_positions_total` is read from /metrics at its start and end;
- *the drops*: `--drops` users, kept out of the mix, each get one burst of 1 to 3
  notifications during the window; a consumer built on the real `Bridge` (so the real
  `Follower`, its control requests and the `Notifications` reducer) loses the burst's last
  event on purpose, as if the network had. It heals when its list equals what was written:
  the position comes, the follower sees a gap, the bridge asks on the control channel, the
  service answers with a sync. Heal time: from the lost event's arrival to that moment. The
  mix goes on until every drop of the phase healed or `--heal-timeout` passed.

    .venv/bin/python -m bench.tails --users 10000 --rates 100,10 --warmup 150,60 --window 120 --drops 50

The results replace the generated block of this benchmark in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis.asyncio as aioredis
from google.cloud import firestore

from bench.cluster import CONTROL_TOKEN
from bench.faultlab import registry_batch
from bench.latency import (
    DOC,
    BenchService,
    LoggedEmulator,
    _measuring,
    _message,
    _terminate,
    _version,
    log_problems,
    percentile,
    report_head,
    update_doc,
    wait_healthy,
    write_notification,
)
from listeners.config import RedisSettings, Secret
from listeners_bridge import Bridge, Notifications
from listeners_bridge.consumer import _Reader
from listeners_testkit.documents import notification_data
from listeners_testkit.processes import PROJECT_ROOT, RedisServer, emulator_env, wait_for_port

START, END = "<!-- bench.tails:start -->", "<!-- bench.tails:end -->"
SECTION = "## Tail positions"
QUIET = 2.0  # seconds of quiet that end a burst, as the service's tails (publish/tails.py)
BIN = 30.0  # seconds per row of the time series
POSITION = ".position"
MIX_THREADS = 32  # the mix's writes in flight at most


def log(text: str) -> None:
    print(f"[bench.tails] {text}", file=sys.stderr, flush=True)


# -- the tally: every message on user:* -------------------------------------------------------------


@dataclass
class Burst:
    stream: tuple[str, str]  # (channel, family)
    start: float
    end: float
    events: int = 0
    positions: int = 0


@dataclass
class Arrival:
    at: float
    type: str
    size: int


@dataclass
class PositionSeen:
    at: float
    wait: float  # seconds from the arrival of the event it names; NaN when that was not seen
    burst: int | None


@dataclass
class _Stream:
    last: float
    burst: int
    newest: tuple[str, int] = ("", 0)
    # (epoch, seq) of each event -> (its burst, its arrival)
    events: dict[tuple[str, int], tuple[int, float]] = field(default_factory=dict)


class Tally:
    """PSUBSCRIBE user:* on the benchmark's own Redis: every message, its type and bytes; the
    bursts of each stream and the positions each got."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.pubsub = client.pubsub()
        self.arrivals: list[Arrival] = []
        self.bursts: list[Burst] = []
        self.positions: list[PositionSeen] = []
        self.unmatched = 0  # positions naming an event the tally never saw
        self.stale = 0  # positions naming an event older than the newest of their stream
        self.repeated = 0  # second positions for the same event
        self._named: set[tuple[str, str, str, int]] = set()
        self.synced: set[str] = set()  # users whose first notif.sync arrived
        self.first_sync: dict[str, float] = {}
        self._streams: dict[tuple[str, str], _Stream] = {}
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.pubsub.psubscribe("user:*")
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.pubsub.listen():
            if message["type"] == "pmessage":
                self.saw(message["channel"].decode(), message["data"], time.monotonic())

    def saw(self, channel: str, data: bytes, now: float) -> None:
        event = json.loads(data)
        kind = str(event["type"])
        self.arrivals.append(Arrival(now, kind, len(data)))
        family = kind.partition(".")[0]
        key = (channel, family)
        mark = (str(event.get("epoch", "")), int(event.get("seq", 0)))
        stream = self._streams.get(key)
        if kind.endswith(POSITION):
            found = stream.events.get(mark) if stream is not None else None
            if stream is None or found is None:
                self.unmatched += 1
                self.positions.append(PositionSeen(now, float("nan"), None))
                return
            index, at = found
            if mark != stream.newest:
                self.stale += 1
            if (channel, family, *mark) in self._named:
                self.repeated += 1
            self._named.add((channel, family, *mark))
            self.bursts[index].positions += 1
            self.positions.append(PositionSeen(now, now - at, index))
            return
        if kind == "notif.sync" and event["uid"] not in self.synced:
            self.synced.add(event["uid"])
            self.first_sync[event["uid"]] = now
        if stream is None or now - stream.last >= QUIET:
            self.bursts.append(Burst(key, now, now))
            if stream is None:
                stream = self._streams[key] = _Stream(now, len(self.bursts) - 1)
            stream.burst = len(self.bursts) - 1
        burst = self.bursts[stream.burst]
        burst.end, burst.events = now, burst.events + 1
        stream.last, stream.newest = now, mark
        stream.events[mark] = (stream.burst, now)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.pubsub.aclose()


# -- the mix: adds, mark-reads and deletes on random users ------------------------------------------


class Mix:
    """Notification writes at `rate` per second (changed between phases) on random users; each
    makes one event. A user who holds no unread notification gets an add; one who holds one gets
    a mark-read or a delete of it (half each). So, as half the users hold one, half the writes
    are adds and a quarter each mark-reads and deletes, and every list stays at most one long:
    Google's emulator answers each write with every result set again, so its cost per write
    grows with them (with lists of one to three, it took at most about 40 writes a second at
    10,000 users on the 2 shared cores).

    At most `MIX_THREADS` writes are in flight: when the emulator answers slower than that
    allows, a write is skipped (counted), not queued, so the rate achieved is what was written
    (and the drops' own writes never wait behind a queue)."""

    def __init__(self, db: firestore.Client, uids: list[str], seed: int, pool: ThreadPoolExecutor) -> None:
        self.db, self.uids, self.pool = db, uids, pool
        self.rng = random.Random(seed)
        self.rate = 0.0
        self.unread: dict[str, set[str]] = {uid: set() for uid in uids}
        self.busy: set[str] = set()
        self.ops: Counter[str] = Counter()
        self.errors = 0
        self.skipped = 0  # ticks with every thread busy
        self.written: list[tuple[float, float]] = []  # (done at, seconds the write took)
        self.sent: dict[str, float] = {}
        self.numbers = itertools.count()
        self.inflight: set[asyncio.Future[None]] = set()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            if self.rate <= 0:
                await asyncio.sleep(0.1)
                next_at = time.monotonic()
                continue
            next_at = max(next_at + 1 / self.rate, time.monotonic() - 1.0)  # never a catch-up storm
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            self._one()

    def _one(self) -> None:
        if len(self.inflight) >= MIX_THREADS:
            self.skipped += 1
            return
        uid = self.rng.choice(self.uids)
        held = sorted(self.unread[uid] - self.busy)
        if not held:
            doc_id = f"m{next(self.numbers):07d}"
            self.unread[uid].add(doc_id)
            self._start("add", doc_id, lambda: write_notification(self.db, uid, doc_id, self.sent))
            return
        doc_id = self.rng.choice(held)
        self.unread[uid].discard(doc_id)
        ref = self.db.document(f"clients/{uid}/notifications/{doc_id}")
        if self.rng.random() < 0.5:
            self._start("read", doc_id, lambda: ref.update({"read": True}, retry=None, timeout=10))
        else:
            self._start("delete", doc_id, lambda: ref.delete(retry=None, timeout=10))

    def _start(self, kind: str, doc_id: str, call: Callable[[], Any]) -> None:
        self.ops[kind] += 1
        self.busy.add(doc_id)

        def work() -> None:
            began = time.monotonic()
            try:
                if call() is False:
                    self.errors += 1
            except Exception:  # counted; the run goes on
                self.errors += 1
            finally:
                self.busy.discard(doc_id)
                now = time.monotonic()
                self.written.append((now, now - began))

        future = asyncio.get_running_loop().run_in_executor(self.pool, work)
        self.inflight.add(future)
        future.add_done_callback(self.inflight.discard)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.inflight:
            await asyncio.wait(set(self.inflight), timeout=30)


# -- the lossy consumer: the real Bridge, losing chosen events ----------------------------------------


@dataclass
class Drop:
    uid: str
    phase: int
    docs: list[str]  # the burst written; the last one is lost
    truth: set[str]  # the user's unread notifications once the burst is written
    lost_seq: int = 0
    lost_at: float = float("nan")  # arrival of the lost event at the consumer
    position_at: float = float("nan")  # first position at or past the lost event's seq
    asked_at: float = float("nan")  # first resync request after the loss
    healed_at: float = float("nan")  # the consumer's list equals the truth again
    healed_by: str = ""

    @property
    def heal_s(self) -> float:
        return self.healed_at - self.lost_at


class LossyBridge(Bridge):
    """`Bridge` that loses, on purpose, the event of `lose[channel]` (a doc id's `notif.add`) as
    if the network had, and notes when positions and resync requests came."""

    def __init__(self, settings: RedisSettings) -> None:
        super().__init__(settings)
        self.lose: dict[str, Drop] = {}  # channel -> the drop whose last event is to be lost
        self.watching: dict[str, Drop] = {}  # channel -> a drop lost and not yet healed

    def _on_message(self, channel: str, data: bytes) -> None:
        drop, watched = self.lose.get(channel), self.watching.get(channel)
        if drop is not None or watched is not None:
            event = json.loads(data)
            now = time.monotonic()
            kind = event["type"]
            if drop is not None and kind == "notif.add" and event["payload"]["doc_id"] == drop.docs[-1]:
                del self.lose[channel]
                drop.lost_at, drop.lost_seq = now, int(event["seq"])
                self.watching[channel] = drop
                return  # lost
            first = watched is not None and watched.position_at != watched.position_at  # still NaN
            if first and watched and kind.endswith(POSITION) and event["seq"] >= watched.lost_seq:
                watched.position_at = now
        super()._on_message(channel, data)

    async def _ask_resync(self, reader: _Reader) -> None:
        drop = self.watching.get(reader.channels[0])
        if drop is not None and drop.asked_at != drop.asked_at:
            drop.asked_at = time.monotonic()
        await super()._ask_resync(reader)


class Consumer:
    """One `events()` iterator per drop user, each into a `Notifications` reducer."""

    def __init__(self, bridge: LossyBridge, uids: list[str]) -> None:
        self.bridge = bridge
        self.lists = {uid: Notifications() for uid in uids}
        self.synced: set[str] = set()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._follow(uid)) for uid in self.lists]

    async def _follow(self, uid: str) -> None:
        reducer = self.lists[uid]
        channel = f"user:{uid}"
        async for event in self.bridge.events(uid):
            reducer.apply(event)
            if event["type"] == "notif.sync":
                self.synced.add(uid)
            drop = self.bridge.watching.get(channel)
            if drop is not None and self.held(uid) == drop.truth:
                drop.healed_at, drop.healed_by = time.monotonic(), str(event["type"])
                del self.bridge.watching[channel]

    def held(self, uid: str) -> set[str]:
        return {str(n["doc_id"]) for n in self.lists[uid].items}

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=30)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self.bridge.aclose()


# -- one run ------------------------------------------------------------------------------------------


@dataclass
class Phase:
    rate: float
    warmup: float
    window: float
    began: float = float("nan")
    window_start: float = float("nan")
    window_end: float = float("nan")
    ended: float = float("nan")
    ops_before: Counter[str] = field(default_factory=Counter)
    ops: Counter[str] = field(default_factory=Counter)  # writes submitted in the window
    metric_positions: float = float("nan")  # listeners_tail_positions_total over the window
    service_cpu: float = float("nan")  # % of a core over the window
    skipped: int = 0  # writes of the mix skipped in the window: every thread was busy
    write_s: list[float] = field(default_factory=list)  # sorted: seconds each write of the window took
    drops: list[Drop] = field(default_factory=list)


@dataclass
class Run:
    users: int
    log_path: Path
    emulator_log: Path
    phases: list[Phase]
    ready_s: float = float("nan")  # service start -> every user's first notif.sync
    tally: Tally | None = None
    metric_total: float = float("nan")
    positions_total: int = 0
    write_errors: int = 0
    ops: Counter[str] = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)  # drop users whose list differs from Firestore
    problems: list[str] = field(default_factory=list)
    error: str = ""
    first_write: float = float("nan")


async def metric(http: httpx.AsyncClient, name: str) -> float:
    body = (await http.get("/metrics", timeout=10)).text
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def prefill(db: firestore.Client, uids: list[str], unread: dict[str, set[str]]) -> None:
    """One unread notification for every other user, before the service starts (the mix's
    steady state: half the users hold one)."""
    for i in range(0, len(uids), 500):
        batch = db.batch()
        for uid in uids[i : i + 500 : 2]:
            doc_id = f"p-{uid}"
            batch.set(db.document(f"clients/{uid}/notifications/{doc_id}"), notification_data(doc_id))
            unread[uid].add(doc_id)
        batch.commit(timeout=60)


async def write_burst(
    db: firestore.Client, pool: ThreadPoolExecutor, drop: Drop, bridge: LossyBridge
) -> None:
    """The drop's burst, one write after the other; its last event is lost by the consumer."""
    loop = asyncio.get_running_loop()
    sent: dict[str, float] = {}
    bridge.lose[f"user:{drop.uid}"] = drop
    for n, doc_id in enumerate(drop.docs):
        if n:
            await asyncio.sleep(0.3)
        if not await loop.run_in_executor(pool, write_notification, db, drop.uid, doc_id, sent):
            log(f"drop {drop.uid}: write of {doc_id} failed")


async def run(args: argparse.Namespace) -> Run:
    tmp = Path(tempfile.gettempdir())
    name = f"listeners-tails-{args.users}-{uuid.uuid4().hex[:6]}"
    phases = [Phase(rate, warmup, args.window) for rate, warmup in zip(args.rates, args.warmup, strict=True)]
    r = Run(args.users, tmp / f"{name}.log", tmp / f"{name}-emulator.log", phases)
    with RedisServer() as redis_server:
        emulator = LoggedEmulator(r.emulator_log)
        try:
            with emulator:
                emulator_env(emulator.host)
                await run_phases(r, args, redis_server.port, emulator.host)
        except Exception as exc:  # reported with what was measured so far
            r.error = f"{type(exc).__name__}: {exc}"
            log(f"FAILED: {r.error}")
    return r


async def run_phases(r: Run, args: argparse.Namespace, redis_port: int, emulator_host: str) -> None:
    project = f"tails-{uuid.uuid4().hex[:6]}"
    rng = random.Random(args.seed)
    uids = [f"u{i:05d}" for i in range(args.users)]
    droppers = rng.sample(uids, args.drops * len(r.phases))
    reserved = set(droppers)
    loop = asyncio.get_running_loop()
    db = firestore.Client(project=project)
    pool = ThreadPoolExecutor(MIX_THREADS, thread_name_prefix="tails-mix")
    own = ThreadPoolExecutor(8, thread_name_prefix="tails-write")  # set-up, drops: never behind the mix
    client = aioredis.Redis(host="127.0.0.1", port=redis_port)
    tally = r.tally = Tally(client)
    mix = Mix(db, [u for u in uids if u not in reserved], args.seed, pool)
    settings = RedisSettings(host="127.0.0.1", port=redis_port, control_token=Secret(CONTROL_TOKEN))
    bridge = LossyBridge(settings)
    consumer = Consumer(bridge, droppers)
    service: BenchService | None = None
    progress: asyncio.Task[None] | None = None
    unread: dict[str, set[str]] = {uid: set() for uid in uids}
    try:
        await loop.run_in_executor(own, registry_batch, db, uids)
        await loop.run_in_executor(own, prefill, db, uids, unread)
        for uid in mix.uids:
            mix.unread[uid] = set(unread[uid])
        await tally.start()
        began = time.monotonic()
        env = {
            "LISTENERS_FIRESTORE_SOURCE": "listen",
            "LISTENERS_CONTROL_TOKEN": CONTROL_TOKEN,
            "LOG_LEVEL": args.log_level,
        }
        service = BenchService(redis_port, emulator_host, project, r.log_path, env)
        ps = psutil.Process(service.pid)
        log(f"{args.users} users; service log {r.log_path}")
        await loop.run_in_executor(None, wait_for_port, service.port, 60.0, service.process)
        await wait_healthy(service.port, args.users, args.ready_timeout)
        deadline = time.monotonic() + args.ready_timeout
        while len(tally.synced) < args.users:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(tally.synced)} of {args.users} users got their first notif.sync")
            await asyncio.sleep(0.2)
        r.ready_s = max(tally.first_sync.values()) - began
        log(f"every user synced in {r.ready_s:.1f} s")
        consumer.start()
        while len(consumer.synced) < len(droppers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the consumer synced {len(consumer.synced)} of {len(droppers)} users")
            await asyncio.sleep(0.2)
        mix.start()
        r.first_write = time.monotonic()
        progress = asyncio.create_task(report_progress(tally, mix))
        numbers = itertools.count()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.port}") as http:
            for index, phase in enumerate(r.phases):
                mine = droppers[index * args.drops : (index + 1) * args.drops]
                await run_phase(r, phase, index, mine, unread, mix, db, own, bridge, http, ps, numbers, args)
            r.metric_total = await metric(http, "listeners_tail_positions_total")
        r.positions_total = len(tally.positions)
        await mix.stop()
        r.write_errors, r.ops = mix.errors, mix.ops
        truth = await loop.run_in_executor(own, unread_of, db, droppers)
        r.mismatches = [
            f"{uid}: consumer {sorted(consumer.held(uid))}, Firestore {sorted(truth[uid])}"
            for uid in droppers
            if consumer.held(uid) != truth[uid]
        ]
    finally:
        await mix.stop()
        await consumer.stop()
        if service is not None:
            service.stop_timed()
        await tally.stop()
        await client.aclose()
        if progress is not None:
            progress.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        own.shutdown(wait=False, cancel_futures=True)
        db.close()
        r.problems = log_problems(r.log_path) if r.log_path.exists() else []


async def report_progress(tally: Tally, mix: Mix, every: float = 30.0) -> None:
    """A line every `every` seconds: writes done, events and positions that arrived, waits."""
    while True:
        await asyncio.sleep(every)
        now = time.monotonic()
        w = window(tally, now - every, now)
        done = [took for at, took in mix.written if at >= now - every]
        log(
            f"last {every:g} s: {len(done) / every:.1f} writes/s (p50 {percentile(sorted(done), 50):.2f} s, "
            f"{mix.skipped} skipped so far), {w.events / every:.1f} events/s, "
            f"{w.positions / every:.1f} positions/s, wait p50 {percentile(w.waits, 50):.1f} s"
        )


async def run_phase(
    r: Run,
    phase: Phase,
    index: int,
    droppers: list[str],
    unread: dict[str, set[str]],
    mix: Mix,
    db: firestore.Client,
    pool: ThreadPoolExecutor,
    bridge: LossyBridge,
    http: httpx.AsyncClient,
    ps: psutil.Process,
    numbers: itertools.count[int],
    args: argparse.Namespace,
) -> None:
    rng = random.Random(args.seed * 1000 + index)
    mix.rate = phase.rate
    phase.began = time.monotonic()
    log(f"phase {index + 1}: {phase.rate:g} writes/s, warm-up {phase.warmup:g} s")
    await asyncio.sleep(phase.warmup)
    before = await metric(http, "listeners_tail_positions_total")
    phase.ops_before = Counter(mix.ops)
    skipped_before = mix.skipped
    ps.cpu_percent(None)
    phase.window_start = time.monotonic()
    log(f"phase {index + 1}: window of {phase.window:g} s, {len(droppers)} drops")
    writing = []
    for n, uid in enumerate(droppers):
        at = phase.window_start + (n + 0.5) * phase.window / max(1, len(droppers))
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        docs = [f"d{next(numbers):05d}" for _ in range(rng.randint(1, 3))]
        unread[uid].update(docs)
        drop = Drop(uid, index, docs, set(unread[uid]))
        phase.drops.append(drop)
        writing.append(asyncio.create_task(write_burst(db, pool, drop, bridge)))
    await asyncio.sleep(max(0.0, phase.window_start + phase.window - time.monotonic()))
    phase.window_end = time.monotonic()
    phase.service_cpu = ps.cpu_percent(None)
    phase.metric_positions = await metric(http, "listeners_tail_positions_total") - before
    phase.ops = Counter(mix.ops)
    phase.ops.subtract(phase.ops_before)
    phase.skipped = mix.skipped - skipped_before
    phase.write_s = sorted(took for at, took in mix.written if phase.window_start <= at < phase.window_end)
    await asyncio.gather(*writing)
    deadline = phase.window_end + args.heal_timeout
    last_note = 0.0
    while any(d.healed_at != d.healed_at for d in phase.drops) and time.monotonic() < deadline:
        if time.monotonic() - last_note > 60:
            last_note = time.monotonic()
            healed = sum(1 for d in phase.drops if d.healed_at == d.healed_at)
            log(f"phase {index + 1}: {healed} of {len(phase.drops)} drops healed")
        await asyncio.sleep(0.5)
    phase.ended = time.monotonic()
    times = sorted(d.heal_s for d in phase.drops if d.healed_at == d.healed_at)
    log(
        f"phase {index + 1}: {len(times)} of {len(phase.drops)} healed, heal p50 "
        f"{percentile(times, 50):.1f} s, max {percentile(times, 100):.1f} s"
    )


def unread_of(db: firestore.Client, uids: list[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for uid in uids:
        query = db.collection(f"clients/{uid}/notifications").where(
            filter=firestore.FieldFilter("read", "==", False)
        )
        out[uid] = {doc.id for doc in query.stream(timeout=30)}
    return out


# -- the report ---------------------------------------------------------------------------------------


@dataclass
class Window:
    """What the tally saw between two times."""

    seconds: float
    events: int
    event_bytes: int
    positions: int
    position_bytes: int
    by_type: Counter[str]
    bytes_by_type: Counter[str]
    waits: list[float]  # sorted, of the positions that arrived in it
    bursts: int  # bursts whose last event arrived in it
    burst_positions: Counter[int]  # those bursts, by the number of positions they got

    @property
    def early(self) -> int:
        return sum(1 for wait in self.waits if wait < QUIET)

    @property
    def extra_messages(self) -> float:
        return 100 * self.positions / self.events if self.events else float("nan")

    @property
    def extra_bytes(self) -> float:
        return 100 * self.position_bytes / self.event_bytes if self.event_bytes else float("nan")


def window(tally: Tally, start: float, end: float) -> Window:
    inside = [a for a in tally.arrivals if start <= a.at < end]
    positions = [a for a in inside if a.type.endswith(POSITION)]
    events = [a for a in inside if not a.type.endswith(POSITION)]
    ended = [b for b in tally.bursts if start <= b.end < end]
    return Window(
        seconds=end - start,
        events=len(events),
        event_bytes=sum(a.size for a in events),
        positions=len(positions),
        position_bytes=sum(a.size for a in positions),
        by_type=Counter(a.type for a in inside),
        bytes_by_type=Counter(
            {t: sum(a.size for a in inside if a.type == t) for t in {a.type for a in inside}}
        ),
        waits=sorted(p.wait for p in tally.positions if start <= p.at < end and p.wait == p.wait),
        bursts=len(ended),
        burst_positions=Counter(b.positions for b in ended),
    )


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value != value else f"{value:,.{digits}f}"


def render(r: Run, command: str, code: str, started: datetime, elapsed: float) -> str:
    tally = r.tally
    lines = [START, *report_head(command, code, started, elapsed)]
    if r.error:
        lines += [f"**FAILED: {r.error}**", ""]
    lines += [
        f"{r.users:,} users online, every other one with an unread notification; every first `notif.sync` "
        f"{fmt(r.ready_s)} s after the service started.",
        "",
    ]
    if tally is None:
        return "\n".join([*lines, END])
    lines += [
        "| writes/s | window s | events/s | event bytes/s | positions/s | position bytes/s "
        "| extra messages | extra bytes | `listeners_tail_positions` /s | service CPU % "
        "| bursts ended | bursts with 1 / 0 / ≥ 2 positions | positions < 2 s after their event "
        "| wait p50 / p99 / max s "
        "| drops | healed | heal p50 / p99 / max s |",
        "|" + "---:|" * 17,
    ]
    for phase in r.phases:
        if phase.window_end != phase.window_end:
            continue
        w = window(tally, phase.window_start, phase.window_end)
        s = w.seconds
        achieved = len(phase.write_s) / s
        more = sum(n for k, n in w.burst_positions.items() if k >= 2)
        healed = sorted(d.heal_s for d in phase.drops if d.healed_at == d.healed_at)
        waits = " / ".join(fmt(percentile(w.waits, q)) for q in (50, 99, 100))
        heals = " / ".join(fmt(percentile(healed, q)) for q in (50, 99, 100))
        lines.append(
            f"| {phase.rate:g} ({achieved:.1f}) | {s:.0f} | {w.events / s:.1f} | {w.event_bytes / s:,.0f} "
            f"| {w.positions / s:.1f} | {w.position_bytes / s:,.0f} "
            f"| {fmt(w.extra_messages)} % | {fmt(w.extra_bytes)} % | {phase.metric_positions / s:.1f} "
            f"| {phase.service_cpu:.0f} | {w.bursts:,} "
            f"| {w.burst_positions[1]:,} / {w.burst_positions[0]:,} / {more} | {w.early} "
            f"| {waits} | {len(phase.drops)} | {len(healed)} | {heals} |"
        )
    lines += ["", "Per phase:"]
    for n, phase in enumerate(r.phases, 1):
        if phase.window_end != phase.window_end:
            lines.append(f"- phase {n} ({phase.rate:g} writes/s): did not reach its window")
            continue
        w = window(tally, phase.window_start, phase.window_end)
        types = ", ".join(f"{k} {v:,}" for k, v in sorted(w.by_type.items()))
        mean = ", ".join(f"{k} {w.bytes_by_type[k] / n:,.0f}" for k, n in sorted(w.by_type.items()))
        dropped = [d for d in phase.drops if d.lost_at == d.lost_at]
        to_position = sorted(d.position_at - d.lost_at for d in dropped if d.position_at == d.position_at)
        to_heal = sorted(d.healed_at - d.position_at for d in dropped if d.healed_at == d.healed_at)
        to_heal = [s for s in to_heal if s == s]
        by = Counter(d.healed_by for d in dropped if d.healed_by)
        lines.append(
            f"- phase {n}, {phase.rate:g} writes/s (warm-up {phase.warmup:g} s, then the window): messages "
            f"in the window {types}; mean bytes {mean}; writes {dict(phase.ops)}, each took p50 "
            f"{fmt(percentile(phase.write_s, 50), 2)} s, p99 {fmt(percentile(phase.write_s, 99), 2)} s, "
            f"{phase.skipped:,} skipped ({MIX_THREADS} in flight already); lost events "
            f"{len(dropped)} of {len(phase.drops)} (bursts of 1 to 3); lost → position p50 "
            f"{fmt(percentile(to_position, 50))} s, max {fmt(percentile(to_position, 100))} s; "
            f"position → list equal again p50 {fmt(percentile(to_heal, 50), 2)} s, "
            f"max {fmt(percentile(to_heal, 100), 2)} s; healed by {dict(by)}; "
            f"the phase ran {phase.ended - phase.began:.0f} s."
        )
        for d in phase.drops:
            if d.healed_at != d.healed_at:
                lines.append(
                    f"  - NOT HEALED: {d.uid}, burst {d.docs}, lost seq {d.lost_seq}, position "
                    f"{fmt(d.position_at - d.lost_at)} s after, asked {fmt(d.asked_at - d.lost_at)} s after"
                )
    every = Counter(b.positions for b in tally.bursts)
    lines += [
        f"- Whole run: {len(tally.bursts):,} bursts, of which {every[1]:,} got one position, "
        f"{every[0]:,} none (a later burst of their stream came before it, or the run ended), "
        f"{sum(n for k, n in every.items() if k >= 2)} two or more; {r.positions_total:,} positions "
        f"seen: {sum(1 for p in tally.positions if p.wait < QUIET)} less than {QUIET:g} s after the "
        f"event they name reached Redis, {tally.stale} naming an event older than their stream's "
        f"newest, {tally.repeated} repeating a position, {tally.unmatched} naming an event the tally "
        "did not see; "
        f"`listeners_tail_positions_total` {r.metric_total:,.0f} at the end; "
        f"writes {dict(r.ops)}, {r.write_errors} write errors; drop users whose list differs from "
        f"Firestore at the end: {len(r.mismatches)}"
        + (f" ({'; '.join(r.mismatches[:3])})" if r.mismatches else "")
        + f"; service log warnings/errors: {len(r.problems)}"
        + (f" ({summary(r.problems)})" if r.problems else "")
        + ".",
        "",
        f"Over time (from the first write; {BIN:.0f} s rows: messages that arrived, and the waits of the "
        "positions among them):",
        "",
        "| from s | phase | events/s | positions/s | positions / events | wait p50 s | wait max s "
        "| positions for attach syncs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += series(r)
    lines.append(END)
    return "\n".join(lines)


def summary(problems: list[str]) -> str:
    kinds = Counter(_message(line) for line in problems)
    return "; ".join(f"{n} x `{m[:120]}`" for m, n in kinds.most_common(3))


def series(r: Run) -> list[str]:
    tally = r.tally
    assert tally is not None
    rows = []
    origin = r.first_write
    end = max((p.ended for p in r.phases if p.ended == p.ended), default=origin)
    attach = {i for i, b in enumerate(tally.bursts) if b.end <= origin}
    t = origin
    while t < end:
        w = window(tally, t, t + BIN)
        middle = t + BIN / 2
        phase = next((n for n, p in enumerate(r.phases, 1) if p.began <= middle < p.ended), "")
        syncs = sum(1 for p in tally.positions if t <= p.at < t + BIN and p.burst in attach)
        rows.append(
            f"| {t - origin:.0f} | {phase} | {w.events / BIN:.1f} | {w.positions / BIN:.1f} "
            f"| {fmt(w.positions / w.events if w.events else float('nan'), 2)} "
            f"| {fmt(percentile(w.waits, 50))} | {fmt(percentile(w.waits, 100))} | {syncs:,} |"
        )
        t += BIN
    return rows


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tails", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--rates", type=parse_floats, default=[100.0, 10.0], help="writes/s, one phase each")
    parser.add_argument(
        "--warmup", type=parse_floats, default=[150.0, 60.0], help="seconds before each phase's window"
    )
    parser.add_argument("--window", type=float, default=120.0, help="seconds measured per phase")
    parser.add_argument("--drops", type=int, default=50, help="lost last events per phase")
    parser.add_argument("--heal-timeout", type=float, default=1500.0, help="seconds to wait after a window")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-level", default="WARNING", help="the service's LOG_LEVEL")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--code")
    args = parser.parse_args(argv)
    if len(args.warmup) == 1:
        args.warmup *= len(args.rates)
    if len(args.warmup) != len(args.rates):
        parser.error("--warmup: one value, or one per rate")
    signal.signal(signal.SIGTERM, _terminate)
    started, began = datetime.now(UTC), time.monotonic()
    try:
        result = asyncio.run(run(args))
    except KeyboardInterrupt:
        log("interrupted; every process it started is stopped")
        raise SystemExit(130) from None
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join([".venv/bin/python -m bench.tails", *_measuring(given)])
    described = _version(["git", "-C", str(PROJECT_ROOT), "describe", "--always", "--dirty"])
    code = args.code or (f"`{described}`" if described else "unknown")
    block = render(result, command, code, started, time.monotonic() - began)
    print(block)
    if not args.no_doc:
        update_doc(args.doc, block, START, END, SECTION)


if __name__ == "__main__":
    main()
