"""Many concurrent WebSocket clients on one service instance: delivery latency, memory, CPU.

    .venv/bin/python -m bench.websocket --clients 1000 --rate 500 --duration 30

Starts a private redis-server, the Firestore emulator, a local token issuer (its certificate
URL is the service's LISTENERS_TOKEN_CERTS_URL) and one service process, `uvicorn
app.main:app`. Client processes (`--client-processes`, default 2) open `--clients` sockets,
one user each, with a token in `Sec-WebSocket-Protocol: bearer, <token>`, and wait for
`auth.ok`. Then this process publishes `notif.add` envelopes, the size of real ones, straight
to the users' Redis channels `user:{uid}` at `--rate` per second, round-robin over the users;
each carries the CLOCK_MONOTONIC time just before its PUBLISH (shared by every process on
Linux), and a client takes the latency when it has parsed the frame: publish -> Redis -> the
service's hub -> the socket's queue -> the WebSocket -> the client. Memory per connection is
the service's RSS with every socket open less its RSS with none (after one warm-up socket),
in the same run. CPU is that of each process over the measured window (100 = one core).

The results replace the generated block of docs/benchmarks-websocket.md for that variant
(with or without `--no-deflate`); `--no-doc` prints only.
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
from typing import IO, Any

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks-websocket.md"


def markers(deflate: bool) -> tuple[str, str]:
    """One generated block per variant: with permessage-deflate (browsers) and without."""
    name = "bench.websocket" if deflate else "bench.websocket.no-deflate"
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


# -- the client processes ------------------------------------------------------------


@dataclass
class ClientState:
    ready: int = 0
    failed: int = 0
    closed: Counter[int] = field(default_factory=Counter)  # close code -> sockets closed under load
    received: Counter[int] = field(default_factory=Counter)  # phase -> events received
    latencies_ms: list[float] = field(default_factory=list)  # measured phase only
    errors: list[str] = field(default_factory=list)


def emit(stream: IO[str], data: dict[str, Any]) -> None:
    stream.write(json.dumps(data) + "\n")
    stream.flush()


async def hold(
    url: str, token: str, deflate: bool, state: ClientState, handshakes: asyncio.Semaphore
) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed
    from websockets.typing import Subprotocol

    authenticated = False
    try:
        async with handshakes:
            ws = await connect(
                url,
                subprotocols=[Subprotocol("bearer"), Subprotocol(token)],
                compression="deflate" if deflate else None,
                ping_interval=None,  # the server pings (uvicorn, every 20 s)
                open_timeout=120,
                max_queue=None,
            )
            first = json.loads(await ws.recv())
            if first.get("type") != "auth.ok":
                raise RuntimeError(f"first message {first.get('type')!r}")
            authenticated = True
            state.ready += 1
        async with ws:
            async for text in ws:
                now = time.monotonic()
                payload = json.loads(text).get("payload")
                if isinstance(payload, dict) and "bench_sent" in payload:
                    phase = int(payload["bench_phase"])
                    state.received[phase] += 1
                    if phase == 1:
                        state.latencies_ms.append((now - float(payload["bench_sent"])) * 1000)
    except asyncio.CancelledError:
        raise
    except ConnectionClosed as exc:
        if authenticated:
            state.closed[exc.rcvd.code if exc.rcvd else 1006] += 1
        else:
            state.failed += 1
            state.errors.append(f"closed before auth.ok: {exc}")
    except Exception as exc:
        if not authenticated:
            state.failed += 1
        state.errors.append(f"{type(exc).__name__}: {exc}"[:200])


async def client_main() -> None:
    """One client process: reads its sockets from stdin, reports on stdout."""
    config = json.loads(await asyncio.to_thread(sys.stdin.readline))
    state = ClientState()
    handshakes = asyncio.Semaphore(config["handshakes"])
    tokens: list[str] = config["tokens"]
    began = time.monotonic()
    tasks = [
        asyncio.create_task(hold(config["url"], token, config["deflate"], state, handshakes))
        for token in tokens
    ]
    while state.ready + state.failed < len(tokens) and time.monotonic() - began < 180:
        await asyncio.sleep(0.05)
    emit(sys.stdout, {"ready": state.ready, "failed": state.failed, "connect_s": time.monotonic() - began})
    await asyncio.to_thread(sys.stdin.readline)  # "stop"
    open_sockets = sum(not t.done() for t in tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    cpu = os.times()
    emit(
        sys.stdout,
        {
            "open": open_sockets,
            "closed": dict(state.closed),
            "received": dict(state.received),
            "latencies_ms": state.latencies_ms,
            "errors": state.errors[:10],
            "cpu_s": cpu.user + cpu.system,
        },
    )


# -- the benchmark ---------------------------------------------------------------------


@dataclass
class Result:
    args: argparse.Namespace
    ready: int = 0
    failed: int = 0
    connect_s: float = float("nan")
    rss_base_mb: float = float("nan")
    rss_open_mb: float = float("nan")
    rss_load_mb: float = float("nan")
    fds_open: int = 0
    threads: int = 0
    idle_cpu: float = float("nan")
    cpu: float = float("nan")
    clients_cpu: list[float] = field(default_factory=list)
    redis_cpu: float = float("nan")
    bench_cpu: float = float("nan")
    machine_cpu: float = float("nan")
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    sent: Counter[int] = field(default_factory=Counter)
    rate: float = float("nan")
    received: Counter[int] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    still_open: int = 0
    closed: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    stop_s: float = float("nan")
    seconds: float = float("nan")

    @property
    def others_cpu(self) -> float:
        """CPU % (100 = one core) of everything else on the machine: the emulator, the kernel,
        and whatever other work shares it."""
        ours = self.cpu + self.redis_cpu + self.bench_cpu + sum(self.clients_cpu)
        return self.machine_cpu * (os.cpu_count() or 1) - ours

    @property
    def per_connection_kib(self) -> float:
        return (self.rss_open_mb - self.rss_base_mb) * 1024 / max(1, self.ready)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values; NaN when there are none."""
    if not values:
        return float("nan")
    return values[max(0, min(len(values), math.ceil(q / 100 * len(values))) - 1)]


