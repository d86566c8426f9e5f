"""The fault scenarios of bench/faults.py, small: every one converges with nothing lost.

Each runs in the fault lab (bench/faultlab.py): Redis, the Firestore emulator and the Realtime
Database stand-in each in a network namespace of its own where `ip netns` works (as root),
behind a TCP proxy otherwise (tests/test_soak.py runs the proxy-only lab), with CI_USERS users
online, writes flowing, the fault, then the consumers compared with the database: the bridge's
reducers, and the browser client module (listeners-client.js, run in Node through the
services' /ws: bench/browsers.py). The figures at 1,000 users are the benchmark's
(`python -m bench.faults`); here only behaviour is asserted: every probe written after the
fault arrives (at both consumers), each consumer then equals the database (nothing lost,
nothing extra), no event is delivered twice, and a dead connection is noticed. The Realtime
Database's scenarios run a second time on the wire client (`LISTENERS_RTDB_TRANSPORT=wire`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from bench.faultlab import Lab
from bench.faults import BY_NAME, Durations, Outcome, Settings, run_scenario

from listeners_testkit import netns
from listeners_testkit.processes import free_port
from listeners_testkit.proxy import TcpProxy

pytestmark = pytest.mark.asyncio

CI_USERS = 50  # the benchmark runs 1,000; fewer keep the module within its CI budget
CI = Settings(
    users=CI_USERS,
    notif_rate=10.0,
    dm_rate=5.0,
    probes=10,
    browsers=CI_USERS,  # every user also followed by the browser client module
    ready_timeout=180.0,
    # A blackhole must outlast the 6 s within which a dead Redis connection is noticed.
    # The half-opens then reset: longer, so that the reset finds the service reconnecting.
    durations=Durations(fault=7.0, lossy=5.0, halfopen=10.0, halfopen_both=12.0, before=1.0, after=1.0),
)
NETNS, WHY_NOT = netns.available()
# Faults on a dead connection must be noticed; the others (a slow link, a restart seen as a
# closed connection by the service itself) are noticed or not, both fine.
MUST_NOTICE = {
    "redis-blackhole",
    "redis-restart",
    "rtdb-cut",
    "redis-halfopen-reset",
    "redis-firestore-halfopen",
    "kill-and-sigterm",
    "redis-blackhole-takeover",
}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as made:
        yield made


def check(outcome: Outcome) -> None:
    assert not outcome.error, f"{outcome.error} (logs: {outcome.logs})"
    assert outcome.recovered_s is not None, f"a probe written after the fault never arrived ({outcome.logs})"
    assert outcome.converged_s is not None, f"never converged: {outcome.examples} ({outcome.logs})"
    assert outcome.lost == 0, outcome.examples
    assert outcome.duplicates == 0
    assert outcome.browsers == CI_USERS
    assert outcome.browser_lost == 0, [e for e in outcome.examples if e.startswith("browser")]
    assert outcome.browser_duplicates == 0, outcome.examples
    # a tail position is never a change (docs/events.md): neither applied nor a duplicate
    assert outcome.positions_applied == 0 and outcome.browser_positions_applied == 0
    assert sum(outcome.ops.values()) > 0 and outcome.failed_writes == 0
    if outcome.scenario.name in MUST_NOTICE:
        assert outcome.detected_s is not None, "the fault was never noticed"


@pytest.mark.timeout(300)  # a guard against a hang; a scenario takes 10 to 30 s
@pytest.mark.parametrize("name", list(BY_NAME))
async def test_scenario_converges_with_nothing_lost(
    lab: Lab, name: str, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    outcome = await run_scenario(lab, BY_NAME[name], CI, tmp_path)
    record_property("lab", lab.describe())
    for key in (
        "detected_s",
        "recovered_s",
        "converged_s",
        "worst_ms",
        "lost",
        "duplicates",
        "positions",
        "position_gaps",
        "browser_positions",
        "browser_position_gaps",
    ):
        record_property(key, getattr(outcome, key))
    check(outcome)


WIRE_SCENARIOS = ["rtdb-cut", "rtdb-slow"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", WIRE_SCENARIOS)
async def test_rtdb_scenario_converges_on_the_wire_client(
    lab: Lab, name: str, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """The Realtime Database's faults again with `LISTENERS_RTDB_TRANSPORT=wire`: every
    direct-message stream of the instance on the wire client's few WebSockets (issue 27)."""
    settings = dataclasses.replace(CI, rtdb_transport="wire")
    outcome = await run_scenario(lab, BY_NAME[name], settings, tmp_path)
    for key in ("detected_s", "recovered_s", "converged_s", "worst_ms", "lost", "duplicates"):
        record_property(key, getattr(outcome, key))
    check(outcome)
    # Served over the wire: no REST stream, every user's listen on the instance's WebSockets.
    ready, end = outcome.rtdb_ready, outcome.rtdb_end
    assert ready["streams"] == 0 and 1 <= ready["connections"] <= 4, ready
    assert ready["listens"] >= CI_USERS, ready
    assert end["streams"] == 0 and end["listens"] >= CI_USERS, end
    if name == "rtdb-cut":  # the cut reset its WebSockets: new ones were opened
        assert end["connects"] > ready["connects"], (ready, end)


