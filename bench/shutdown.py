"""SIGTERM at scale: how long an instance serving N users takes to exit, whether the shutdown
watchdog had to cut it short, and, with a second instance, how long until the other one has
re-synced the stopped one's users.

For each --users N and each --instances K (1 or 2): a private redis-server, a fresh Firestore
emulator and project, N registry documents online until 2999 written before anything starts,
then K service processes (`uvicorn app.main:app`, LOG_LEVEL=INFO, the Dockerfile's
UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN=3), each with its own LISTENERS_INSTANCE_ID. The benchmark
waits until every instance serves its share by rendezvous hashing and every user has had a
first notif.sync, but at most --ready-timeout seconds: then it goes on regardless and reports
how many users were attached and synced (with the SDK source, 3,000 users on 2 cores may never
all sync: issue 13). After --idle seconds, SIGTERM to the last instance:

- SIGTERM -> exit, and from its log (seconds after the SIGTERM): the application's shutdown
  start (`service stopping`), `service stopped`, whether the watchdog cut the shutdown
  (`shutdown budget exhausted`) and every warning logged meanwhile (what was abandoned, e.g.
  `shutdown: watches left closing`);
- with K = 2: SIGTERM -> each user the stopped instance owned has a new notif.sync (from the
  survivor), the survivor's listeners_count reaches N, and the survivor's event-loop lag
  (`listeners_loop_lag_seconds`) meanwhile.

    .venv/bin/python -m bench.shutdown --users 1000,3000 --instances 1,2

The results replace the generated block of this benchmark in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis.asyncio as aioredis
from google.cloud import firestore

from bench.cluster import (
    NAN,
    Instance,
    LoopLag,
    Recorder,
    _f,
    _ints,
    _measuring,
    check_alive,
    describe_code,
    stop_all,
)
from bench.latency import percentile, report_head, update_doc
from listeners.cluster import owner
from listeners_testkit.documents import FOREVER, write_online
from listeners_testkit.processes import PROJECT_ROOT, FirestoreEmulator, RedisServer

DOC = PROJECT_ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench.shutdown:start -->", "<!-- bench.shutdown:end -->"
SECTION = "## Shutdown on SIGTERM (`bench/shutdown.py`)"
CORES = os.cpu_count() or 1
BUDGET_S = 8.0  # LISTENERS_SHUTDOWN_TIMEOUT_SECONDS's default, item 7's bound
UVICORN_DOWN = "Shutting down"  # uvicorn's loop saw the signal: it stops accepting, drains
LIFESPAN_DOWN = "Waiting for application shutdown."  # the lifespan's shutdown: the watchdog starts
STOPPING = "service stopping: handing users over, then closing listeners"
STOPPED = "service stopped"
MILESTONES = (UVICORN_DOWN, LIFESPAN_DOWN, STOPPING, STOPPED)
ATTACHED, DETACHED = "user attached", "user detached"
WATCHDOG = "shutdown budget exhausted"


def log(text: str) -> None:
    print(f"[bench.shutdown] {text}", file=sys.stderr, flush=True)


@dataclass
class Logged:
    """One line of the stopped instance's log after the SIGTERM."""

    at_s: float  # seconds after the SIGTERM
    level: str
    message: str
    extra: dict[str, Any]


