"""Many concurrent WebSocket clients on one service instance: latency, memory, CPU, bytes.

    .venv/bin/python -m bench.websocket --sockets 2000,5000,10000 --workers 1,2 --rate 5000

For each (workers, sockets) pair, in one run: a private redis-server, the Firestore emulator,
a local token issuer (its certificate URL is the service's LISTENERS_TOKEN_CERTS_URL) and one
service, `uvicorn app.main:app` with `WEB_CONCURRENCY` workers (uvicorn's own supervisor: each
worker its own process and cluster member, the kernel spreading sockets over them). Client
processes (`--client-processes`) open the sockets, one user each, with a token in
`Sec-WebSocket-Protocol: bearer, <token>`, and wait for `auth.ok`. Then this process publishes
`notif.add` envelopes the size of real ones straight to `user:{uid}` at `--rate` per second,
round-robin over the users, in one pipeline per 10 ms tick; each carries the CLOCK_MONOTONIC
time of its tick (shared by every process on Linux), and a client takes the latency once it
has parsed the frame: publish -> Redis -> a worker's hub -> the socket's queue -> the client.

Measured per pair: time to open every socket (token checks included), latency percentiles,
RSS of the service's processes with no socket and with all open (the difference per socket
is the memory per connection), CPU of every process over the measured window (100 = one
core), the bytes on the wire per event (counted by the clients), and the load average
at the start. With `--slow-fraction`, that share of the sockets stops reading once open and
gets `--ballast` bytes of extra events per second each: the service must close them with
4014 while memory stays bounded and the other sockets' latency holds. With `--restart`, the
service is stopped and started again after the measured window and every client reconnects
(jittered, as browsers do): the time until all are back and the handshake rate.

Both file-descriptor limits are raised to the hard limit here; the children inherit it.
The results replace the generated block of docs/benchmarks-websocket.md and its figure;
`--no-doc` prints only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
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
FIGURE = DOC.with_name("benchmarks-websocket.png")
START, END = "<!-- bench.websocket:start -->", "<!-- bench.websocket:end -->"
DIRECT_PROTOCOL = "listeners.deliver.wsprotocol:DirectWebSocketProtocol"
TICK = 0.01  # seconds between publish pipelines
SLOW_CONSUMER = 4014


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- the client processes ------------------------------------------------------------


@dataclass
class ClientState:
    ready: int = 0
    failed: int = 0
    refused: Counter[int] = field(default_factory=Counter)  # close code -> handshakes refused, retried
    closed: Counter[int] = field(default_factory=Counter)  # close code -> sockets closed under load
    received: Counter[int] = field(default_factory=Counter)  # phase -> events received
    latencies_ms: list[float] = field(default_factory=list)  # measured phase, reading sockets only
    reconnected_at: dict[str, float] = field(default_factory=dict)  # token -> when auth.ok came again
    wire_bytes: int = 0  # what the reading sockets received once open, frames and all
    errors: list[str] = field(default_factory=list)
    restarting: bool = False


def emit(stream: IO[str], data: dict[str, Any]) -> None:
    stream.write(json.dumps(data) + "\n")
    stream.flush()


async def open_socket(
    url: str, token: str, deflate: bool, slow: bool, state: ClientState | None = None
) -> Any:
    from websockets.asyncio.client import connect
    from websockets.typing import Subprotocol

    ws = await connect(
        url,
        subprotocols=[Subprotocol("bearer"), Subprotocol(token)],
        compression="deflate" if deflate else None,
        ping_interval=None,  # the server pings (uvicorn, every 20 s)
        open_timeout=120,
        # A slow consumer stops reading its transport once one message waits: TCP does the rest.
        max_queue=1 if slow else None,
    )
    if state is not None:  # count the bytes on the wire: what the transport hands the protocol
        received = ws.data_received

        def counted(data: bytes) -> None:
            state.wire_bytes += len(data)
            received(data)

        ws.data_received = counted  # type: ignore[method-assign]
    first = json.loads(await ws.recv())
    if first.get("type") != "auth.ok":
        await ws.close()
        raise RuntimeError(f"first message {first.get('type')!r}")
    return ws


async def hold(
    url: str,
    token: str,
    deflate: bool,
    slow: bool,
    state: ClientState,
    handshakes: asyncio.Semaphore,
    resume: asyncio.Event,
) -> None:
    """One browser: connects, reads (or, slow, stops reading until `resume`), and reconnects
    with a jittered delay whenever the server goes away while the bench restarts it."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    first = True
    while True:
        try:
            # The first opening goes `handshakes` at a time per process; a reconnection after the
            # restart does not wait for the others, as browsers do not: that is the storm.
            async with handshakes if first else contextlib.nullcontext():
                # A slow consumer offers no compression: the ballast that fills its buffers would
                # otherwise cost the machine more deflate work than the whole measured load.
                ws = await open_socket(
                    url, token, deflate and not slow, slow and first, None if slow else state
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
                state.refused[exc.rcvd.code] += 1
            elif isinstance(exc, InvalidStatus):
                state.refused[exc.response.status_code] += 1
            if first and not state.restarting:
                state.failed += 1
                state.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            await asyncio.sleep(random.uniform(0.5, 2.0))  # as the browser client backs off
            continue
        if first:
            state.ready += 1
        else:  # the last time only: a stopping server can bounce a socket that came back too early
            state.reconnected_at[token] = time.monotonic()
        try:
            async with ws:
                if slow and first:
                    await resume.wait()
                async for text in ws:
                    now = time.monotonic()
                    payload = json.loads(text).get("payload")
                    if isinstance(payload, dict) and "bench_sent" in payload:
                        phase = int(payload["bench_phase"])
                        state.received[phase] += not slow
                        if phase == 1 and not slow:
                            state.latencies_ms.append((now - float(payload["bench_sent"])) * 1000)
        except asyncio.CancelledError:
            raise
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else 1006
            if not state.restarting:
                state.closed[code] += 1
                return
        except Exception as exc:
            state.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            return
        if not state.restarting:
            return
        first = False
        await asyncio.sleep(random.uniform(0.0, 1.0))


async def client_main() -> None:
    """One client process: reads its sockets from stdin, then commands, reports on stdout."""
    raise_fd_limit()
    config = json.loads(await asyncio.to_thread(sys.stdin.readline))
    state = ClientState()
    handshakes = asyncio.Semaphore(config["handshakes"])
    resume = asyncio.Event()
    tokens: list[str] = config["tokens"]
    slow = set(config["slow"])
    began = time.monotonic()
    tasks = [
        asyncio.create_task(
            hold(config["url"], token, config["deflate"], i in slow, state, handshakes, resume)
        )
        for i, token in enumerate(tokens)
    ]
    while state.ready + state.failed < len(tokens) and time.monotonic() - began < 300:
        await asyncio.sleep(0.05)
    emit(sys.stdout, {"ready": state.ready, "failed": state.failed, "connect_s": time.monotonic() - began})
    while True:
        command = (await asyncio.to_thread(sys.stdin.readline)).strip()
        if command == "resume":  # slow sockets read again: what they get now is their close
            resume.set()
            emit(sys.stdout, {"ok": True})
        elif command == "restart":
            state.restarting = True
            state.reconnected_at.clear()
            emit(sys.stdout, {"ok": True, "open": sum(not t.done() for t in tasks)})
        elif command == "count":
            emit(
                sys.stdout,
                {"reconnected": len(state.reconnected_at), "open": sum(not t.done() for t in tasks)},
            )
        else:
            break
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
            "refused": dict(state.refused),
            "received": dict(state.received),
            "latencies_ms": state.latencies_ms,
            "reconnected_at": list(state.reconnected_at.values()),
            "errors": state.errors[:10],
            "wire_bytes": state.wire_bytes,
            "cpu_s": cpu.user + cpu.system,
        },
    )


