"""Pure units of Direct mode's hot path: the hub reads each message once, whatever the
number of sockets; a socket's outbound queue is bounded by count and by bytes; the
WebSocket protocol's settings are read strictly."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import types
from typing import Any

import pytest

from listeners.config import WebSocketSettings
from listeners.deliver import batch, wsprotocol
from listeners.deliver.batch import MAX_BATCH, Resyncs
from listeners.deliver.hub import Hub
from listeners.deliver.websocket import SLOW_CONSUMER, Connection
from listeners.envelope import Envelope
from listeners.metrics import Metrics
from listeners_bridge.broker import MemoryBroker
from listeners_bridge.registry import ChatThread


async def test_each_message_is_read_once_and_the_same_text_goes_to_every_socket() -> None:
    broker = MemoryBroker()
    hub = Hub(broker, "units", Metrics())
    runner = asyncio.create_task(hub.run())
    received: list[list[str]] = [[], [], []]
    try:
        for sink in received:
            assert await hub.subscribe("user:u1", "u1", sink.append)
        await asyncio.sleep(0)  # the memory subscriber connects
        events = 50
        for n in range(events):
            await broker.publish_many([("user:u1", Envelope.create("notif.add", "u1", {"n": n}).to_json())])
        for _ in range(100):
            if all(len(r) == events for r in received):
                break
            await asyncio.sleep(0)
        assert [len(r) for r in received] == [events] * 3
        assert hub.parsed == events  # one read per message, not one per socket
        for n in range(events):  # the very same text object: never re-serialised per socket
            assert received[0][n] is received[1][n] is received[2][n]
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


class ClosedSocket:
    """The little of a Starlette WebSocket that `Connection.close` looks at."""

    def __init__(self) -> None:
        from starlette.websockets import WebSocketState

        self.application_state = WebSocketState.DISCONNECTED
        self.headers: dict[str, str] = {}


@dataclasses.dataclass
class Gateway:
    settings: WebSocketSettings
    services: Any = dataclasses.field(default_factory=lambda: types.SimpleNamespace(metrics=Metrics()))


async def deliver_until_closed(
    settings: WebSocketSettings, text: str, attempts: int
) -> tuple[Connection, int]:
    connection = Connection(Gateway(settings), ClosedSocket())  # type: ignore[arg-type]
    closes: list[int] = []

    async def close(code: int, reason: str) -> None:
        closes.append(code)

    connection.close = close  # type: ignore[method-assign]
    most = 0
    for _ in range(attempts):  # nothing reads: a client that stopped
        connection._deliver(text)
        most = max(most, len(connection._outbound))
    await asyncio.sleep(0)
    assert closes == [SLOW_CONSUMER]
    return connection, most


async def test_a_full_queue_by_count_closes_the_socket_and_drops_what_it_held() -> None:
    settings = WebSocketSettings(queue_length=10, queue_bytes=1 << 20)
    connection, most = await deliver_until_closed(settings, "x" * 10, 1000)
    assert most == 10
    assert len(connection._outbound) == 0 and connection._queued_bytes == 0


async def test_a_full_queue_by_bytes_closes_the_socket_and_drops_what_it_held() -> None:
    settings = WebSocketSettings(queue_length=1000, queue_bytes=4096)
    connection, most = await deliver_until_closed(settings, "x" * 1000, 1000)
    assert most == 4  # 4,000 characters fit in 4,096; the fifth would not
    assert len(connection._outbound) == 0 and connection._queued_bytes == 0


def test_the_protocol_offers_its_direct_send_under_the_name_the_gateway_looks_for() -> None:
    from listeners.deliver import websocket

    assert websocket.SEND_EXTENSION == wsprotocol.SEND_EXTENSION


def test_the_deflate_modes() -> None:
    assert wsprotocol.deflate_mode({}) == "no-context"
    assert wsprotocol.deflate_factory("off") is None
    fresh = wsprotocol.deflate_factory("no-context")
    kept = wsprotocol.deflate_factory("context")
    assert fresh is not None and kept is not None
    assert fresh.server_no_context_takeover and fresh.client_no_context_takeover
    assert not kept.server_no_context_takeover and not kept.client_no_context_takeover
    assert fresh.server_max_window_bits == kept.server_max_window_bits == 12
    with pytest.raises(ValueError, match="LISTENERS_WS_DEFLATE"):
        wsprotocol.deflate_mode({"LISTENERS_WS_DEFLATE": "zstd"})
    assert wsprotocol.close_seconds({}) == wsprotocol.CLOSE_SECONDS
    assert wsprotocol.close_seconds({"LISTENERS_WS_CLOSE_TIMEOUT_SECONDS": "30"}) == 30.0
    for bad in ("0", "-1", "nope", "99999"):
        with pytest.raises(ValueError):
            wsprotocol.close_seconds({"LISTENERS_WS_CLOSE_TIMEOUT_SECONDS": bad})


class CountingBroker(MemoryBroker):
    """Counts pipelines, and how many run at once (what a reconnect storm costs in connections)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.in_flight = 0
        self.most_in_flight = 0

    async def publish_many(self, messages: Any) -> None:
        self.calls += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)  # a round trip: others may start meanwhile
            await super().publish_many(messages)
        finally:
            self.in_flight -= 1


