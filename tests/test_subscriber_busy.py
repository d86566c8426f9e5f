"""A Pub/Sub connection that keeps delivering is alive, and is read fast enough to stay so.

- A burst that takes longer to read than the heartbeat timeout (the pong queued behind it)
  is not a half-open connection (pure unit on a clock of its own: the loop's `time` advances
  only as the fake connection says).
- Every message that has arrived is read in one go (`publish.resp.Wire`), not one read per
  message: a busy channel must not leave the reader 32 MB behind, where Redis cuts it.
- A burst far above what the reader takes per read reaches the handler whole, on the same
  connection (real redis-server).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from listeners.config import RedisSettings
from listeners_bridge import resp
from listeners_bridge.redis_subscriber import HalfOpen, RedisSubscriber
from listeners_testkit.processes import RedisServer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class BusyWire:
    """Answers the PING only after `burst` messages, each `gap` seconds after the last on the
    clock, so the burst lasts several heartbeat timeouts; then silence: a dead connection."""

    def __init__(self, clock: Clock, burst: int, gap: float) -> None:
        self.clock, self.burst, self.gap = clock, burst, gap
        self.sent = 0

    def send(self, *parts: bytes) -> None:
        return None

    async def read(self, timeout: float) -> list[Any]:
        if self.sent < self.burst:
            self.clock.now += self.gap
            self.sent += 1
            return [[b"message", b"c", b"%d" % self.sent]]
        if self.sent == self.burst:
            self.sent += 1
            return [[b"pong", b""]]
        self.clock.now += timeout
        return []


async def test_a_burst_longer_than_the_timeout_is_not_half_open_but_silence_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(asyncio.get_running_loop(), "time", clock)
    received: list[bytes] = []
    subscriber = RedisSubscriber(
        RedisSettings(host="127.0.0.1"),
        "unit",
        lambda channel, data: received.append(data),
        heartbeat_seconds=3.0,
        heartbeat_timeout=3.0,
    )
    await subscriber.subscribe("c")
    wire = BusyWire(clock, burst=100, gap=0.1)  # 10 s of messages before the pong
    with pytest.raises(HalfOpen):  # the silence after the burst, and only that
        await subscriber._read(wire)
    assert received == [b"%d" % n for n in range(1, 101)]


class StalledWire:
    """The loop stalls 10 s (a worker busy closing its sockets) while a read waits: the read's
    timeout fires as the pong and a message arrive, and they are there for the next read.
    Then silence."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.reads = clock, 0

    def send(self, *parts: bytes) -> None:
        return None

    async def read(self, timeout: float) -> list[Any]:
        self.reads += 1
        if self.reads == 1:
            self.clock.now += 10.0
            return []
        if self.reads == 2:
            return [[b"pong", b""], [b"message", b"c", b"after the stall"]]
        self.clock.now += timeout
        return []


async def test_a_stalled_loop_reads_the_waiting_pong_before_it_condemns_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(asyncio.get_running_loop(), "time", clock)
    received: list[bytes] = []
    subscriber = RedisSubscriber(
        RedisSettings(host="127.0.0.1"), "unit", lambda channel, data: received.append(data)
    )
    await subscriber.subscribe("c")
    with pytest.raises(HalfOpen):  # the silence that follows
        await subscriber._read(StalledWire(clock))
    assert received == [b"after the stall"]


class CountingReader(asyncio.StreamReader):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def read(self, n: int = -1) -> bytes:
        self.reads += 1
        return await super().read(n)


class ClosedWriter:
    def is_closing(self) -> bool:
        return True

    def write(self, data: bytes) -> None:
        raise AssertionError("nothing is written to a closing connection")


@pytest.mark.parametrize("parser", ["hiredis", "python"])
async def test_every_message_that_arrived_is_read_in_one_go(
    parser: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if parser == "python":
        monkeypatch.setattr(resp, "parser", resp.PyParser)
    reader = CountingReader()
    messages = [resp.command(b"message", b"user:u", b"event %d" % n) for n in range(500)]
    pong = resp.command(b"pong", b"")
    stream = b"".join(messages) + pong + b"+PONG\r\n-NOPERM no\r\n:3\r\n$-1\r\n"
    # Fed in two pieces cut inside a message: the half is kept for the next read.
    reader.feed_data(stream[:1000])
    wire = resp.Wire(reader, ClosedWriter())  # type: ignore[arg-type]
    first = await wire.read(1.0)
    reader.feed_data(stream[1000:])
    replies = first + await wire.read(1.0)
    assert reader.reads == 2
    assert replies[:500] == [[b"message", b"user:u", b"event %d" % n] for n in range(500)]
    assert replies[500:502] == [[b"pong", b""], b"PONG"]
    assert isinstance(replies[502], resp.ReplyError) and replies[503:] == [3, None]
    assert await wire.read(0.01) == []  # nothing more: the timeout, not an error
    wire.send(b"PING")  # a closing connection: nothing written, nothing raised
    reader.feed_eof()
    with pytest.raises(ConnectionError):
        await wire.read(1.0)


@pytest.mark.parametrize("parser", ["hiredis", "python"])
async def test_a_burst_reaches_the_handler_whole_on_one_connection(
    parser: str, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10,000 messages of 1 KB in one pipeline: 10 MB at once, far more than a read takes.
    With either parser, on the protocol redis-py negotiates (RESP3 pushes from redis-py 8)."""
    if parser == "python":
        monkeypatch.setattr(resp, "parser", resp.PyParser)
    received: list[bytes] = []
    connects: list[bool] = []
    subscriber = RedisSubscriber(
        RedisSettings(host="127.0.0.1", port=redis_server.port),
        "unit",
        lambda channel, data: received.append(data),
    )
    subscriber.on_connect(connects.append)
    await subscriber.subscribe("unit:burst")
    runner = asyncio.create_task(subscriber.run())
    try:
        async with asyncio.timeout(60), aioredis.Redis(port=redis_server.port) as client:
            while not subscriber.is_confirmed("unit:burst"):
                await asyncio.sleep(0.01)
            pipe = client.pipeline(transaction=False)
            burst = [b"%05d" % n + b"x" * 1019 for n in range(10_000)]
            for data in burst:
                pipe.publish("unit:burst", data)
            pipe.publish("unit:burst", b"sentinel")
            await pipe.execute()
            while not received or received[-1] != b"sentinel":
                await asyncio.sleep(0.01)
        assert received == [*burst, b"sentinel"]
        assert connects == [False]  # never lost, never made again
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_subscribe_while_the_connection_is_being_lost_keeps_the_channel() -> None:
    """Nothing raises into the caller: the channel is held, and sent again on reconnect."""
    subscriber = RedisSubscriber(RedisSettings(host="127.0.0.1"), "unit", lambda channel, data: None)
    subscriber._wire = resp.Wire(asyncio.StreamReader(), ClosedWriter())  # type: ignore[arg-type]
    subscriber._ready.set()
    await subscriber.subscribe("user:a")
    assert subscriber.channels == {"user:a"} and not subscriber.is_confirmed("user:a")
    await subscriber.unsubscribe("user:a")
    assert subscriber.channels == frozenset()