# -- the benchmark ---------------------------------------------------------------------


@dataclass
class Result:
    workers: int
    sockets: int
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    ready: int = 0
    failed: int = 0
    connect_s: float = float("nan")
    rss_base_mb: float = float("nan")
    rss_open_mb: float = float("nan")
    rss_load_mb: float = float("nan")
    cpu: float = float("nan")  # the service's processes together
    clients_cpu: float = float("nan")
    redis_cpu: float = float("nan")
    bench_cpu: float = float("nan")
    machine_cpu: float = float("nan")
    sent: Counter[int] = field(default_factory=Counter)
    sent_reading: Counter[int] = field(default_factory=Counter)  # to the sockets that keep reading
    rate: float = float("nan")
    wire_bytes: int = 0
    reconnect_expected: int = 0
    received: Counter[int] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    still_open: int = 0
    closed: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    slow: int = 0
    slow_closed_logged: int = 0
    ballast_mb: float = 0.0
    restart_s: float = float("nan")
    reconnected: int = 0
    reconnect_s: float = float("nan")
    errors: list[str] = field(default_factory=list)
    problems: Counter[str] = field(default_factory=Counter)

    @property
    def per_connection_kib(self) -> float:
        return (self.rss_open_mb - self.rss_base_mb) * 1024 / max(1, self.ready)

    @property
    def bytes_per_event(self) -> float:
        """Bytes the reading sockets received over the events they received (both phases)."""
        return self.wire_bytes / max(1, self.received[0] + self.received[1])

    @property
    def lost(self) -> int:
        return self.sent_reading[1] - self.received[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values; NaN when there are none."""
    if not values:
        return float("nan")
    return values[max(0, min(len(values), math.ceil(q / 100 * len(values))) - 1)]


SENT_MARK = 987654.125  # stands for the send time in an envelope's template
PHASE_MARK = 7777777


def envelope(uid: str, n: int, phase: int, sent: float, ballast: int = 0) -> bytes:
    """A `notif.add` as the service publishes it, plus the send time and the phase."""
    from listeners.envelope import Envelope

    doc_id = f"job-{n:07d}"
    item: dict[str, Any] = {
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
        "bench_sent": sent,
    }
    if ballast:  # slow consumers negotiate no compression (see hold): the bytes all reach the wire
        item["ballast"] = "x" * ballast
    return Envelope.create("notif.add", uid, item).to_json()


class Envelopes:
    """One template per user, made once: the publisher only writes in the time and the phase,
    so that making 5,000 envelopes a second does not take the core the service needs."""

    def __init__(self) -> None:
        self._templates: dict[str, bytes] = {}

    def __call__(self, uid: str, n: int, phase: int, sent: float) -> bytes:
        template = self._templates.get(uid)
        if template is None:
            template = self._templates[uid] = envelope(uid, n, PHASE_MARK, SENT_MARK)
        return template.replace(str(SENT_MARK).encode(), repr(sent).encode(), 1).replace(
            str(PHASE_MARK).encode(), str(phase).encode(), 1
        )


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


def tell(processes: list[subprocess.Popen[str]], command: str) -> None:
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(command + "\n")
        process.stdin.flush()


async def one_socket(url: str, token: str) -> None:
    """A socket opened and closed before the baseline, so lazy imports count there."""
    ws = await open_socket(url, token, True, False)
    await ws.close()


def profile(
    args: argparse.Namespace, tree: Tree, workers: int, sockets: int
) -> list[subprocess.Popen[bytes]]:
    """py-spy on each worker for the measured window, as collapsed stacks (`--profile DIR`)."""
    if not args.profile:
        return []
    args.profile.mkdir(parents=True, exist_ok=True)
    pids = [p.pid for p in tree.processes() if p.pid != tree.root.pid] or [tree.root.pid]
    return [
        subprocess.Popen(
            [
                args.py_spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(args.duration)),
                "--rate",
                "50",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(args.profile / f"w{workers}-s{sockets}-{pid}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]


# Where a sample's time goes, by the first frame of the stack that names one (most specific first).
AREAS = (
    ("permessage-deflate (compressing each event)", ("permessage_deflate.py",)),
    ("the hub: checking each event, handing it to the sockets", ("Hub._on_message",)),
    ("reading Redis Pub/Sub (redis-py, hiredis)", ("RedisSubscriber",)),
    (
        "writing to the sockets (Starlette, uvicorn, framing, send)",
        ("Connection._write", "DirectWebSocketProtocol.send"),
    ),
    ("handshakes, token checks, socket set-up and close", ("Connection.serve", "handle_connect", "run_asgi")),
    ("uvicorn's keepalive pings", ("keepalive",)),
)


def summarise_profile(directory: Path) -> list[str]:
    """A table of where each worker's sampled time went, from py-spy's collapsed stacks."""
    lines = [
        "| worker profile | samples | "
        + " | ".join(a for a, _ in AREAS)
        + " | other (event loop, timers, tasks) |"
    ]
    lines.append("|---|" + "---:|" * (len(AREAS) + 2))
    for path in sorted(directory.glob("*.txt")):
        counts: Counter[str] = Counter()
        total = 0
        for line in path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            total += int(n)
            area = next((a for a, marks in AREAS if any(m in stack for m in marks)), "other")
            counts[area] += int(n)
        shares = [f"{counts[a] / max(1, total) * 100:.0f} %" for a, _ in AREAS]
        lines.append(
            f"| `{path.stem}` | {total} | "
            + " | ".join(shares)
            + f" | {counts['other'] / max(1, total) * 100:.0f} % |"
        )
    return lines


class Tree:
    """The service's processes: uvicorn, and its workers when there are several."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.known: dict[int, Any] = {}

    def processes(self) -> list[Any]:
        import psutil

        alive = [self.root, *self.root.children(recursive=True)]
        for p in alive:
            self.known.setdefault(p.pid, p)
        return [p for p in self.known.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def rss_mb(self) -> float:
        return float(sum(p.memory_info().rss for p in self.processes())) / 2**20

    def cpu_seconds(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.processes())


def service_env(
    args: argparse.Namespace,
    workers: int,
    sockets: int,
    redis_port: int,
    emulator: Any,
    project: str,
    certs_url: str,
) -> dict[str, str]:
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("LISTENERS_", "FIREBASE_", "GOOGLE_", "UVICORN_"))
        },
        "LISTENERS_REDIS_HOST": "127.0.0.1",
        "LISTENERS_REDIS_PORT": str(redis_port),
        "FIRESTORE_EMULATOR_HOST": emulator.host,
        "FIREBASE_PROJECT_ID": project,
        "LISTENERS_TOKEN_CERTS_URL": certs_url,
        "LISTENERS_WS_MAX_SOCKETS": str(sockets + 100),
        # Every client connects from 127.0.0.1: the per-address limits (issue 28) lifted.
        "LISTENERS_WS_HANDSHAKE_BURST_PER_ADDRESS": str(sockets + 100),
        "LISTENERS_WS_HANDSHAKES_PER_SECOND_PER_ADDRESS": "10000",
        "LISTENERS_WS_MAX_UNAUTHENTICATED_PER_ADDRESS": str(sockets + 100),
        # As in production: each new socket asks for a resync over the control channel.
        "LISTENERS_CONTROL_TOKEN": uuid.uuid4().hex,
        "LOG_LEVEL": "WARNING",
        "WEB_CONCURRENCY": str(workers),
        # As the image and the task definition set them: the stop of a restart is bounded alike.
        "UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN": "3",
        "LISTENERS_SHUTDOWN_TIMEOUT_SECONDS": "8",
        "LISTENERS_WS_DEFLATE": args.deflate,
    }
    if args.slow_fraction:
        # A slow socket's close frame waits behind the bytes its client has not read, and the
        # clients read again only after the measured window: the service waits that long
        # before it cuts them (5 s by default), so that they can see their close code.
        env["LISTENERS_WS_CLOSE_TIMEOUT_SECONDS"] = str(int(args.warmup + args.duration + 120))
    if args.protocol == "direct":
        env["UVICORN_WS"] = DIRECT_PROTOCOL
    if args.loop == "asyncio":
        env["UVICORN_LOOP"], env["UVICORN_HTTP"] = "asyncio", "h11"
    if args.no_hiredis:  # a module of that name that will not import: redis-py parses in Python
        shim = Path(tempfile.mkdtemp(prefix="no-hiredis-"))
        (shim / "hiredis.py").write_text('raise ImportError("hidden by bench.websocket --no-hiredis")\n')
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), env.get("PYTHONPATH", "")]))
    return env