@dataclass
class Stop:
    users: int
    instances: int
    ids: list[str] = field(default_factory=list)
    victim: str = ""
    want: dict[str, int] = field(default_factory=dict)  # instance -> its share by hashing
    counts: dict[str, int | None] = field(default_factory=dict)  # listeners_count at the SIGTERM
    synced: int = 0  # users with a notif.sync at the SIGTERM
    ready_s: float = NAN  # instances started -> spread and synced; NaN if the wait ran out
    waited_s: float = NAN  # instances started -> the SIGTERM's idle period began
    threads: int = 0  # the stopped instance's, at the SIGTERM
    rss_mb: float = NAN
    idle_cpu: dict[str, float] = field(default_factory=dict)  # % of a core, before the SIGTERM
    idle_machine_cpu: float = NAN  # 100 = every core
    idle_emulator_cpu: float = NAN  # % of a core
    idle_bench_cpu: float = NAN
    stop_cpu: float = NAN  # the stopped instance's CPU % from the SIGTERM to its last sample
    load_average: tuple[float, float] = (NAN, NAN)  # 1-minute, at the SIGTERM and after the exit
    stop_s: float = NAN  # SIGTERM -> the process exited
    exit_code: int | None = None
    killed: bool = False  # still running --kill-after s after the SIGTERM: SIGKILLed
    logged: list[Logged] = field(default_factory=list)
    moved: int = 0  # K = 2: users the stopped instance owned
    resynced_s: list[float] = field(default_factory=list)  # sorted: SIGTERM -> each one's new sync
    missing: int = 0  # moved users with no new sync before --handover-timeout
    count_s: float = NAN  # SIGTERM -> the survivor's listeners_count is N
    lag: LoopLag | None = None  # the survivor's loop lag, SIGTERM -> 1 s after it settled
    stall_max: tuple[float, float] = (NAN, NAN)  # the survivor's loop_stall_max before -> after
    problems_before: int = 0  # the stopped instance's warnings/errors before the SIGTERM
    attached_logged: int = 0  # its `user attached` minus `user detached` lines before the SIGTERM
    attached_after: int = 0  # its `user attached` lines after the SIGTERM
    last_attach_s: float = NAN  # the last of them, seconds after the SIGTERM
    error: str = ""

    @property
    def idle_others_cpu(self) -> float:
        """Before the SIGTERM: the machine's CPU but the instances, the emulator and the bench
        (100 = one core): other jobs on this shared machine."""
        mine = sum(self.idle_cpu.values()) + self.idle_emulator_cpu + self.idle_bench_cpu
        return self.idle_machine_cpu * CORES - mine

    def at(self, message: str) -> float:
        return next((line.at_s for line in self.logged if line.message.startswith(message)), NAN)

    @property
    def watchdog(self) -> bool:
        return any(line.message.startswith(WATCHDOG) for line in self.logged)

    @property
    def warnings(self) -> list[Logged]:
        return [line for line in self.logged if line.level in ("WARNING", "ERROR", "CRITICAL")]


# -- a run ---------------------------------------------------------------------------


async def run_stop(r: Stop, args: argparse.Namespace, logs: Path) -> None:
    uids = [f"s{i:05d}" for i in range(r.users)]
    r.ids = [f"s{r.users}-{r.instances}{chr(ord('a') + n)}" for n in range(r.instances)]
    project = f"bench-shutdown-{r.users}-{r.instances}-{uuid.uuid4().hex[:6]}"
    with RedisServer() as redis_server, FirestoreEmulator() as emulator:
        os.environ["FIRESTORE_EMULATOR_HOST"] = emulator.host  # this process's registry writes
        db = firestore.Client(project=project)
        client = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
        recorder = Recorder(client, uids)
        instances: list[Instance] = []
        try:
            await asyncio.to_thread(write_online, db, uids, heartbeat=FOREVER)
            await recorder.start()
            began = time.monotonic()
            env = {"LOG_LEVEL": "INFO", "UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN": "3", **dict(args.env)}
            for instance_id in r.ids:
                instances.append(Instance(instance_id, redis_server.port, emulator.host, project, logs, env))
            await asyncio.gather(*(asyncio.to_thread(i.service.wait_listening, 60.0) for i in instances))
            await _stop(r, args, uids, instances, emulator, recorder, began)
        finally:
            try:
                stop_all(instances)
            finally:
                await recorder.stop()
                await client.aclose()
                db.close()


