"""A Pub/Sub connection that keeps delivering is alive: a burst that takes longer to read
than the heartbeat timeout (the pong queued behind it) is not a half-open connection.
Pure unit on a clock of its own: the loop's `time` advances only as the fake connection says."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from listeners.config import RedisSettings
from listeners.publish.redis_subscriber import HalfOpen, RedisSubscriber


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class BusyPubSub:
    """Answers the PING only after `burst` messages, each `gap` seconds after the last on the
    clock, so the burst lasts several heartbeat timeouts; then silence: a dead connection."""

    def __init__(self, clock: Clock, burst: int, gap: float) -> None:
        self.clock, self.burst, self.gap = clock, burst, gap
        self.sent = 0

    async def ping(self) -> None:
        return None

    async def get_message(self, timeout: float) -> dict[str, Any] | None:
        if self.sent < self.burst:
            self.clock.now += self.gap
            self.sent += 1
            return {"type": "message", "channel": b"c", "data": b"%d" % self.sent}
        if self.sent == self.burst:
            self.sent += 1
            return {"type": "pong"}
        self.clock.now += timeout
        return None


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
    subscriber._channels.add("c")
    pubsub = BusyPubSub(clock, burst=100, gap=0.1)  # 10 s of messages before the pong
    with pytest.raises(HalfOpen):  # the silence after the burst, and only that
        await subscriber._read(pubsub)
    assert received == [b"%d" % n for n in range(1, 101)]


class TornDownPubSub:
    """redis-py's pub/sub as a command meets a connection being torn down."""

    async def subscribe(self, channel: str) -> None:
        raise AttributeError("'NoneType' object has no attribute 'send_packed_command'")

    async def unsubscribe(self, channel: str) -> None:
        raise RuntimeError("a connection being closed")


async def test_a_subscribe_that_meets_a_reconnecting_connection_keeps_the_channel() -> None:
    """The error stays in the subscriber: the channel is held, and sent again on reconnect."""
    subscriber = RedisSubscriber(RedisSettings(host="127.0.0.1"), "unit", lambda channel, data: None)
    subscriber._pubsub = TornDownPubSub()
    subscriber._ready.set()
    await subscriber.subscribe("user:a")
    assert subscriber.channels == {"user:a"} and not subscriber.is_confirmed("user:a")
    await subscriber.unsubscribe("user:a")
    assert subscriber.channels == frozenset()