async def publish(
    redis: Any,
    order: list[str],
    rate: int,
    seconds: float,
    phase: int,
    r: Result,
    n: int,
    slow: list[str],
    ballast: int,
    tree: Tree,
    rss: list[float],
    envelopes: Envelopes,
) -> int:
    """`rate` events per second for `seconds`, one pipeline per tick; returns the next number."""
    start = time.monotonic()
    ticks = int(seconds / TICK)
    per_tick = rate * TICK
    owed = 0.0
    slow_set = set(slow)
    ticks_per_second = int(1 / TICK)
    ballast_at = [slow[i::ticks_per_second] for i in range(ticks_per_second)] if ballast else []
    for tick in range(ticks):
        await asyncio.sleep(max(0.0, start + tick * TICK - time.monotonic()))
        owed += per_tick
        sent = time.monotonic()
        pipe = redis.pipeline(transaction=False)
        while owed >= 1:
            uid = order[n % len(order)]
            pipe.publish(f"user:{uid}", envelopes(uid, n, phase, sent))
            r.sent[phase] += 1
            r.sent_reading[phase] += uid not in slow_set
            n += 1
            owed -= 1
        if ballast_at:  # `ballast` bytes a second to each slow user, spread over the ticks
            for uid in ballast_at[tick % ticks_per_second]:
                pipe.publish(f"user:{uid}", envelope(uid, n, 2, sent, ballast))
                r.ballast_mb += ballast / 2**20
        await pipe.execute()
        if tick % int(1 / TICK) == 0:
            rss.append(tree.rss_mb())
    if phase == 1:
        r.rate = r.sent[1] / (time.monotonic() - start)
    return n


