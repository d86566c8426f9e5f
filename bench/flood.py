"""Hostile traffic against one instance: do signed-in users still get their events? (issue 28)

    flock /tmp/listeners-bench.lock .venv/bin/python -m bench.flood --sockets 2000 --stalled 500

One run: a private redis-server, the Firestore emulator, a local token issuer and one
service (`uvicorn app.main:app`, one worker, `UVICORN_WS` and `UVICORN_HTTP` as in the image,
the production defaults otherwise), pinned to one core with `sched_setaffinity` (taskset) while this process,
Redis and the attacker share the others (when the machine has at least two). `--users`
signed-in sockets receive `notif.add` events published at `--rate` per second; each carries
its publish time (CLOCK_MONOTONIC), taken back when the client has parsed it. A probe opens a
new connection for `GET /healthz` every 100 ms, as the ALB's health check does.

First `--duration` seconds without attack (the baseline), then the attacker, a process of its
own: `--sockets` loops that each open a WebSocket upgrade with no token and reconnect at once
whatever the answer (a 101 is held until the server closes it), and `--stalled` connections
that send half an HTTP request and stall (reopened if closed). After `--warmup` seconds of
attack, the same measurement for `--duration` seconds. Reported side by side: the signed-in
users' latency percentiles, events lost, signed-in sockets dropped, /healthz latency, the
service's RSS and CPU; and the attacker's answers by status with the service's
`listeners_ws_refusals_total`. The table replaces the generated block of docs/benchmarks.md
(`--no-doc`: printed only).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.websocket import Envelopes, Tree, percentile, raise_fd_limit, read_line, wait_ready

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
START, END = "<!-- bench.flood:start -->", "<!-- bench.flood:end -->"
DIRECT_PROTOCOL = "listeners.deliver.wsprotocol:DirectWebSocketProtocol"
GUARDED_HTTP = "listeners.deliver.httpprotocol:GuardedHttpProtocol"
TICK = 0.01
HEALTH_EVERY = 0.1
BASELINE, ATTACK = 1, 2


# -- the attacker (its own process) --------------------------------------------------------


async def upgrade_loop(port: int, end: float, answers: Counter[str]) -> None:
    request_head = (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate\r\n"
    )
    while time.monotonic() < end:
        writer = None
        try:
            async with asyncio.timeout(max(0.1, end - time.monotonic())):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                key = base64.b64encode(os.urandom(16)).decode()
                writer.write(f"{request_head}Sec-WebSocket-Key: {key}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                status = head.split(b" ", 2)[1].decode()
                answers[status] += 1
                if status == "101":  # held until the server lets go
                    while await reader.read(65536):
                        pass
        except TimeoutError:
            break
        except (OSError, asyncio.IncompleteReadError, IndexError):
            answers["error"] += 1
            await asyncio.sleep(0.01)
        finally:
            if writer is not None:
                writer.close()


async def stalled_loop(port: int, end: float, counts: Counter[str]) -> None:
    while time.monotonic() < end:
        writer = None
        try:
            async with asyncio.timeout(max(0.1, end - time.monotonic())):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ")
                counts["stalled opened"] += 1
                while await reader.read(65536):
                    pass
            counts["stalled closed by the server"] += 1
        except TimeoutError:
            break
        except OSError:
            counts["stalled error"] += 1
            await asyncio.sleep(0.1)
        finally:
            if writer is not None:
                writer.close()


async def attacker_main() -> None:
    config = json.loads(sys.stdin.readline())
    port, seconds = int(config["port"]), float(config["seconds"])
    end = time.monotonic() + seconds
    answers: Counter[str] = Counter()
    stalled: Counter[str] = Counter()
    tasks = [asyncio.create_task(stalled_loop(port, end, stalled)) for _ in range(config["stalled"])]
    tasks += [asyncio.create_task(upgrade_loop(port, end, answers)) for _ in range(config["sockets"])]
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"answers": answers, "stalled": stalled, "seconds": seconds}), flush=True)


# -- the measurement -----------------------------------------------------------------------


@dataclass
class Phase:
    latencies_ms: list[float] = field(default_factory=list)
    sent: int = 0
    received: int = 0
    health_ms: list[float] = field(default_factory=list)
    health_failed: int = 0
    rss_mb: float = 0.0
    cpu: float = 0.0
    service_core_busy: float = 0.0  # every process's, not only the service's
    other_cores_busy: float = 0.0
    attacker_cpu: float = 0.0


@dataclass
class Run:
    phases: dict[int, Phase] = field(default_factory=lambda: {BASELINE: Phase(), ATTACK: Phase()})
    dropped: int = 0
    attacker: dict[str, Any] = field(default_factory=dict)
    refusals: dict[str, float] = field(default_factory=dict)
    cores: str = ""
    rss_idle_mb: float = 0.0
    service_cores: set[int] = field(default_factory=set)
    other_cores: set[int] = field(default_factory=set)


async def signed_in(url: str, token: str, run: Run, dropped: list[str]) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed
    from websockets.typing import Subprotocol

    ws = await connect(url, subprotocols=[Subprotocol("bearer"), Subprotocol(token)], open_timeout=60)
    try:
        async for text in ws:
            now = time.monotonic()
            payload = json.loads(text).get("payload")
            if isinstance(payload, dict) and "bench_sent" in payload:
                phase = run.phases.get(int(payload["bench_phase"]))
                if phase is not None:
                    phase.received += 1
                    phase.latencies_ms.append((now - float(payload["bench_sent"])) * 1000)
    except ConnectionClosed as exc:
        dropped.append(str(exc.rcvd.code if exc.rcvd else 1006))
    except asyncio.CancelledError:
        await ws.close()
        raise


async def probe_health(port: int, run: Run, current: list[int]) -> None:
    while True:
        started = time.monotonic()
        phase = run.phases.get(current[0])
        try:
            async with asyncio.timeout(10):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                status = (await reader.readline()).split(b" ")[1]
                await reader.read()
                writer.close()
            if phase is not None:
                if status == b"200":
                    phase.health_ms.append((time.monotonic() - started) * 1000)
                else:
                    phase.health_failed += 1
        except (OSError, TimeoutError, IndexError):
            if phase is not None:
                phase.health_failed += 1
        await asyncio.sleep(max(0.0, started + HEALTH_EVERY - time.monotonic()))


async def publish(redis: Any, uids: list[str], rate: int, seconds: float, phase: int, run: Run) -> None:
    envelopes = Envelopes()
    start = time.monotonic()
    owed, n = 0.0, 0
    for tick in range(int(seconds / TICK)):
        await asyncio.sleep(max(0.0, start + tick * TICK - time.monotonic()))
        owed += rate * TICK
        sent = time.monotonic()
        pipe = redis.pipeline(transaction=False)
        while owed >= 1:
            uid = uids[n % len(uids)]
            pipe.publish(f"user:{uid}", envelopes(uid, n, phase, sent))
            if phase in run.phases:
                run.phases[phase].sent += 1
            n += 1
            owed -= 1
        await pipe.execute()


async def refusals(port: int) -> dict[str, float]:
    import httpx

    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics", timeout=30)).text
    found = re.findall(r'^listeners_ws_refusals_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    return {reason: float(value) for reason, value in found}


def core_times() -> dict[int, tuple[int, int]]:
    """Each core's (busy, total) clock ticks since boot (/proc/stat): busy is all but idle and iowait."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(f) for f in fields[:8]]
            times[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return times


def busy_percent(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cores: set[int]
) -> float:
    busy = sum(after[c][0] - before[c][0] for c in cores)
    total = sum(after[c][1] - before[c][1] for c in cores)
    return busy / total * 100 * len(cores) if total else 0.0


def pin(pids: list[int], cores: set[int]) -> None:
    """As `taskset -a -p`: every thread of each process (new threads inherit it)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cores)


async def measure(args: argparse.Namespace, workdir: Path) -> Run:
    import redis.asyncio as aioredis

    from listeners_testkit.auth import LocalIssuer
    from listeners_testkit.processes import (
        PROJECT_ROOT,
        FirestoreEmulator,
        RedisServer,
        ServiceProcess,
        free_port,
    )

    run = Run()
    project = f"bench-flood-{uuid.uuid4().hex[:6]}"
    uids = [f"user{i:03d}" for i in range(args.users)]
    cores = sorted(os.sched_getaffinity(0))
    service_cores, other_cores = ({cores[0]}, set(cores[1:])) if len(cores) >= 2 else (set(cores), set(cores))
    run.service_cores, run.other_cores = service_cores, other_cores
    run.cores = (
        f"service on core {sorted(service_cores)}, attacker, clients and Redis on {sorted(other_cores)}"
        if len(cores) >= 2
        else "one core: not pinned"
    )
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        emulator = stack.enter_context(FirestoreEmulator())
        issuer = LocalIssuer(project)
        certs_url = issuer.serve()
        stack.callback(issuer.close)
        port = free_port()
        env = {
            **{
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("LISTENERS_", "FIREBASE_", "UVICORN_"))
            },
            "LISTENERS_REDIS_HOST": "127.0.0.1",
            "LISTENERS_REDIS_PORT": str(redis_server.port),
            "FIRESTORE_EMULATOR_HOST": emulator.host,
            "FIREBASE_PROJECT_ID": project,
            "LISTENERS_TOKEN_CERTS_URL": certs_url,
            "LOG_LEVEL": "WARNING",
            "WEB_CONCURRENCY": "1",
            "UVICORN_WS": DIRECT_PROTOCOL,
            "UVICORN_HTTP": GUARDED_HTTP,
        }
        log_path = workdir / "service.log"
        service = ServiceProcess(env, port=port, log_path=log_path)
        attacker: subprocess.Popen[str] | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            await asyncio.to_thread(service.wait_listening)
            await wait_ready(port, 90)
            assert redis_server.process is not None
            pin([service.pid], service_cores)
            emulator_pid = getattr(getattr(emulator, "process", None), "pid", None)
            others = [os.getpid(), redis_server.process.pid, *([emulator_pid] if emulator_pid else [])]
            pin(others, other_cores)
            tree = Tree(service.pid)
            url = f"ws://127.0.0.1:{port}/ws"
            dropped: list[str] = []
            tasks += [
                asyncio.create_task(signed_in(url, issuer.mint(uid, lifetime=7200), run, dropped))
                for uid in uids
            ]
            await asyncio.sleep(3)
            run.rss_idle_mb = tree.rss_mb()
            current = [0]
            tasks.append(asyncio.create_task(probe_health(port, run, current)))
            redis = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
            try:
                await publish(redis, uids, args.rate, 2, 0, run)  # warm-up, not counted
                for phase in (BASELINE, ATTACK):
                    if phase == ATTACK:
                        attacker = subprocess.Popen(
                            [sys.executable, "-m", "bench.flood", "--as-attacker"],
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE,
                            text=True,
                            cwd=PROJECT_ROOT,
                        )
                        seconds = args.warmup + args.duration + 1
                        config = {
                            "port": port,
                            "sockets": args.sockets,
                            "stalled": args.stalled,
                            "seconds": seconds,
                        }
                        assert attacker.stdin is not None
                        attacker.stdin.write(json.dumps(config) + "\n")
                        attacker.stdin.flush()
                        await publish(redis, uids, args.rate, args.warmup, 0, run)
                    cpu0, t0, cores0 = tree.cpu_seconds(), time.monotonic(), core_times()
                    attacker_tree = Tree(attacker.pid) if attacker is not None else None
                    attacker_cpu0 = attacker_tree.cpu_seconds() if attacker_tree is not None else 0.0
                    current[0] = phase
                    rss_task = asyncio.create_task(sample_rss(tree, run.phases[phase]))
                    await publish(redis, uids, args.rate, args.duration, phase, run)
                    current[0] = 0
                    rss_task.cancel()
                    elapsed, cores1 = time.monotonic() - t0, core_times()
                    measured = run.phases[phase]
                    measured.cpu = (tree.cpu_seconds() - cpu0) / elapsed * 100
                    if attacker_tree is not None:
                        measured.attacker_cpu = (attacker_tree.cpu_seconds() - attacker_cpu0) / elapsed * 100
                    measured.service_core_busy = busy_percent(cores0, cores1, service_cores)
                    measured.other_cores_busy = busy_percent(cores0, cores1, other_cores)
                    await asyncio.sleep(2)  # the last events arrive
                if attacker is not None:
                    run.attacker = await read_line(attacker, args.warmup + args.duration + 120)
                run.refusals = await refusals(port)
            finally:
                await redis.aclose()
            run.dropped = len(dropped)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if attacker is not None:
                try:
                    attacker.wait(60)
                except subprocess.TimeoutExpired:
                    attacker.kill()
            service.stop()
    return run


async def sample_rss(tree: Tree, phase: Phase) -> None:
    while True:
        phase.rss_mb = max(phase.rss_mb, tree.rss_mb())
        await asyncio.sleep(0.5)


def report(run: Run, args: argparse.Namespace, started: datetime) -> str:
    base, hit = run.phases[BASELINE], run.phases[ATTACK]

    def lat(p: Phase, q: float) -> str:
        return f"{percentile(sorted(p.latencies_ms), q):.1f}" if p.latencies_ms else "-"

    def health(p: Phase, q: float) -> str:
        return f"{percentile(sorted(p.health_ms), q):.1f}" if p.health_ms else "-"

    rows = [
        ("signed-in p50 publish→client, ms", lat(base, 50), lat(hit, 50)),
        ("signed-in p99, ms", lat(base, 99), lat(hit, 99)),
        ("signed-in max, ms", lat(base, 100), lat(hit, 100)),
        (
            "events sent / lost",
            f"{base.sent} / {base.sent - base.received}",
            f"{hit.sent} / {hit.sent - hit.received}",
        ),
        (
            "/healthz p50 / worst, ms",
            f"{health(base, 50)} / {health(base, 100)}",
            f"{health(hit, 50)} / {health(hit, 100)}",
        ),
        ("/healthz failed", str(base.health_failed), str(hit.health_failed)),
        ("service RSS (max), MiB", f"{base.rss_mb:.0f}", f"{hit.rss_mb:.0f}"),
        ("service CPU, % of a core", f"{base.cpu:.0f}", f"{hit.cpu:.0f}"),
        ("attacker CPU, % of a core", "-", f"{hit.attacker_cpu:.0f}"),
        (
            f"busy: service's core {sorted(run.service_cores)} / the others, % (every process)",
            f"{base.service_core_busy:.0f} / {base.other_cores_busy:.0f}",
            f"{hit.service_core_busy:.0f} / {hit.other_cores_busy:.0f}",
        ),
    ]
    answers = run.attacker.get("answers", {})
    attempts = sum(v for k, v in answers.items() if k != "error")
    seconds = float(run.attacker.get("seconds", 0))
    lines = [
        f"Run {started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs; {run.cores}.",
        "",
        f"    flock /tmp/listeners-bench.lock .venv/bin/python -m bench.flood --users {args.users} "
        f"--rate {args.rate} --sockets {args.sockets} --stalled {args.stalled} "
        f"--warmup {args.warmup:g} --duration {args.duration:g}",
        "",
        "| | no attack | under attack |",
        "|---|---|---|",
        *(f"| {name} | {a} | {b} |" for name, a, b in rows),
        "",
        f"Signed-in sockets dropped: {run.dropped} of {args.users}. Attacker ({args.sockets} reconnecting "
        f"upgrades with no token, {args.stalled} stalled requests, one address): {attempts} answers in "
        f"{seconds:g} s ({attempts / max(1.0, seconds):.0f}/s), "
        "by status: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(answers.items()))
        + "; refused before the upgrade, by reason (`listeners_ws_refusals_total`): "
        + (", ".join(f"{k}: {v:.0f}" for k, v in sorted(run.refusals.items())) or "none")
        + "; stalled: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(run.attacker.get("stalled", {}).items()))
        + ".",
    ]
    return "\n".join(lines)


def write_doc(block: str) -> None:
    text = DOC.read_text() if DOC.exists() else ""
    generated = f"{START}\n{block}\n{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + generated + text[text.index(END) + len(END) :]
    else:
        text = (
            text.rstrip("\n") + "\n\n## Hostile traffic (`bench/flood.py`, issue 28)\n\n" + generated + "\n"
        )
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--as-attacker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--users", type=int, default=20, help="signed-in sockets")
    parser.add_argument("--rate", type=int, default=200, help="events per second to them, in all")
    parser.add_argument("--sockets", type=int, default=2000, help="attacker's reconnecting upgrades")
    parser.add_argument("--stalled", type=int, default=500, help="attacker's stalled requests")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of attack before measuring")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per phase")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    if args.as_attacker:
        raise_fd_limit()
        asyncio.run(attacker_main())
        return
    raise_fd_limit()
    started = datetime.now(UTC)
    with contextlib.ExitStack() as stack:
        import tempfile

        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-flood-")))
        run = asyncio.run(measure(args, workdir))
    block = report(run, args, started)
    print(block)
    if not args.no_doc:
        write_doc(block)


if __name__ == "__main__":
    main()
