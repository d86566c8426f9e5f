"""Fault scenarios under load: each with users online and writes flowing, then the consumers
compared with the database truth. The lab is `bench/faultlab.py` (namespaces, links, writers).

For each scenario: fresh service instance(s) on a fresh Firestore project and Realtime
Database namespace, `--users` online, one Bridge consumer with an `events()` iterator and
the reducers per user, notification writes (add, update, read, delete) and direct messages
(add, read) at `--notif-rate` / `--dm-rate` per second; the fault; then one probe
notification and one probe message to `--probes` users; then writes stop and the consumer's
lists must equal the database's.

    flock /tmp/listeners-bench.lock .venv/bin/python -m bench.faults --users 1000

Outcome per scenario: *detect*: seconds from the fault until a service's /healthz or a
watched metric changed, or the bridge reconnected; *recover*: seconds from the end of the
fault until every probe was delivered, every instance said ok and the users were all served;
*lost*: items the consumer holds wrongly or lacks once converged (must be 0); *duplicates*
(an event applied twice to the same state: twice since the last sync of its stream; an event
seen again after another instance's sync that did not hold it yet is applied to that state,
as it must be, and counted apart as re-applied); *worst latency*: the longest time from a write's
first attempt to its first sighting by the consumer (a write made during a fault waits for it).
The table replaces the generated block of this benchmark in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from google.cloud import firestore

from bench.browsers import Browsers, node_missing
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
    registry_batch,
    stop_run,
)
from bench.faultlab import rtdb_truth as read_rtdb
from bench.latency import _measuring, _terminate, report_head, update_doc
from listeners_testkit.processes import PROJECT_ROOT

DOC = PROJECT_ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench.faults:start -->", "<!-- bench.faults:end -->"
SECTION = "## Faults under load (`bench/faults.py`)"
# A run on the wire transport goes to its own block, beside the wire client's other figures.
WIRE_DOC = PROJECT_ROOT / "docs" / "rtdb.md"
WIRE_START, WIRE_END = "<!-- bench.faults.wire:start -->", "<!-- bench.faults.wire:end -->"
WIRE_SECTION = "## Faults on the wire (`bench/faults.py --rtdb-transport wire`)"


@dataclass(frozen=True)
class Durations:
    fault: float = 30.0  # a blackhole, a cut, a slow link
    lossy: float = 60.0  # latency and loss on Firestore
    # The services' link to Redis half-open before every connection on it is reset; and Redis
    # and Firestore together. Each longer than the 6 s within which a dead Redis connection
    # is noticed, so that the reset finds the service reconnecting into the frozen link.
    halfopen: float = 20.0
    halfopen_both: float = 40.0
    before: float = 10.0  # writes before the fault
    after: float = 10.0  # writes after recovery
    recover_timeout: float = 180.0
    converge_timeout: float = 180.0

    @property
    def longest(self) -> float:
        """The longest fault."""
        return max(self.fault, self.lossy, self.halfopen, self.halfopen_both)


@dataclass
class Run:
    """What a scenario's fault needs, and when it began and ended."""

    lab: Lab
    instances: list[Instance]
    writer: Writer
    db: firestore.Client
    uids: list[str]
    monitor: Monitor
    d: Durations
    began: float = float("nan")
    began_wall: float = float("nan")
    healed: float = float("nan")
    how: str = ""

    def begin(self) -> None:
        self.monitor.arm()
        self.began, self.began_wall = time.monotonic(), time.time()

    def heal(self) -> None:
        self.healed = time.monotonic()


async def redis_blackhole(r: Run) -> None:
    r.begin()
    r.how = r.lab.redis.blackhole()
    await asyncio.sleep(r.d.fault)
    r.lab.redis.heal()
    r.heal()


async def redis_restart(r: Run) -> None:
    r.begin()
    await asyncio.to_thread(r.lab.redis.restart)
    r.how = "redis-server stopped (SIGTERM) and started again, empty"
    r.heal()


async def firestore_blackhole_restart(r: Run) -> None:
    r.begin()
    r.how = r.lab.firestore.blackhole() + f" {r.d.fault:g} s, then the emulator restarted, empty"
    await asyncio.sleep(r.d.fault)
    await asyncio.to_thread(r.lab.firestore.stop)  # its FINs are lost in the blackhole
    r.lab.firestore.heal()
    await asyncio.to_thread(r.lab.firestore.start)
    r.writer.forget_firestore()
    # The application's heartbeats write the registry again; here, at once.
    await asyncio.to_thread(registry_batch, r.db, r.uids, r.writer.chat_uids)
    r.heal()