async def measure(args: argparse.Namespace, workers: int, sockets: int, workdir: Path) -> Result:
    import psutil
    import redis.asyncio as aioredis

    from listeners_testkit.auth import LocalIssuer
    from listeners_testkit.processes import (
        PROJECT_ROOT,
        FirestoreEmulator,
        RedisServer,
        ServiceProcess,
        free_port,
    )

    r = Result(workers, sockets)
    r.load_before = os.getloadavg()
    project = f"bench-ws-{uuid.uuid4().hex[:6]}"
    uids = [f"ws{i:05d}" for i in range(sockets)]
    rng = random.Random(args.seed)
    slow_uids = set(rng.sample(uids, int(sockets * args.slow_fraction)))
    r.slow = len(slow_uids)
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        emulator = stack.enter_context(FirestoreEmulator())
        issuer = LocalIssuer(project)
        certs_url = issuer.serve()
        stack.callback(issuer.close)
        port = free_port()
        env = service_env(args, workers, sockets, redis_server.port, emulator, project, certs_url)
        log_path = workdir / f"service-{workers}-{sockets}.log"
        service = ServiceProcess(env, port=port, log_path=log_path)
        tree = Tree(service.pid)
        assert redis_server.process is not None
        redis_ps = psutil.Process(redis_server.process.pid)
        clients: list[subprocess.Popen[str]] = []
        try:
            await asyncio.to_thread(service.wait_listening)
            await wait_ready(port, 90)
            url = f"ws://127.0.0.1:{port}/ws"
            for i in range(4 * workers):  # each worker past its lazy imports
                await one_socket(url, issuer.mint(f"warm-up-{i}"))
            await asyncio.sleep(3)
            r.rss_base_mb = tree.rss_mb()

            tokens = [issuer.mint(uid, lifetime=7200) for uid in uids]
            began = time.monotonic()
            n_clients = args.client_processes
            for k in range(n_clients):
                indices = range(k, sockets, n_clients)
                process = subprocess.Popen(
                    [sys.executable, "-m", "bench.websocket", "--as-client"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=PROJECT_ROOT,
                )
                clients.append(process)
                share = [tokens[i] for i in indices]
                slow = [j for j, i in enumerate(indices) if uids[i] in slow_uids]
                config = {
                    "url": url,
                    "tokens": share,
                    "slow": slow,
                    "handshakes": args.handshakes,
                    "deflate": args.client_deflate,
                }
                assert process.stdin is not None
                process.stdin.write(json.dumps(config) + "\n")
                process.stdin.flush()
            for process in clients:
                ready = await read_line(process, 320)
                r.ready += ready["ready"]
                r.failed += ready["failed"]
            r.connect_s = time.monotonic() - began
            if r.ready == 0:
                raise RuntimeError("no client socket was accepted")
            await asyncio.sleep(5)
            r.rss_open_mb = tree.rss_mb()

            client_ps = [psutil.Process(p.pid) for p in clients]
            me = psutil.Process()
            redis = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
            order = uids[:]
            rng.shuffle(order)
            rss: list[float] = []
            envelopes = Envelopes()
            for uid in uids:
                envelopes(uid, 0, 0, 0.0)
            try:
                n = await publish(
                    redis, order, args.rate, args.warmup, 0, r, 0, sorted(slow_uids), 0, tree, rss, envelopes
                )
                cpu0 = tree.cpu_seconds(), sum(sum(p.cpu_times()[:2]) for p in client_ps)
                redis_ps.cpu_percent(None), me.cpu_percent(None), psutil.cpu_percent(None)
                t0 = time.monotonic()
                spies = profile(args, tree, workers, sockets)
                await publish(
                    redis,
                    order,
                    args.rate,
                    args.duration,
                    1,
                    r,
                    n,
                    sorted(slow_uids),
                    args.ballast,
                    tree,
                    rss,
                    envelopes,
                )
                await asyncio.sleep(args.drain)
                elapsed = time.monotonic() - t0
                for spy in spies:
                    await asyncio.to_thread(spy.wait, 60)
                r.cpu = (tree.cpu_seconds() - cpu0[0]) / elapsed * 100
                r.clients_cpu = (sum(sum(p.cpu_times()[:2]) for p in client_ps) - cpu0[1]) / elapsed * 100
                r.redis_cpu, r.bench_cpu = redis_ps.cpu_percent(None), me.cpu_percent(None)
                r.machine_cpu = psutil.cpu_percent(None)
            finally:
                await redis.aclose()
            r.rss_load_mb = max([*rss, tree.rss_mb()])
            if r.slow:
                tell(clients, "resume")
                for process in clients:
                    await read_line(process, 60)
                await asyncio.sleep(args.drain)

            if args.restart:
                tell(clients, "restart")
                for process in clients:
                    r.reconnect_expected += (await read_line(process, 60))["open"]
                stopped = time.monotonic()
                service.stop(signal.SIGTERM, 60.0)
                service = ServiceProcess(env, port=port, log_path=log_path)
                await asyncio.to_thread(service.wait_listening)
                r.restart_s = time.monotonic() - stopped
                deadline = time.monotonic() + args.reconnect_timeout
                while time.monotonic() < deadline:
                    tell(clients, "count")
                    counts = [await read_line(p, 60) for p in clients]
                    r.reconnected = sum(c["reconnected"] for c in counts)
                    if r.reconnected >= r.reconnect_expected:
                        break
                    await asyncio.sleep(0.5)

            tell(clients, "stop")
            reconnected_at: list[float] = []
            for process in clients:
                report = await read_line(process, 120)
                r.still_open += report["open"]
                r.closed.update({str(k): v for k, v in report["closed"].items()})
                r.refused.update({str(k): v for k, v in report["refused"].items()})
                r.received.update({int(k): v for k, v in report["received"].items()})
                r.latencies_ms += report["latencies_ms"]
                reconnected_at += report["reconnected_at"]
                r.errors += report["errors"]
                r.wire_bytes += report["wire_bytes"]
            r.latencies_ms.sort()
            if args.restart and reconnected_at:
                r.reconnected = len(reconnected_at)
                r.reconnect_s = max(reconnected_at) - stopped
        finally:
            for process in clients:
                with contextlib.suppress(OSError):
                    if process.stdin is not None:
                        process.stdin.close()
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
            service.stop(signal.SIGTERM, 60.0)
            for line in log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError, AttributeError):
                    record = json.loads(line)
                    if record.get("level") in ("WARNING", "ERROR", "CRITICAL"):
                        reason = f" ({str(record['reason'])[:60]})" if record.get("reason") else ""
                        first_line = (str(record.get("message", "")).splitlines() or ["?"])[0][:80]
                        r.problems[first_line + reason] += 1
            r.slow_closed_logged = r.problems.get("websocket closed: slow consumer", 0)
    return r