async def _spread(
    r: Stop,
    instances: list[Instance],
    emulator: FirestoreEmulator,
    uids: list[str],
    recorder: Recorder,
    began: float,
    timeout: float,
) -> None:
    """Until each instance serves its share and every user has had a notif.sync, or `timeout`."""
    expected = Counter(owner(uid, tuple(sorted(r.ids))) for uid in uids)
    r.want = {i: expected.get(i, 0) for i in r.ids}
    deadline = began + timeout
    last_log = time.monotonic()
    async with httpx.AsyncClient() as http:
        while True:
            check_alive(instances, emulator)
            counts = await asyncio.gather(*(i.count(http) for i in instances))
            r.counts = dict(zip(r.ids, counts, strict=True))
            r.synced = sum(uid in recorder.syncs for uid in uids)
            if r.counts == r.want and r.synced == r.users:
                r.ready_s = time.monotonic() - began
                return
            if time.monotonic() > deadline:
                log(
                    f"not all ready after {timeout:.0f} s: counts {r.counts} (want {r.want}), "
                    f"{r.synced} synced"
                )
                return
            if time.monotonic() - last_log > 30:
                last_log = time.monotonic()
                threads = [i.ps.num_threads() for i in instances if i.alive]
                log(f"waiting: counts {r.counts}, {r.synced} of {r.users} synced, threads {threads}")
            await asyncio.sleep(0.5)


async def _stop(
    r: Stop,
    args: argparse.Namespace,
    uids: list[str],
    instances: list[Instance],
    emulator: FirestoreEmulator,
    recorder: Recorder,
    began: float,
) -> None:
    await _spread(r, instances, emulator, uids, recorder, began, args.ready_timeout)
    r.waited_s = time.monotonic() - began
    log(
        f"{r.users} users, {r.instances} instance(s): counts {r.counts}, {r.synced} synced; "
        f"idle {args.idle:g} s"
    )
    victim, survivors = instances[-1], instances[:-1]
    r.victim = victim.id
    moved = [uid for uid in uids if owner(uid, tuple(sorted(r.ids))) == victim.id] if survivors else []
    r.moved = len(moved)

    assert emulator.process is not None
    emu, me = psutil.Process(emulator.process.pid), psutil.Process()
    for process in (*(i.ps for i in instances), emu, me):
        process.cpu_percent(None)
    psutil.cpu_percent(None)
    await asyncio.sleep(args.idle)
    r.idle_cpu = {i.id: i.cpu() for i in instances}
    r.idle_emulator_cpu, r.idle_bench_cpu = emu.cpu_percent(None), me.cpu_percent(None)
    r.idle_machine_cpu = psutil.cpu_percent(None)
    with contextlib.suppress(psutil.Error):
        r.threads = victim.ps.num_threads()
        r.rss_mb = victim.ps.memory_info().rss / 2**20
    async with httpx.AsyncClient() as http:  # survivors only: nothing of ours keeps the victim open
        lag_before = await survivors[0].loop_lag(http) if survivors else None

        cpu_samples: list[tuple[float, float]] = []  # (monotonic, cpu seconds) of the victim
        r.load_average = (os.getloadavg()[0], NAN)
        wall = time.time()
        sent = time.monotonic()
        victim.service.process.send_signal(signal.SIGTERM)
        exited = asyncio.create_task(asyncio.to_thread(_wait_exit, victim, args.kill_after))
        sampling = asyncio.create_task(_sample_cpu(victim, cpu_samples))
        try:
            if survivors:
                await _handover(r, http, survivors[0], moved, recorder, sent, args.handover_timeout)
            r.killed, exit_at = await exited
            r.stop_s = exit_at - sent
        finally:
            sampling.cancel()
            await asyncio.gather(sampling, exited, return_exceptions=True)
        r.exit_code = victim.service.process.returncode
        r.load_average = (r.load_average[0], os.getloadavg()[0])
        if len(cpu_samples) >= 2:
            (t0, c0), (t1, c1) = cpu_samples[0], cpu_samples[-1]
            r.stop_cpu = 100 * (c1 - c0) / max(1e-9, t1 - t0)
        if survivors:
            await asyncio.sleep(1.0)
            after = await survivors[0].loop_lag(http)
            if after is not None and lag_before is not None:
                r.lag = after.since(lag_before)
                r.stall_max = (lag_before.stall_max, after.stall_max)
    _read_log(r, victim, wall)
    log(
        f"SIGTERM -> exit {_f(r.stop_s, 2)} s (status {r.exit_code}, killed {r.killed}), stopping at "
        f"{_f(r.at(STOPPING), 2)} s, stopped at {_f(r.at(STOPPED), 2)} s, watchdog {r.watchdog}; "
        f"{len(r.warnings)} warnings"
        + (f"; moved {r.moved}, last resync {_last(r)}, missing {r.missing}" if moved else "")
    )