def envelope(uid: str, n: int, phase: int) -> bytes:
    """A `notif.add` as the service publishes it, plus the send time and the phase."""
    from listeners.envelope import Envelope

    doc_id = f"job-{n:07d}"
    item = {
        "doc_id": doc_id,
        "job_id": doc_id,
        "file_id": f"file-{n:07d}",
        "file_name": f"invoice-{n:07d}.pdf",
        "status": "completed",
        "collection_id": "acme",
        "collection_name": "Acme Corporation",
        "function_name": "APbookeeper",
        "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "read": False,
        "additional_info": json.dumps({"message": "Invoice booked", "amount": "1234.50", "currency": "EUR"}),
        "info_message": "Invoice booked",
        "message": f"invoice-{n:07d}.pdf - completed",
        "url": f"/edit_form/{doc_id}",
        "bench_phase": phase,
        "bench_sent": time.monotonic(),
    }
    return Envelope.create("notif.add", uid, item).to_json()


async def wait_ready(port: int, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/healthz", timeout=5)).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"/healthz did not answer 200 within {timeout}s")


async def read_line(process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout)
    if not line:
        raise RuntimeError(f"a client process exited (status {process.poll()})")
    data: dict[str, Any] = json.loads(line)
    return data


async def one_socket(url: str, token: str) -> None:
    """A socket opened and closed before the baseline, so lazy imports count there."""
    from websockets.asyncio.client import connect
    from websockets.typing import Subprotocol

    async with connect(url, subprotocols=[Subprotocol("bearer"), Subprotocol(token)]) as ws:
        await ws.recv()


async def run(r: Result, workdir: Path) -> None:
    import psutil
    import redis.asyncio as aioredis

    from listeners.local.auth import LocalIssuer
    from listeners.local.processes import (
        PROJECT_ROOT,
        FirestoreEmulator,
        RedisServer,
        ServiceProcess,
        free_port,
    )

    args = r.args
    project = f"bench-ws-{uuid.uuid4().hex[:6]}"
    uids = [f"ws{i:05d}" for i in range(args.clients)]
    r.load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        emulator = stack.enter_context(FirestoreEmulator())
        issuer = LocalIssuer(project)
        certs_url = issuer.serve()
        stack.callback(issuer.close)
        args.port = free_port()
        env = {
            **{
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("LISTENERS_", "FIREBASE_", "GOOGLE_"))
            },
            "LISTENERS_REDIS_HOST": "127.0.0.1",
            "LISTENERS_REDIS_PORT": str(redis_server.port),
            "FIRESTORE_EMULATOR_HOST": emulator.host,
            "FIREBASE_PROJECT_ID": project,
            "LISTENERS_INSTANCE_ID": "bench-ws",
            "LISTENERS_TOKEN_CERTS_URL": certs_url,
            "LISTENERS_WS_MAX_SOCKETS": str(args.clients + 100),
            # As in production: each new socket asks for a resync over the control channel.
            "LISTENERS_CONTROL_TOKEN": uuid.uuid4().hex,
            "LOG_LEVEL": "WARNING",
        }
        log_path = workdir / "service.log"
        service = ServiceProcess(env, port=args.port, log_path=log_path)
        ps = psutil.Process(service.pid)
        assert redis_server.process is not None
        redis_ps = psutil.Process(redis_server.process.pid)
        clients: list[subprocess.Popen[str]] = []
        try:
            await asyncio.to_thread(service.wait_listening)
            await wait_ready(args.port, 60)
            url = f"ws://127.0.0.1:{args.port}/ws"
            await one_socket(url, issuer.mint("warm-up"))
            await asyncio.sleep(3)
            r.rss_base_mb = ps.memory_info().rss / 2**20

            tokens = [issuer.mint(uid, lifetime=3600) for uid in uids]
            shares = [tokens[i :: args.client_processes] for i in range(args.client_processes)]
            began = time.monotonic()
            for share in shares:
                process = subprocess.Popen(
                    [sys.executable, "-m", "bench.websocket", "--as-client"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=PROJECT_ROOT,
                )
                clients.append(process)
                assert process.stdin is not None
                config = {"url": url, "tokens": share, "handshakes": args.handshakes, "deflate": args.deflate}
                process.stdin.write(json.dumps(config) + "\n")
                process.stdin.flush()
            for process in clients:
                ready = await read_line(process, 200)
                r.ready += ready["ready"]
                r.failed += ready["failed"]
            r.connect_s = time.monotonic() - began
            if r.ready == 0:
                raise RuntimeError("no client socket was accepted")

            await asyncio.sleep(3)
            r.rss_open_mb = ps.memory_info().rss / 2**20
            r.fds_open = ps.num_fds()
            r.threads = ps.num_threads()
            ps.cpu_percent(None)
            await asyncio.sleep(args.idle)
            r.idle_cpu = ps.cpu_percent(None)

            client_ps = [psutil.Process(p.pid) for p in clients]
            me = psutil.Process()
            redis = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
            order = uids[:]
            random.Random(args.seed).shuffle(order)
            n = 0
            rss_load = 0.0
            try:
                for phase, seconds in ((0, args.warmup), (1, args.duration)):
                    if phase == 1:
                        for p in (ps, redis_ps, me, *client_ps):
                            p.cpu_percent(None)
                        psutil.cpu_percent(None)
                    start = time.monotonic()
                    count = int(seconds * args.rate)
                    for i in range(count):
                        await asyncio.sleep(max(0.0, start + i / args.rate - time.monotonic()))
                        uid = order[n % len(order)]
                        await redis.publish(f"user:{uid}", envelope(uid, n, phase))
                        r.sent[phase] += 1
                        n += 1
                        if i % args.rate == 0:
                            rss_load = max(rss_load, ps.memory_info().rss / 2**20)
                    if phase == 1:
                        r.rate = count / (time.monotonic() - start)
                        await asyncio.sleep(args.drain)
                        r.cpu, r.redis_cpu = ps.cpu_percent(None), redis_ps.cpu_percent(None)
                        r.bench_cpu = me.cpu_percent(None)
                        r.clients_cpu = [p.cpu_percent(None) for p in client_ps]
                        r.machine_cpu = psutil.cpu_percent(None)
            finally:
                await redis.aclose()
            r.rss_load_mb = max(rss_load, ps.memory_info().rss / 2**20)

            for process in clients:
                assert process.stdin is not None
                process.stdin.write("stop\n")
                process.stdin.flush()
            for process in clients:
                report = await read_line(process, 60)
                r.still_open += report["open"]
                r.closed.update({str(k): v for k, v in report["closed"].items()})
                r.received.update({int(k): v for k, v in report["received"].items()})
                r.latencies_ms += report["latencies_ms"]
                r.errors += report["errors"]
            r.latencies_ms.sort()
        finally:
            for process in clients:
                with contextlib.suppress(OSError):
                    if process.stdin is not None:
                        process.stdin.close()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
            stopped = time.monotonic()
            service.stop(signal.SIGTERM, 60.0)
            r.stop_s = time.monotonic() - stopped
            r.problems = [
                line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()
            ]


def report(r: Result) -> str:
    a = r.args
    lat = r.latencies_ms
    lost = r.sent[1] - r.received[1]

    def ms(q: float) -> str:
        return f"{percentile(lat, q):.1f}"

    lines = [
        f"Run of {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {r.seconds:.0f} s in all; Python "
        f"{platform.python_version()}, {os.cpu_count()} cores, load average before the run "
        f"{r.load_before[0]:.2f} / {r.load_before[1]:.2f} / {r.load_before[2]:.2f} (1 / 5 / 15 min).",
        "",
        f"Command: `.venv/bin/python -m bench.websocket --clients {a.clients} --rate {a.rate} "
        f"--duration {a.duration:g} --client-processes {a.client_processes}"
        + ("" if a.deflate else " --no-deflate")
        + "`",
        "",
        "| measure | value |",
        "|---|---|",
        f"| sockets open, authenticated | {r.ready} of {a.clients} ({r.failed} refused or failed), "
        f"from {a.client_processes} client processes |",
        f"| compression | {'permessage-deflate (as browsers offer it)' if a.deflate else 'none'} |",
        f"| time to open them all | {r.connect_s:.1f} s ({a.handshakes} handshakes at a time per process) |",
        f"| events published | {r.sent[1]} in {a.duration:g} s, {r.rate:.0f}/s (after {r.sent[0]} in a "
        f"{a.warmup:g} s warm-up) |",
        f"| events received | {r.received[1]}; lost {lost} |",
        f"| latency p50 / p90 / p99 | **{ms(50)} / {ms(90)} / {ms(99)} ms** |",
        f"| latency p99.9 / max | {ms(99.9)} / {(max(lat) if lat else float('nan')):.1f} ms |",
        f"| service RSS | {r.rss_base_mb:.1f} MiB with no socket; {r.rss_open_mb:.1f} MiB with "
        f"{r.ready} open; {r.rss_load_mb:.1f} MiB max under load |",
        f"| memory per connection | **{r.per_connection_kib:.1f} KiB** (RSS difference / sockets) |",
        f"| service file descriptors, threads | {r.fds_open}, {r.threads} with every socket open |",
        f"| service CPU | {r.idle_cpu:.1f} % idle with every socket open; **{r.cpu:.1f} %** at "
        f"{r.rate:.0f} events/s (100 % = one core) |",
        f"| other CPU at that rate | client processes {' + '.join(f'{c:.1f}' for c in r.clients_cpu)} %, "
        f"redis-server {r.redis_cpu:.1f} %, publisher {r.bench_cpu:.1f} %; machine {r.machine_cpu:.1f} % "
        f"of both cores |",
        f"| everything else on the machine | {r.others_cpu:.1f} % (other work sharing the 2 cores) |",
        f"| sockets closed during the run | {dict(r.closed) or 'none'}; {r.still_open} open at the end |",
        f"| service stop (SIGTERM -> exit) | {r.stop_s:.1f} s |",
    ]
    if r.errors:
        lines += ["", "Client errors (first ones):", "", *[f"- `{e}`" for e in r.errors[:5]]]
    if r.problems:
        lines += ["", f"Service log lines at WARNING or above: {len(r.problems)}; the first:", ""]
        lines += [f"    {p[:300]}" for p in r.problems[:5]]
    return "\n".join(lines)


def write_doc(block: str, deflate: bool) -> None:
    start, end = markers(deflate)
    text = DOC.read_text() if DOC.exists() else "# WebSocket benchmark\n"
    generated = f"{start}\n{block}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + generated + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + generated + "\n"
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=1000, help="concurrent sockets, one user each")
    parser.add_argument("--rate", type=int, default=500, help="events per second, over all users")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of events before measuring")
    parser.add_argument("--drain", type=float, default=2.0, help="seconds to wait for the last events")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measure")
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--handshakes", type=int, default=50, help="handshakes in flight per client process")
    parser.add_argument("--no-deflate", dest="deflate", action="store_false", help="no permessage-deflate")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-doc", action="store_true", help=f"print only; leave {DOC.name} alone")
    parser.add_argument("--as-client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_client:
        asyncio.run(client_main())
        return
    result = Result(args)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-ws-") as workdir:
        asyncio.run(run(result, Path(workdir)))
    result.seconds = time.monotonic() - began
    block = report(result)
    print(block)
    if not args.no_doc:
        write_doc(block, args.deflate)
        print(f"\nwritten to {DOC}")


if __name__ == "__main__":
    main()