# -- the report -------------------------------------------------------------------------


def describe(args: argparse.Namespace) -> str:
    protocol = "deliver.wsprotocol" if args.protocol == "direct" else "uvicorn's own"
    deflate = (
        "permessage-deflate offered by the clients" if args.client_deflate else "no compression offered"
    ) + (f"; server `LISTENERS_WS_DEFLATE={args.deflate}`" if args.protocol == "direct" else "")
    loop = "uvloop + httptools" if args.loop == "auto" else "asyncio + h11"
    loop += ", redis-py without hiredis" if args.no_hiredis else ", hiredis"
    return f"WebSocket protocol {protocol}, {deflate}, {loop}"


def command_line(args: argparse.Namespace) -> str:
    parts = [
        ".venv/bin/python -m bench.websocket",
        f"--sockets {','.join(map(str, args.sockets))}",
        f"--workers {','.join(map(str, args.workers))}",
        f"--rate {args.rate} --duration {args.duration:g} --client-processes {args.client_processes}",
    ]
    if args.protocol != "direct":
        parts.append(f"--protocol {args.protocol}")
    if args.deflate != "no-context":
        parts.append(f"--deflate {args.deflate}")
    if not args.client_deflate:
        parts.append("--no-client-deflate")
    if args.loop != "auto":
        parts.append(f"--loop {args.loop}")
    if args.no_hiredis:
        parts.append("--no-hiredis")
    if args.slow_fraction:
        parts.append(f"--slow-fraction {args.slow_fraction:g} --ballast {args.ballast}")
    if args.restart:
        parts.append("--restart")
    if args.name != "main":
        parts.append(f"--name {args.name}")
    return " ".join(parts)