def _last(r: Stop) -> str:
    return _f(r.resynced_s[-1], 2) if r.resynced_s and not r.missing else "n/a"


def _wait_exit(instance: Instance, kill_after: float) -> tuple[bool, float]:
    """Waits for the process to exit (SIGKILL after `kill_after` s): whether it had to be
    killed, and when it exited (time.monotonic)."""
    process = instance.service.process
    try:
        process.wait(kill_after)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return True, time.monotonic()
    return False, time.monotonic()


async def _sample_cpu(instance: Instance, samples: list[tuple[float, float]]) -> None:
    while True:
        with contextlib.suppress(psutil.Error):
            times = instance.ps.cpu_times()
            samples.append((time.monotonic(), times.user + times.system))
        await asyncio.sleep(0.2)


async def _handover(
    r: Stop,
    http: httpx.AsyncClient,
    survivor: Instance,
    moved: list[str],
    recorder: Recorder,
    sent: float,
    timeout: float,
) -> None:
    """Until every moved user has a notif.sync after the SIGTERM and the survivor serves all."""

    def resynced() -> bool:
        return all(recorder.synced_after(uid, sent) is not None for uid in moved)

    deadline = sent + timeout
    while time.monotonic() < deadline:
        if math.isnan(r.count_s) and await survivor.count(http) == r.users:
            r.count_s = time.monotonic() - sent
        if resynced() and not math.isnan(r.count_s):
            break
        await recorder.wait(resynced, 0.1)
    for uid in moved:
        at = recorder.synced_after(uid, sent)
        if at is None:
            r.missing += 1
        else:
            r.resynced_s.append(at - sent)
    r.resynced_s.sort()


def _log_lines(instance: Instance) -> list[tuple[float, dict[str, Any]]]:
    """The instance's JSON log lines with their time (seconds since the epoch)."""
    lines = []
    for line in instance.log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
            lines.append((datetime.fromisoformat(entry["time"]).timestamp(), entry))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return lines


def _read_log(r: Stop, instance: Instance, since_wall: float) -> None:
    """From the stopped instance's log, after `since_wall` (the SIGTERM, time.time()): every
    line of level WARNING or above, uvicorn's and the service's shutdown milestones, and the
    users it still attached; before it, the warnings, and the users attached then."""
    for at, entry in _log_lines(instance):
        message, level = str(entry.get("message", "")), str(entry.get("level", ""))
        if at < since_wall:
            r.problems_before += level in ("WARNING", "ERROR", "CRITICAL")
            r.attached_logged += (message == ATTACHED) - (message == DETACHED)
        elif message == ATTACHED:
            r.attached_after += 1
            r.last_attach_s = at - since_wall
        elif level in ("WARNING", "ERROR", "CRITICAL") or message.startswith(MILESTONES):
            extra = {k: v for k, v in entry.items() if k not in ("time", "level", "logger", "message")}
            r.logged.append(Logged(at - since_wall, level, message, extra))


# -- the report ----------------------------------------------------------------------


def _warned(r: Stop) -> str:
    """The warnings after the SIGTERM, each once with its first time and its extras."""
    seen: dict[str, tuple[float, int, dict[str, Any]]] = {}
    for line in r.warnings:
        at, n, extra = seen.get(line.message, (line.at_s, 0, line.extra))
        seen[line.message] = (at, n + 1, extra)
    parts = []
    for message, (at, n, extra) in seen.items():
        shown = ", ".join(f"{k}={json.dumps(v)[:80]}" for k, v in extra.items())
        parts.append(
            f"{_f(at, 2)} s `{message[:100]}`"
            + (f" ({shown})" if shown else "")
            + (f" x{n}" if n > 1 else "")
        )
    return "; ".join(parts) or "none"