def sign(uid: str, threads: tuple[ChatThread, ...]) -> bytes:
    return json.dumps({"uid": uid, "threads": sorted(t.thread_key for t in threads)}).encode()


async def until_sent(resyncs: Resyncs) -> None:
    while resyncs.waiting or resyncs._sender is not None:
        await asyncio.sleep(0)


async def test_a_storm_of_resync_requests_is_coalesced_per_user_in_a_few_pipelines_one_at_a_time() -> None:
    """Every socket of 1,000 users asks twice (opening, then the hub reconnecting), some
    with a thread: one request per user goes out, with every thread asked for."""
    broker = CountingBroker()
    resyncs = Resyncs(broker, "control", sign, per_second=1e9)
    thread = ChatThread("acme", "t1", "chats")
    for n in range(1000):
        resyncs.request(f"u{n}")
    for n in range(1000):
        resyncs.request(f"u{n}", (thread,) if n % 2 else ())
    await until_sent(resyncs)
    expected = sorted(sign(f"u{n}", (thread,) if n % 2 else ()) for n in range(1000))
    assert sorted(broker.published["control"]) == expected  # one per user, threads merged
    assert resyncs.sent == 1000 and resyncs.merged == 1000
    assert broker.calls == resyncs.pipelines == 1000 // MAX_BATCH
    assert broker.most_in_flight == 1


async def test_resync_requests_wait_while_redis_is_gone_and_go_out_once_it_is_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batch, "RETRY_SECONDS", 0.0)
    broker = CountingBroker()
    resyncs = Resyncs(broker, "control", sign, per_second=1e9)
    broker.available = False
    for n in range(10):
        resyncs.request(f"u{n}")
    while broker.calls < 3:  # tried, failed, tried again: nothing lost, nothing sent twice
        await asyncio.sleep(0)
    assert resyncs.sent == 0 and not broker.published["control"]
    broker.available = True
    await until_sent(resyncs)
    assert sorted(broker.published["control"]) == sorted(sign(f"u{n}", ()) for n in range(10))
    await resyncs.aclose()


async def test_resync_requests_survive_any_failure_of_a_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A write on a transport Redis reset raises RuntimeError from the loop itself, and a bug
    raises anything: the requests stay queued and go out on the next try, none lost."""
    monkeypatch.setattr(batch, "RETRY_SECONDS", 0.0)
    failures = [RuntimeError("unable to perform operation on <TCPTransport closed=True>"), KeyError("bug")]

    class Failing(CountingBroker):
        async def publish_many(self, messages: Any) -> None:
            if failures:
                self.calls += 1
                raise failures.pop(0)
            await super().publish_many(messages)

    broker = Failing()
    resyncs = Resyncs(broker, "control", sign, per_second=1e9)
    for n in range(10):
        resyncs.request(f"u{n}")
    await until_sent(resyncs)
    assert sorted(broker.published["control"]) == sorted(sign(f"u{n}", ()) for n in range(10))
    assert not failures
    await resyncs.aclose()
