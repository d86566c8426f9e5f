"""The fault-test TCP proxy itself, against a real redis-server.

Plain blocking sockets on purpose: while a test waits on one, the test's event loop is
blocked, and the proxy (its own thread and loop) must go on forwarding regardless.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis

from listeners_testkit.processes import PROJECT_ROOT, RedisServer
from listeners_testkit.proxy import TcpProxy

SILENCE = 0.5  # how long "no answer" is waited for; a loopback answer takes well under 1 ms


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[TcpProxy]:
    with TcpProxy(redis_server.port) as running:
        yield running


@pytest.fixture
def direct(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port)
    yield client
    client.close()


def connect(port: int, name: str = "") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if name:  # so the real server's CLIENT LIST tells our connections apart
        assert ask(sock, f"CLIENT SETNAME {name}") == b"+OK\r\n"
    return sock


def ask(sock: socket.socket, command: str, timeout: float = 5.0) -> bytes:
    """One inline command and its (short) reply; raises TimeoutError if none comes."""
    sock.settimeout(timeout)
    sock.sendall(command.encode() + b"\r\n")
    return sock.recv(4096)


def silent(sock: socket.socket, command: str) -> bool:
    """The command gets no reply within SILENCE, and the connection is not closed either."""
    try:
        reply = ask(sock, command, timeout=SILENCE)
    except TimeoutError:
        return True
    raise AssertionError(f"expected silence, got {reply!r} (b'' is a close)")


def named(client: redis.Redis, name: str) -> bool:
    return any(c.get("name") == name for c in client.client_list())


def eventually(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def test_forwards_both_ways_and_counts(proxy: TcpProxy, direct: redis.Redis) -> None:
    client = redis.Redis(port=proxy.port)
    assert client.set("proxy:k", "v") and client.get("proxy:k") == b"v"
    assert direct.get("proxy:k") == b"v"
    stats = proxy.stats()
    assert (stats.opened, stats.live, stats.frozen) == (1, 1, 0)
    client.close()
    eventually(lambda: proxy.stats().live == 0)
    assert proxy.stats().opened == 1


def test_freeze_is_half_open_and_new_connections_work(proxy: TcpProxy, direct: redis.Redis) -> None:
    old = connect(proxy.port, "frozen-a")
    assert ask(old, "PING") == b"+PONG\r\n"
    assert proxy.freeze() == 1
    assert silent(old, "PING")  # neither answered nor closed
    new = connect(proxy.port, "fresh-b")
    assert ask(new, "PING") == b"+PONG\r\n"  # a new connection goes through
    assert proxy.stats().frozen == 1 and proxy.stats().live == 2
    # The client gives up and closes: the server is never told, as across a real cut.
    old.close()
    assert named(direct, "frozen-a")
    proxy.thaw()
    eventually(lambda: not named(direct, "frozen-a"))  # thawed: the close passes now
    new.close()


def test_held_bytes_are_delivered_on_thaw(proxy: TcpProxy) -> None:
    sock = connect(proxy.port, "held")  # answered: accepted and forwarding before the freeze
    assert proxy.freeze() == 1
    assert silent(sock, "PING")
    proxy.thaw()
    sock.settimeout(5)
    assert sock.recv(4096) == b"+PONG\r\n"  # the reply held during the freeze
    sock.close()


def test_a_frozen_subscriber_receives_nothing_and_looks_subscribed(
    proxy: TcpProxy, direct: redis.Redis
) -> None:
    subscriber = connect(proxy.port)
    assert ask(subscriber, "SUBSCRIBE proxy:chan").startswith(b"*3\r\n$9\r\nsubscribe")
    proxy.freeze()
    assert direct.publish("proxy:chan", "hello") == 1  # Redis still counts it as a receiver
    subscriber.settimeout(SILENCE)
    with pytest.raises(TimeoutError):
        subscriber.recv(4096)
    subscriber.close()


def test_freeze_can_select_connections_by_what_they_sent(proxy: TcpProxy) -> None:
    subscriber = connect(proxy.port)
    started = time.monotonic()
    ask(subscriber, "SUBSCRIBE proxy:only")
    commands = connect(proxy.port)
    assert ask(commands, "PING") == b"+PONG\r\n"
    assert proxy.freeze(where=lambda link: b"SUBSCRIBE" in link.sent) == 1
    assert ask(commands, "PING") == b"+PONG\r\n"  # not selected: still forwards
    assert silent(subscriber, "PING")
    first = proxy.links()[0]
    assert first.frozen and not first.closed
    at = first.at(first.sent.index(b"proxy:only"))
    assert at is not None and started <= at <= time.monotonic()
    subscriber.close()
    commands.close()


def test_blackhole_accepts_and_never_forwards_until_thawed(proxy: TcpProxy) -> None:
    old = connect(proxy.port, "old")
    proxy.blackhole()
    assert silent(old, "PING")
    new = connect(proxy.port)  # accepted...
    assert silent(new, "PING")  # ...and goes nowhere
    assert proxy.stats().frozen == 2
    proxy.thaw()
    new.settimeout(5)
    assert new.recv(4096) == b"+PONG\r\n"  # connected to Redis only now, then forwarded
    old.close()
    new.close()


def test_reset_closes_both_sides_with_a_rst(proxy: TcpProxy, direct: redis.Redis) -> None:
    sock = connect(proxy.port, "reset-me")
    proxy.freeze()
    assert proxy.reset() == 1  # frozen or not
    sock.settimeout(5)
    with pytest.raises(ConnectionResetError):
        sock.recv(4096)
    eventually(lambda: not named(direct, "reset-me"))  # the server side is gone as well
    assert proxy.stats().live == 0
    sock.close()
    assert ask(connect(proxy.port), "PING") == b"+PONG\r\n"  # and the proxy still serves


def test_close_stops_listening(redis_server: RedisServer) -> None:
    proxy = TcpProxy(redis_server.port).start()
    port = proxy.port
    sock = connect(port, "closed")
    assert proxy.freeze() == 1
    proxy.close()
    sock.settimeout(5)
    assert sock.recv(4096) == b""  # closed with a FIN, frozen or not
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.close()
    proxy.close()  # twice is harmless


def test_command_line_proxy(redis_server: RedisServer) -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "listeners_testkit.proxy", "--target", f"127.0.0.1:{redis_server.port}"],
        cwd=PROJECT_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        port = int(child.stdout.readline().split()[1])
        sock = connect(port, "cli")
        for command, answer in (
            ("freeze", "frozen 1"),
            ("stats", "opened 1 live 1 frozen 1"),
            ("shape 0.5", "refused 'shape 0.5': want shape DELAY LOSS"),  # and it goes on
            ("shape 0 0", "shaped"),
        ):
            child.stdin.write(command + "\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == answer
        assert silent(sock, "PING")
        child.stdin.write("reset\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "reset 1"
        sock.close()
        child.stdin.close()
        assert child.wait(10) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            if child.poll() is None:
                child.kill()
                child.wait()