def render(
    runs: list[Stop], args: argparse.Namespace, command: str, code: str, started: datetime, elapsed: float
) -> str:
    lines = [
        START,
        *report_head(command, code, started, elapsed),
        f"SIGTERM to the last instance after at most {args.ready_timeout:g} s of waiting for every user "
        f"to be attached and synced, then {args.idle:g} s idle. At the SIGTERM: *attached*: the stopped "
        "instance's `/healthz` listeners_count (*log*: it did not answer within 5 s; its `user attached` "
        "minus `user detached` lines instead); *synced*: users (of all) with a first `notif.sync` at the "
        "subscriber; *ready s*: until every user was attached and synced (n/a: the wait ran out); "
        "*threads*, *RSS*, *idle CPU*: the stopped instance's (100 = one core); *others CPU*: the "
        f"machine's CPU but the instances, the emulator and the bench (of {100 * CORES}: other jobs); "
        "*load*: 1-minute load average. Seconds after the SIGTERM, from the stopped instance's log: "
        f"*signal seen*: uvicorn's `{UVICORN_DOWN}` (its loop saw the signal; it stops accepting and "
        f"drains connections); *lifespan*: `{LIFESPAN_DOWN}`, where the application's shutdown, and the "
        f"watchdog's budget, start; *stopping*, *stopped*: `service stopping` and `service stopped`; "
        f"*exit*: the process exited (measured by the bench); *watchdog*: `{WATCHDOG}` logged; "
        "*attaches after*: `user attached` lines after the SIGTERM (the last one's time). The budget "
        f"(`LISTENERS_SHUTDOWN_TIMEOUT_SECONDS`) is {BUDGET_S:g} s. An exit status of -15 is uvicorn's "
        "own after a complete shutdown (it re-raises the SIGTERM); the watchdog exits with 75.",
        "",
        "| users | instances | users per instance | attached | synced | ready s | threads | RSS MB "
        "| idle CPU % | others CPU % | load | signal seen s | lifespan s | stopping s | stopped s | exit s "
        "| exit status | watchdog | attaches after |",
        "|" + "---:|" * 16 + "---|---|---:|",
    ]
    for r in runs:
        per = " / ".join(str(r.want.get(i, "?")) for i in r.ids)
        count = r.counts.get(r.victim)
        attached = str(count) if count is not None else f"{r.attached_logged} (log)"
        after = f"{r.attached_after}" + (f" (to {_f(r.last_attach_s, 1)} s)" if r.attached_after else "")
        lines.append(
            f"| {r.users} | {r.instances} | {per} | {attached} | {r.synced} | {_f(r.ready_s, 1)} "
            f"| {r.threads} | {_f(r.rss_mb)} | {_f(r.idle_cpu.get(r.victim, NAN))} | {_f(r.idle_others_cpu)} "
            f"| {_f(r.load_average[0])} | {_f(r.at(UVICORN_DOWN), 2)} | {_f(r.at(LIFESPAN_DOWN), 2)} "
            f"| {_f(r.at(STOPPING), 2)} | {_f(r.at(STOPPED), 2)} | {_f(r.stop_s, 2)} "
            f"| {r.exit_code}{' (SIGKILLed)' if r.killed else ''} | {'**cut**' if r.watchdog else 'no'} "
            f"| {after} |"
        )
    handovers = [r for r in runs if r.instances > 1]
    if handovers:
        lines += [
            "",
            "With 2 instances, the stopped one's users re-synced by the survivor, in seconds after the "
            "SIGTERM: *new sync*: each moved user's first `notif.sync` after it; *count*: the survivor's "
            "listeners_count reached the users; *lag*: the survivor's `listeners_loop_lag_seconds` "
            "observations above 50 and 100 ms, from the SIGTERM to 1 s after the handover settled, of all.",
            "",
            "| users | moved | first new sync s | p50 s | p99 s | last new sync s | missing "
            "| count = users s | lag > 50 ms | lag > 100 ms | worst lag ≤ s |",
            "|" + "---:|" * 11,
        ]
        for r in handovers:
            lag = r.lag
            lines.append(
                f"| {r.users} | {r.moved} | {_f(r.resynced_s[0] if r.resynced_s else NAN, 2)} "
                f"| {_f(percentile(r.resynced_s, 50), 2)} | {_f(percentile(r.resynced_s, 99), 2)} "
                f"| {_last(r)} "
                f"| {r.missing} | {_f(r.count_s, 2)} "
                + (
                    f"| {lag.over(0.05)} of {lag.count} | {lag.over(0.1)} of {lag.count} "
                    f"| {_f(lag.worst, 3)} |"
                    if lag is not None
                    else "| n/a | n/a | n/a |"
                )
            )
    lines += ["", "Per run (what the stopped instance logged after the SIGTERM, at WARNING and above):"]
    for r in runs:
        cpu = " / ".join(_f(r.idle_cpu.get(i, NAN)) for i in r.ids)
        lines.append(
            f"- {r.users} users, {r.instances} instance{'s' if r.instances > 1 else ''} ({', '.join(r.ids)}; "
            f"stopped {r.victim}): "
            + (f"**FAILED: {r.error}**; " if r.error else "")
            + f"counts at the SIGTERM {r.counts} (shares {r.want}); waited {_f(r.waited_s, 1)} s; "
            f"CPU % over the {args.idle:g} s before the SIGTERM: per instance {cpu}, emulator "
            f"{_f(r.idle_emulator_cpu)}, bench {_f(r.idle_bench_cpu)}, everything else "
            f"{_f(r.idle_others_cpu)} (of {100 * CORES}); the stopped one's CPU % from the SIGTERM to its "
            f"exit {_f(r.stop_cpu)}; load average {_f(r.load_average[0], 1)} -> {_f(r.load_average[1], 1)}; "
            f"warnings/errors before the SIGTERM {r.problems_before}; after it: {_warned(r)}"
            + (
                f"; survivor's `listeners_loop_stall_max_seconds` {_f(r.stall_max[0], 3)} -> "
                f"{_f(r.stall_max[1], 3)}"
                if r.instances > 1
                else ""
            )
        )
    lines.append(END)
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------