async def rtdb_cut(r: Run) -> None:
    r.begin()
    r.how = r.lab.rtdb.cut() + f" {r.d.fault:g} s"
    await asyncio.sleep(r.d.fault)
    r.lab.rtdb.heal()
    r.heal()


async def rtdb_slow(r: Run) -> None:
    r.begin()
    r.how = "1 s each way, " + r.lab.rtdb.shape(1.0, 0.0) + f", {r.d.fault:g} s"
    await asyncio.sleep(r.d.fault)
    r.lab.rtdb.heal()
    r.heal()


async def firestore_lossy(r: Run) -> None:
    r.begin()
    r.how = "200 ms and 2 % loss, " + r.lab.firestore.shape(0.2, 0.02) + f", {r.d.lossy:g} s"
    await asyncio.sleep(r.d.lossy)
    r.lab.firestore.heal()
    r.heal()


async def redis_halfopen_reset(r: Run) -> None:
    r.begin()
    how = r.lab.redis.halfopen_service()
    await asyncio.sleep(r.d.halfopen)
    reset = r.lab.redis.reset_service()
    r.how = f"Redis: {how}, {r.d.halfopen:g} s; then its {reset} connections reset (RST both ends)"
    r.heal()


async def redis_firestore_halfopen(r: Run) -> None:
    r.begin()
    how = r.lab.redis.halfopen_service()
    r.lab.firestore.halfopen_service()
    await asyncio.sleep(r.d.halfopen_both)
    reset = r.lab.redis.reset_service(), r.lab.firestore.reset_service()
    r.how = (
        f"Redis and Firestore: {how}, {r.d.halfopen_both:g} s; then their {reset[0]} and "
        f"{reset[1]} connections reset (RST both ends)"
    )
    r.heal()