# -- the links themselves ---------------------------------------------------------------------


def _echo_server(host: str, port: int) -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen()
    return server


async def _echo(server: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    server.setblocking(False)
    while True:
        conn, _ = await loop.sock_accept(server)
        asyncio.get_running_loop().create_task(_pump(conn))


async def _pump(conn: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    with conn:
        while data := await loop.sock_recv(conn, 65536):
            await loop.sock_sendall(conn, data)


@pytest.mark.skipif(not NETNS, reason=f"network namespaces unavailable ({WHY_NOT}); the lab uses proxies")
async def test_a_blackholed_namespace_drops_silently_both_ways() -> None:
    """Veth down: an open connection goes silent (no RST, no FIN), a new one hangs (no
    "no route to host"), and both work again once healed."""
    with netns.Namespace.create("t-echo") as ns:
        port = free_port()
        # an echo server inside the namespace (a child: the namespace is the process's)
        code = (
            "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
            f"s.bind(('{ns.address}',{port}));s.listen()\n"
            "while True:\n c,_=s.accept()\n while (d:=c.recv(65536)): c.sendall(d)\n"
        )
        child = subprocess.Popen(ns.command([sys.executable, "-c", code]))
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    reader, writer = await asyncio.open_connection(ns.address, port)
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
            writer.write(b"a")
            assert await asyncio.wait_for(reader.read(1), 10) == b"a"
            ns.blackhole()
            writer.write(b"b")
            with pytest.raises(TimeoutError):  # nothing comes back, nothing closes
                await asyncio.wait_for(reader.read(1), 1.5)
            with pytest.raises(TimeoutError):  # a new connection hangs: its SYN is dropped
                await asyncio.wait_for(asyncio.open_connection(ns.address, port), 2.5)
            ns.heal()
            assert await asyncio.wait_for(reader.read(1), 30) == b"b"  # TCP retransmits
            writer.close()
        finally:
            child.kill()
            child.wait()


async def test_a_shaped_proxy_delays_in_order_and_loses_nothing() -> None:
    server = _echo_server("127.0.0.1", 0)
    serving = asyncio.create_task(_echo(server))
    try:
        with TcpProxy(server.getsockname()[1]) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            proxy.shape(0.2, 0.5)  # 0.2 s each way; half the chunks held one RTO more
            began = time.monotonic()
            sent = b"".join(bytes([65 + i % 26]) * 100 for i in range(50))
            for i in range(50):
                writer.write(sent[i * 100 : (i + 1) * 100])
                await writer.drain()
                await asyncio.sleep(0.005)
            got = b""
            async with asyncio.timeout(30):
                while len(got) < len(sent):
                    got += await reader.read(65536)
            assert got == sent  # every byte, in order
            assert time.monotonic() - began >= 0.4  # at least the delay, both ways
            proxy.shape(0.0)
            writer.write(b"z")
            assert await asyncio.wait_for(reader.read(1), 10) == b"z"
            writer.close()
    finally:
        serving.cancel()
        server.close()