async def run(args: argparse.Namespace, logs: Path) -> list[Stop]:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)  # unwinds every finally
    runs: list[Stop] = []
    for users in args.users:
        for k in args.instances:
            r = Stop(users, k)
            runs.append(r)
            log(f"{users} users, {k} instance(s) ...")
            try:
                await run_stop(r, args, logs)
            except Exception as exc:  # reported; the next one still runs
                r.error = f"{type(exc).__name__}: {exc}"
                log(f"FAILED: {r.error}")
    return runs


def _env(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("expected NAME=VALUE")
    return name, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.shutdown", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--users", type=_ints, default=[1000, 3000])
    parser.add_argument("--instances", type=_ints, default=[1, 2], help="1 and/or 2")
    parser.add_argument("--ready-timeout", type=float, default=240.0, help="then SIGTERM anyway")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds before the SIGTERM")
    parser.add_argument("--handover-timeout", type=float, default=120.0)
    parser.add_argument("--kill-after", type=float, default=60.0, help="SIGKILL if still running")
    parser.add_argument("--env", type=_env, action="append", default=[], help="NAME=VALUE for the instances")
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file to update")
    parser.add_argument("--no-doc", action="store_true", help="print the results only")
    parser.add_argument("--code", help="what code was measured (default: from git)")
    args = parser.parse_args(argv)
    if any(k not in (1, 2) for k in args.instances):
        parser.error("--instances: 1 and/or 2")
    logs = Path(tempfile.mkdtemp(prefix="listeners-bench-shutdown-"))
    log(f"instance logs in {logs}")
    started, began = datetime.now(UTC), time.monotonic()
    try:
        runs = asyncio.run(run(args, logs))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted; every process it started is stopped")
        raise SystemExit(130) from None
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join([".venv/bin/python -m bench.shutdown", shlex.join(_measuring(given))]).strip()
    block = render(runs, args, command, args.code or describe_code(), started, time.monotonic() - began)
    print(block)
    if not args.no_doc:
        update_doc(args.doc, block, START, END, SECTION)


if __name__ == "__main__":
    main()