async def _served_by_survivors(r: Run, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while r.monitor.total_listeners() != len(r.uids) and time.monotonic() < deadline:
        await asyncio.sleep(0.25)


async def kill_then_sigterm(r: Run) -> None:
    r.begin()
    r.instances[0].service.process.kill()
    await _served_by_survivors(r, r.d.recover_timeout)
    status = await asyncio.to_thread(r.instances[1].service.stop, signal.SIGTERM, 30.0)
    killed, stopped = r.instances[0].id, r.instances[1].id
    r.how = f"kill -9 of {killed}; once the others served everyone, SIGTERM to {stopped} (exit {status})"
    r.heal()


async def redis_blackhole_takeover(r: Run) -> None:
    r.begin()
    r.instances[0].service.process.kill()
    r.how = (
        f"kill -9 of {r.instances[0].id}, and at once Redis: " + r.lab.redis.blackhole() + f" {r.d.fault:g} s"
    )
    await asyncio.sleep(r.d.fault)
    r.lab.redis.heal()
    r.heal()


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    inject: Callable[[Run], Awaitable[None]]
    instances: int = 1


SCENARIOS = [
    Scenario("redis-blackhole", "Redis blackholed (half-open)", redis_blackhole),
    Scenario("redis-restart", "Redis restarted", redis_restart),
    Scenario(
        "firestore-blackhole-restart", "Firestore blackholed, then restarted", firestore_blackhole_restart
    ),
    Scenario("rtdb-cut", "Realtime Database cut", rtdb_cut),
    Scenario("rtdb-slow", "Realtime Database slowed", rtdb_slow),
    Scenario("firestore-lossy", "Firestore: 200 ms latency, 2 % loss", firestore_lossy),
    Scenario("redis-halfopen-reset", "Redis half-open for the service, then reset", redis_halfopen_reset),
    Scenario(
        "redis-firestore-halfopen",
        "Redis and Firestore half-open for the service, then reset",
        redis_firestore_halfopen,
    ),
    Scenario("kill-and-sigterm", "3 instances: kill -9 one, SIGTERM another", kill_then_sigterm, 3),
    Scenario(
        "redis-blackhole-takeover",
        "3 instances: Redis blackholed during a takeover",
        redis_blackhole_takeover,
        3,
    ),
]
BY_NAME = {s.name: s for s in SCENARIOS}


@dataclass
class Outcome:
    scenario: Scenario
    users: int
    how: str = ""
    detected_s: float | None = None
    detected_by: str = ""
    recovered_s: float | None = None
    converged_s: float | None = None
    missing: int = -1
    extra: int = -1
    duplicates: int = 0
    reapplied: int = 0  # both consumers: events applied again after a sync that replaced the state
    # the browser clients (listeners-client.js), for a subset of the users
    browsers: int = 0
    browser_missing: int = -1
    browser_extra: int = -1
    browser_duplicates: int = 0
    browser_wire_duplicates: int = 0  # re-deliveries the client's order rules dropped
    # Tail positions (`*.position`) each consumer got, those that showed it a gap (its last
    # events lost: it asked for a resync), and those handed on as a change (must be 0).
    positions: int = 0
    position_gaps: int = 0
    positions_applied: int = 0
    browser_positions: int = 0
    browser_position_gaps: int = 0
    browser_positions_applied: int = 0
    position_gap_examples: list[str] = field(default_factory=list)
    # seconds from the receipt of a stream's last event to the receipt of its position
    position_delays: list[float] = field(default_factory=list)
    browser_position_delays: list[float] = field(default_factory=list)
    service_errors: Counter[str] = field(default_factory=Counter)  # tasks that died, in the logs
    # What served the Realtime Database when every user was synced, and once converged: the
    # stand-in's REST streams ("streams") and its WebSocket side ("connections", "listens",
    # "connects": WebSockets opened since it started), for this namespace.
    rtdb_ready: dict[str, int] = field(default_factory=dict)
    rtdb_end: dict[str, int] = field(default_factory=dict)
    worst_ms: float = float("nan")
    ops: Counter[str] = field(default_factory=Counter)
    failed_writes: int = 0
    examples: list[str] = field(default_factory=list)
    error: str = ""
    logs: str = ""

    @property
    def lost(self) -> int:
        return self.missing + self.extra if self.missing >= 0 else -1

    @property
    def browser_lost(self) -> int:
        if not self.browsers:
            return 0
        return self.browser_missing + self.browser_extra if self.browser_missing >= 0 else -1

    @property
    def ok(self) -> bool:
        return (
            not self.error
            and self.lost == 0
            and self.duplicates == 0
            and self.browser_lost == 0
            and self.browser_duplicates == 0
            and self.positions_applied == 0
            and self.browser_positions_applied == 0
        )


@dataclass
class Settings:
    users: int = 1000
    notif_rate: float = 10.0
    dm_rate: float = 5.0
    probes: int = 20
    browsers: int = 100  # users also followed by a browser client (the first ones)
    ready_timeout: float = 300.0
    durations: Durations = field(default_factory=Durations)
    rtdb_transport: str = "rest"  # the services' LISTENERS_RTDB_TRANSPORT: rest or wire


async def run_scenario(lab: Lab, scenario: Scenario, s: Settings, logs: Path) -> Outcome:
    out = Outcome(scenario, s.users)
    project, rtdb_ns = new_project(f"faults-{scenario.name}")
    uids = [f"u{i:04d}" for i in range(s.users)]
    here = logs / scenario.name
    here.mkdir(parents=True, exist_ok=True)
    out.logs = str(here)
    db = firestore.Client(project=project)
    http = httpx.AsyncClient(base_url=f"http://{lab.rtdb.address}")
    instances: list[Instance] = []
    monitor = Monitor(instances)
    consumer = Consumer(lab.redis_settings(), uids)
    writer = Writer(db, http, rtdb_ns, uids, s.notif_rate, s.dm_rate)
    writing: asyncio.Task[None] | None = None
    browsers = Browsers(project, uids[: s.browsers], here / "browsers.log") if s.browsers else None
    out.browsers = len(browsers.uids) if browsers else 0
    try:
        if browsers is not None and node_missing():
            raise RuntimeError(f"no browser consumer: {node_missing()}")
        extra = {**(browsers.env() if browsers else {}), "LISTENERS_RTDB_TRANSPORT": s.rtdb_transport}
        await asyncio.to_thread(registry_batch, db, uids)
        for i in range(scenario.instances):
            instances.append(
                lab.instance(f"f{chr(97 + i)}", project, rtdb_ns, here, LOG_LEVEL="INFO", **extra)
            )
        monitor.start()
        await consumer.start()
        began = time.monotonic()
        if not await consumer.wait(lambda: consumer.ready() == s.users, s.ready_timeout):
            raise TimeoutError(f"only {consumer.ready()} of {s.users} users synced")
        if browsers is not None:
            await asyncio.to_thread(wait_listening, instances)
            await browsers.start(instances)
            if not await until(lambda: browsers.ready() == len(browsers.uids), s.ready_timeout):
                synced = f"{browsers.ready()} of {len(browsers.uids)}"
                raise TimeoutError(f"only {synced} browser clients synced ({browsers.error})")
        while monitor.total_listeners() != s.users or not monitor.all_ok():
            if time.monotonic() - began > s.ready_timeout:
                raise TimeoutError(f"the instances serve {monitor.total_listeners()} of {s.users} users")
            await asyncio.sleep(0.25)
        log(f"{scenario.name}: {s.users} users served and synced in {time.monotonic() - began:.0f} s")
        out.rtdb_ready = await rtdb_served(lab, rtdb_ns)
        writing = asyncio.create_task(writer.run())
        await asyncio.sleep(s.durations.before)
        run = Run(lab, instances, writer, db, uids, monitor, s.durations)
        await scenario.inject(run)
        out.how = run.how
        log(f"{scenario.name}: fault over after {run.healed - run.began:.0f} s ({run.how})")
        step = max(1, s.users // max(1, s.probes))
        probes = await writer.probe(uids[::step][: s.probes])

        watched = set(browsers.uids) if browsers else set()
        browser_probes = [key for key in probes if key.split("/")[0] in watched]

        def recovered() -> bool:
            return (
                all(key in consumer.seen for key in probes)
                and (browsers is None or all(key in browsers.seen for key in browser_probes))
                and monitor.all_ok()
                and monitor.total_listeners() == s.users
            )

        if await consumer.wait(recovered, s.durations.recover_timeout):
            out.recovered_s = time.monotonic() - run.healed
        else:
            seen = sum(key in consumer.seen for key in probes)
            in_browsers = sum(key in browsers.seen for key in browser_probes) if browsers else 0
            if browsers is not None:
                lacking = sorted({key.split("/")[0] for key in browser_probes if key not in browsers.seen})
                statuses = Counter(str(v.get("status")) for v in browsers.views.values())
                log(f"browser clients: {dict(statuses)}; lacking probes: {lacking}")
            log(
                f"not recovered: {seen}/{len(probes)} probes seen, by the browsers "
                f"{in_browsers}/{len(browser_probes)}, instances ok: {monitor.all_ok()}, "
                f"served: {monitor.total_listeners()}"
            )
        bridge_noticed = [t for t in consumer.bridge.connects if t >= run.began]
        noticed = [(t, by) for t, by in ((monitor.noticed, monitor.noticed_by),) if t is not None]
        if bridge_noticed:
            noticed.append((bridge_noticed[0], "bridge reconnected"))
        for instance in instances:
            sign = first_sign(instance.log_path, run.began_wall)
            if sign is not None:
                noticed.append((run.began + sign[0] - run.began_wall, f"{instance.id} log: {sign[1]}"))
        if noticed:
            first = min(noticed)
            out.detected_s, out.detected_by = first[0] - run.began, first[1]
        log(f"{scenario.name}: recovered: {out.recovered_s}; writing {s.durations.after:g} s more")
        await asyncio.sleep(s.durations.after)
        writer.paused = True
        await writer.drain(300.0)
        log(f"{scenario.name}: writes stopped ({len(writer.inflight)} still in flight); comparing")
        writing.cancel()
        stopped = time.monotonic()
        while True:
            notif = await asyncio.to_thread(firestore_truth, db, uids)
            dms = await read_rtdb(http, rtdb_ns)
            truth = {uid: {**notif[uid], **{f"m:{k}": "dm" for k in dms.get(uid, set())}} for uid in uids}
            out.missing, out.extra, out.examples = compare(consumer.state(), truth)
            if browsers is not None:
                out.browser_missing, out.browser_extra, browser_examples = compare(
                    browsers.state(), {uid: truth[uid] for uid in browsers.uids}
                )
                out.examples += [f"browser: {e}" for e in browser_examples]
            if out.missing + out.extra == 0 and out.browser_lost == 0:
                out.converged_s = time.monotonic() - stopped
                out.rtdb_end = await rtdb_served(lab, rtdb_ns)
                break
            if time.monotonic() - stopped > s.durations.converge_timeout:
                break
            await asyncio.sleep(1.0)
        out.duplicates = consumer.duplicates
        out.reapplied = consumer.reapplied
        out.examples += consumer.duplicate_examples
        positions = consumer.positions
        out.positions, out.position_gaps = positions.seen, positions.gaps
        out.positions_applied = positions.applied
        out.position_gap_examples = list(positions.gap_examples)
        out.position_delays = list(positions.delays)
        if browsers is not None:
            out.browser_positions, out.browser_position_gaps = browsers.positions, browsers.position_gaps
            out.browser_positions_applied = browsers.positions_applied
            out.browser_position_delays = list(browsers.position_delays)
            out.position_gap_examples += [f"browser: {e}" for e in browsers.position_gap_examples]
            out.browser_duplicates = browsers.duplicates
            out.browser_wire_duplicates = browsers.wire_duplicates
            out.reapplied += browsers.reapplied
            out.examples += [f"browser: {e}" for e in browsers.duplicate_examples]
            if browsers.error:
                raise RuntimeError(f"browser clients: {browsers.error}")
        latencies = [consumer.seen[k] - t for k, t in writer.writes.sent.items() if k in consumer.seen]
        out.worst_ms = max(latencies, default=float("nan")) * 1000
        out.ops, out.failed_writes = writer.writes.ops, writer.writes.failed
    except Exception as exc:  # reported in the table; the next scenario still runs
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        log(f"{scenario.name}: stopping")
        if writing is not None:
            writing.cancel()
            await asyncio.gather(writing, return_exceptions=True)
        await stop_run(writer, consumer, monitor, instances, http, db, browsers)
        for instance in instances:
            out.service_errors.update(
                {f"{instance.id}: {k}": v for k, v in service_errors(instance.log_path).items()}
            )
        for dependency in lab.dependencies:  # a failed scenario must not leave a fault behind
            dependency.heal()
            if dependency.child.process is None:
                await asyncio.to_thread(dependency.start)
    log(
        f"{scenario.name}: detect {out.detected_s} ({out.detected_by}), recover {out.recovered_s}, "
        f"lost {out.lost}, duplicates {out.duplicates}, worst {out.worst_ms:.0f} ms; "
        f"{out.browsers} browsers: lost {out.browser_lost}, duplicates {out.browser_duplicates} "
        f"(dropped by the client: {out.browser_wire_duplicates}; "
        + (f"{browsers.events} events applied, {browsers.connects} sockets)" if browsers else ")")
        + f"; the stand-in served {out.rtdb_ready} when synced, {out.rtdb_end} when converged"
        + f"; positions {out.positions}/{out.browser_positions}, showing a gap "
        f"{out.position_gaps}/{out.browser_position_gaps}, applied as changes "
        f"{out.positions_applied}/{out.browser_positions_applied}, after the last event "
        f"{_delays(out.position_delays)} / {_delays(out.browser_position_delays)} s (bridge/browsers)"
        + (f" ({out.position_gap_examples})" if out.position_gap_examples else "")
        + (f"; in the service logs: {dict(out.service_errors)}" if out.service_errors else "")
        + (f", ERROR {out.error}" if out.error else "")
        + (f", e.g. {out.examples}" if out.examples else "")
    )
    return out


async def rtdb_served(lab: Lab, ns: str) -> dict[str, int]:
    """The stand-in's open REST streams and its WebSocket side for namespace `ns`."""
    wire = await lab.standin.wire(ns)
    served = {key: int(wire[key]) for key in ("connections", "listens", "connects")}
    return {"streams": await lab.standin.open_streams(ns), **served}


async def until(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.25)
    return True


def wait_listening(instances: list[Instance]) -> None:
    for instance in instances:
        instance.service.wait_listening()


SIGNS = ("reconnect", "lost", "ended", "unreachable", "unavailable", "expired", "left")


def first_sign(path: Path, since: float) -> tuple[float, str] | None:
    """The first line of a service's log at or after `since` (wall clock) that says something
    went wrong: a warning or worse, or an info line about a reconnect or a lost peer."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            entry = json.loads(line)
            at = datetime.fromisoformat(entry["time"]).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        message = str(entry.get("message", ""))
        if at >= since and (
            entry.get("level") in ("WARNING", "ERROR", "CRITICAL") or any(s in message.lower() for s in SIGNS)
        ):
            return at, message[:80]
    return None


def service_errors(path: Path) -> Counter[str]:
    """What a service's log says went wrong inside it, not in its dependencies: each task that
    died (the supervisor restarted it) and each task whose exception nobody retrieved, by
    task and reason."""
    found: Counter[str] = Counter()
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return found
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        message = str(entry.get("message", ""))
        reason = str(entry.get("reason") or entry.get("error") or "")
        # the address of a transport differs each time: keep what names the failure
        reason = re.sub(r"<[^<>]*>", "<…>", reason)[:120]
        if message.startswith("task died"):
            found[f"task {entry.get('task')} died: {reason}"] += 1
        elif message.startswith("Task exception was never retrieved"):
            task = message.split("name='", 1)[1].split("'", 1)[0] if "name='" in message else "?"
            found[f"task {task} failed unseen: {reason}"] += 1
    return found


def _delays(values: list[float]) -> str:
    """Median and greatest, "-" when there are none."""
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[len(ordered) // 2]:.1f} ({ordered[-1]:.0f})"


def _s(value: float | None) -> str:
    return "not noticed" if value is None else f"{value:.1f}"


def render(
    load: str,
    outcomes: list[Outcome],
    lab: str,
    command: str,
    code: str,
    started: datetime,
    elapsed: float,
    s: Settings,
) -> str:
    d = s.durations
    lines = [
        START,
        "",
        *report_head(command, code, started, elapsed),
        f"Lab: {lab}. Realtime Database client: {s.rtdb_transport} (`LISTENERS_RTDB_TRANSPORT`). "
        f"{s.users} users online per scenario; writes at {s.notif_rate:g} notification operations/s "
        f"(add 40 %, update, read, delete 20 % each) and {s.dm_rate:g} direct-message "
        f"operations/s (add 60 %, read 40 %) over random users; {d.before:g} s of writes before the "
        f"fault and {d.after:g} s after recovery; {s.probes} users probed after the fault. "
        f"Consumers: the bridge's reducers for every user, and the browser client module "
        f"(listeners-client.js in Node, through /ws) for the first {min(s.browsers, s.users)}. "
        f"Load average at the start: {load}.",
        "",
        "| scenario | fault | detect s | noticed by | recover s | lost | duplicates "
        "| browsers: lost | browsers: duplicates | positions: bridge / browsers "
        "| positions showing a gap: bridge / browsers "
        "| position after the last event s, median (max): bridge / browsers "
        "| worst latency ms | converged s | writes |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for o in outcomes:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(o.ops.items()))
        if o.failed_writes:
            ops += f"; {o.failed_writes} gave up"
        lost = "?" if o.lost < 0 else str(o.lost)
        browser_lost = "-" if not o.browsers else "?" if o.browser_lost < 0 else str(o.browser_lost)
        browser_dups = "-" if not o.browsers else str(o.browser_duplicates)
        if o.browser_wire_duplicates:
            browser_dups += f" ({o.browser_wire_duplicates} dropped by the client)"
        lines.append(
            f"| {o.scenario.title} | {o.how or '-'} | {_s(o.detected_s)} | {o.detected_by or '-'} "
            f"| {'never' if o.recovered_s is None else f'{o.recovered_s:.1f}'} | {lost} | {o.duplicates}"
            + (f" ({o.reapplied} re-applied after a sync)" if o.reapplied else "")
            + " "
            f"| {browser_lost} | {browser_dups} "
            f"| {o.positions} / {'-' if not o.browsers else o.browser_positions} "
            f"| {o.position_gaps} / {'-' if not o.browsers else o.browser_position_gaps} "
            f"| {_delays(o.position_delays)} / {_delays(o.browser_position_delays)} "
            f"| {o.worst_ms:.0f} "
            f"| {'never' if o.converged_s is None else f'{o.converged_s:.1f}'} | {ops} |"
        )
    failed = [o for o in outcomes if not o.ok]
    lines += [""]
    for o in failed:
        what = o.error or (
            "did not converge"
            if o.lost != 0 or o.browser_lost != 0
            else f"{o.duplicates} duplicate(s) in the bridge, {o.browser_duplicates} in the browsers"
            if o.duplicates or o.browser_duplicates
            else f"tail positions handed on as changes: {o.positions_applied} by the bridge, "
            f"{o.browser_positions_applied} by the browsers"
        )
        lines.append(f"- **{o.scenario.title}**: {what}; {'; '.join(o.examples)}")
    for o in outcomes:
        if o.position_gap_examples:
            lines.append(
                f"- {o.scenario.title}: a tail position showed a gap (its stream's last events "
                f"lost; a resync followed) {o.position_gaps} time(s) in the bridge, "
                f"{o.browser_position_gaps} in the browsers; e.g. {'; '.join(o.position_gap_examples[:3])}"
            )
        if o.service_errors:
            died = "; ".join(f"{k} ({v}x)" for k, v in sorted(o.service_errors.items()))
            lines.append(f"- {o.scenario.title}: in the service logs: {died}")
    lines += ["", END]
    return "\n".join(lines)


async def run_all(
    scenarios: list[Scenario],
    s: Settings,
    logs: Path,
    use_netns: bool | None = None,
    done: Callable[[list[Outcome], str], None] | None = None,
) -> tuple[list[Outcome], str]:
    """Every scenario in one lab; `done` is told after each (so a long run reports as it goes)."""
    outcomes: list[Outcome] = []
    with Lab(use_netns) as lab:
        log(lab.describe())
        for scenario in scenarios:
            outcomes.append(await run_scenario(lab, scenario, s, logs))
            if done is not None:
                done(outcomes, lab.describe())
        return outcomes, lab.describe()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.faults", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument(
        "--scenarios", default=",".join(BY_NAME), help="comma-separated, of: " + ", ".join(BY_NAME)
    )
    parser.add_argument("--notif-rate", type=float, default=10.0)
    parser.add_argument("--dm-rate", type=float, default=5.0)
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
    parser.add_argument("--before", type=float, default=10.0, help="seconds of writes before the fault")
    parser.add_argument("--after", type=float, default=10.0, help="seconds of writes after recovery")
    parser.add_argument(
        "--browsers", type=int, default=100, help="users also followed by a browser client (0: none)"
    )
    parser.add_argument(
        "--rtdb-transport",
        choices=("rest", "wire"),
        default="rest",
        help="the services' Realtime Database client (LISTENERS_RTDB_TRANSPORT)",
    )
    parser.add_argument("--no-netns", action="store_true", help="proxies only")
    parser.add_argument("--doc", type=Path, help="default: docs/benchmarks.md, docs/rtdb.md for wire")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--code")
    args = parser.parse_args(argv)
    wire = args.rtdb_transport == "wire"
    doc = args.doc or (WIRE_DOC if wire else DOC)
    settings = Settings(
        users=args.users,
        notif_rate=args.notif_rate,
        dm_rate=args.dm_rate,
        browsers=args.browsers,
        rtdb_transport=args.rtdb_transport,
        durations=Durations(
            fault=args.fault,
            lossy=args.lossy,
            halfopen=args.halfopen,
            halfopen_both=args.halfopen_both,
            before=args.before,
            after=args.after,
        ),
    )
    chosen = [BY_NAME[name] for name in args.scenarios.split(",") if name]
    signal.signal(signal.SIGTERM, _terminate)
    started, began = datetime.now(UTC), time.monotonic()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    logs = Path(tempfile.mkdtemp(prefix="listeners-faults-"))
    log(f"logs in {logs}")
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(
        ["flock /tmp/listeners-bench.lock .venv/bin/python -m bench.faults", shlex.join(_measuring(given))]
    ).strip()
    code = args.code or describe_code()

    def report(outcomes: list[Outcome], lab: str) -> None:
        block = render(load, outcomes, lab, command, code, started, time.monotonic() - began, settings)
        if not args.no_doc and wire:
            block = block.replace(START, WIRE_START).replace(END, WIRE_END)
            update_doc(doc, block, WIRE_START, WIRE_END, WIRE_SECTION)
        elif not args.no_doc:
            update_doc(doc, block, START, END, SECTION)
        if len(outcomes) == len(chosen):
            print(block)

    outcomes, _ = asyncio.run(run_all(chosen, settings, logs, False if args.no_netns else None, report))
    if not all(o.ok for o in outcomes):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