def report(results: list[Result], args: argparse.Namespace, started: datetime, seconds: float) -> str:
    def ms(r: Result, q: float) -> str:
        return f"{percentile(r.latencies_ms, q):.1f}"

    lines = [
        f"Run of {started:%Y-%m-%d %H:%M} UTC, {seconds:.0f} s in all; {os.cpu_count()} cores shared by "
        "the service, the clients, Redis, the emulator and the publisher.",
        "",
        f"Command: `{command_line(args)}`",
        "",
        f"Setting: {describe(args)}.",
        "",
        "| workers | sockets | load avg at start | open s | events/s | lost | p50 ms | p99 ms | p99.9 ms "
        "| max ms | RSS idle MiB | RSS open MiB | KiB / socket | RSS max MiB | service CPU % | clients CPU % "
        "| machine CPU % | bytes / event |",
        "|" + "---:|" * 18,
    ]
    for r in results:
        lines.append(
            f"| {r.workers} | {r.ready} of {r.sockets} | {r.load_before[0]:.2f} | {r.connect_s:.1f} | "
            f"{r.rate:.0f} | {r.lost} | {ms(r, 50)} | **{ms(r, 99)}** | {ms(r, 99.9)} | {ms(r, 100)} | "
            f"{r.rss_base_mb:.0f} | {r.rss_open_mb:.0f} | **{r.per_connection_kib:.1f}** | "
            f"{r.rss_load_mb:.0f} | {r.cpu:.0f} | {r.clients_cpu:.0f} | {r.machine_cpu:.0f} | "
            f"{r.bytes_per_event:.0f} |"
        )
    lines.append("")
    for r in results:
        notes = []
        if r.slow:
            notes.append(
                f"{r.slow} slow sockets ({args.ballast} B/s of ballast each, {r.ballast_mb:.0f} MiB in all): "
                f"{r.slow_closed_logged} closed as slow consumers; close codes seen by clients "
                f"{dict(r.closed) or 'none'}; the latency above is that of the "
                f"{r.ready - r.slow} reading sockets"
            )
        elif r.closed:
            notes.append(f"closed under load: {dict(r.closed)}")
        if args.restart:
            notes.append(
                f"restart: SIGTERM to listening again {r.restart_s:.1f} s; {r.reconnected} of "
                f"{r.reconnect_expected} sockets back with `auth.ok` {r.reconnect_s:.1f} s after the "
                f"SIGTERM, {r.reconnect_s - r.restart_s:.1f} s after the new service listened "
                f"({r.reconnected / max(r.reconnect_s - r.restart_s, 1e-9):.0f} handshakes/s); "
                "handshakes refused and "
                f"retried: {dict(r.refused) or 'none'}"
            )
        if r.failed:
            notes.append(f"{r.failed} sockets failed to open")
        if r.errors:
            notes.append(f"client errors: `{r.errors[0]}`")
        others = Counter({k: v for k, v in r.problems.items() if k != "websocket closed: slow consumer"})
        if others:
            notes.append("service warnings: " + "; ".join(f"{k} x{v}" for k, v in others.most_common(3)))
        if notes:
            lines.append(f"- {r.workers} worker(s), {r.sockets} sockets: " + "; ".join(notes) + ".")
    return "\n".join(lines).rstrip("\n")


def write_doc(block: str, name: str) -> None:
    start, end = (
        (START, END)
        if name == "main"
        else (f"<!-- bench.websocket.{name}:start -->", f"<!-- bench.websocket.{name}:end -->")
    )
    text = DOC.read_text() if DOC.exists() else "# WebSocket benchmark\n"
    generated = f"{start}\n{block}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + generated + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + generated + "\n"
    DOC.write_text(text)


def draw(results: list[Result], path: Path) -> None:
    from bench.plot import Panel, save_panels

    by_workers: dict[str, list[Result]] = {}
    for r in results:
        by_workers.setdefault(f"{r.workers} worker{'s' if r.workers > 1 else ''}", []).append(r)
    save_panels(
        path,
        "WebSocket Direct mode, one instance (2 cores shared with the clients)",
        "sockets",
        [
            Panel(
                "p99 latency (ms)",
                {k: [(r.ready, percentile(r.latencies_ms, 99)) for r in v] for k, v in by_workers.items()},
                log_y=True,
            ),
            Panel(
                "service RSS, all open (MiB)",
                {k: [(r.ready, r.rss_open_mb) for r in v] for k, v in by_workers.items()},
            ),
            Panel(
                "KiB per socket",
                {k: [(r.ready, r.per_connection_kib) for r in v] for k, v in by_workers.items()},
            ),
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    numbers = lambda s: [int(n) for n in s.split(",")]  # noqa: E731
    parser.add_argument(
        "--sockets", type=numbers, default=[2000, 5000, 10000], help="socket counts, one user each"
    )
    parser.add_argument("--workers", type=numbers, default=[1, 2], help="uvicorn workers (WEB_CONCURRENCY)")
    parser.add_argument("--rate", type=int, default=5000, help="events per second, over all users")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of events before measuring")
    parser.add_argument("--drain", type=float, default=3.0, help="seconds to wait for the last events")
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--handshakes", type=int, default=50, help="handshakes in flight per client process")
    parser.add_argument(
        "--protocol", choices=("direct", "uvicorn"), default="direct", help="the WebSocket protocol class"
    )
    parser.add_argument(
        "--deflate",
        choices=("no-context", "context", "off"),
        default="no-context",
        help="LISTENERS_WS_DEFLATE",
    )
    parser.add_argument(
        "--no-client-deflate",
        dest="client_deflate",
        action="store_false",
        help="clients offer no compression",
    )
    parser.add_argument(
        "--loop", choices=("auto", "asyncio"), default="auto", help="asyncio: no uvloop, no httptools"
    )
    parser.add_argument("--no-hiredis", action="store_true", help="the service's redis-py without hiredis")
    parser.add_argument("--slow-fraction", type=float, default=0.0, help="share of sockets that stop reading")
    parser.add_argument("--ballast", type=int, default=65536, help="bytes per second to each slow socket")
    parser.add_argument("--restart", action="store_true", help="restart the service, time the reconnection")
    parser.add_argument("--reconnect-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--profile", type=Path, help="py-spy each worker into this directory (collapsed stacks)"
    )
    parser.add_argument("--py-spy", default="/tmp/pyspy/bin/py-spy")
    parser.add_argument("--log-dir", type=Path, help="keep the service logs here")
    parser.add_argument(
        "--name", default="main", help="the doc block to write (main: the table and the figure)"
    )
    parser.add_argument("--no-doc", action="store_true", help=f"print only; leave {DOC.name} alone")
    parser.add_argument("--as-client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--summarise", type=Path, help="print the table of a --profile directory, and stop")
    args = parser.parse_args()
    if args.summarise:
        print("\n".join(summarise_profile(args.summarise)))
        return
    if args.as_client:
        asyncio.run(client_main())
        return
    raise_fd_limit()
    started, began = datetime.now(UTC), time.monotonic()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-ws-") as workdir:
        logs = args.log_dir or Path(workdir)
        logs.mkdir(parents=True, exist_ok=True)
        for workers in args.workers:
            for sockets in args.sockets:
                print(f"[bench] {workers} worker(s), {sockets} sockets ...", file=sys.stderr, flush=True)
                results.append(asyncio.run(measure(args, workers, sockets, logs)))
                print(
                    report(results[-1:], args, started, time.monotonic() - began), file=sys.stderr, flush=True
                )
    block = report(results, args, started, time.monotonic() - began)
    print(block)
    if args.profile:
        block += "\n\nSampled by py-spy at 50 Hz over the measured window (share of the samples):\n\n"
        block += "\n".join(summarise_profile(args.profile))
    if not args.no_doc:
        write_doc(block, args.name)
        if args.name == "main":
            draw(results, FIGURE)
        print(f"\nwritten to {DOC}")


if __name__ == "__main__":
    main()
