"""Membership through a Redis outage that every instance sees: nobody takes everyone's users.

Two `Membership`s against a private redis-server, each through its own `TcpProxy`. Both
proxies are blackholed until both entries have expired in Redis's own clock (the members
could not renew them), then healed. The first member back must not read the other's expired
entry as a departure: its view would shrink to itself, and it would take every user and hand
them back a beat later (issue 15, "Redis blackholed during a takeover").
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Iterator
from typing import cast

import pytest
import redis.asyncio as aioredis

from listeners.cluster import MEMBERS_KEY, Membership
from listeners.config import RedisSettings
from listeners_bridge.redis import RedisBroker
from listeners_testkit.processes import RedisServer
from listeners_testkit.proxy import TcpProxy

pytestmark = pytest.mark.asyncio

TTL = 2.0
BEAT = 0.25


@pytest.fixture(scope="module")
def private_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


class Member:
    def __init__(self, name: str, proxy: TcpProxy) -> None:
        settings = RedisSettings(host="127.0.0.1", port=proxy.port)
        self.broker = RedisBroker(settings)
        self.membership = Membership(settings, name, broker=self.broker, ttl_seconds=TTL, beat_seconds=BEAT)
        self.views: list[tuple[str, ...]] = []
        self.membership.on_change(lambda: self.views.append(self.membership.members))
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.membership.run())

    async def stop(self) -> None:
        try:
            async with asyncio.timeout(30):  # a membership must end when cancelled
                if self.task is not None:
                    self.task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self.task
                await self.broker.disconnect()
        except TimeoutError:
            stacks = io.StringIO()
            for task in asyncio.all_tasks():
                task.print_stack(file=stacks)
            raise AssertionError(f"membership did not stop when cancelled:\n{stacks.getvalue()}") from None


@pytest.fixture
async def members(private_redis: RedisServer) -> AsyncIterator[tuple[Member, Member, TcpProxy, TcpProxy]]:
    client = aioredis.Redis(port=private_redis.port)
    await client.delete(MEMBERS_KEY)
    await client.aclose()
    with TcpProxy(private_redis.port) as pa, TcpProxy(private_redis.port) as pb:
        a, b = Member("a", pa), Member("b", pb)
        a.start()
        b.start()
        try:
            yield a, b, pa, pb
        finally:
            await a.stop()
            await b.stop()


async def entries(redis: RedisServer) -> tuple[dict[str, float], float]:
    """The membership entries' expiries and Redis's time, read directly (not via a proxy)."""
    client = aioredis.Redis(port=redis.port)
    try:
        found = cast(list[tuple[bytes, float]], await client.zrange(MEMBERS_KEY, 0, -1, withscores=True))
        seconds, micros = await client.time()
        return {name.decode().partition("#")[0]: score for name, score in found}, seconds + micros / 1e6
    finally:
        await client.aclose()


async def until(condition: object, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():  # type: ignore[operator]
            await asyncio.sleep(0.05)


async def test_an_outage_for_everyone_does_not_shrink_the_view(
    members: tuple[Member, Member, TcpProxy, TcpProxy], private_redis: RedisServer
) -> None:
    a, b, pa, pb = members

    async def both_joined() -> bool:
        return a.membership.members == b.membership.members == ("a", "b")

    await until(both_joined)
    a.views.clear()
    b.views.clear()
    pa.blackhole()
    pb.blackhole()

    async def both_expired() -> bool:
        found, now = await entries(private_redis)
        return set(found) == {"a", "b"} and all(expiry < now for expiry in found.values())

    await until(both_expired)
    pa.thaw()
    pb.thaw()

    async def both_renewed() -> bool:
        found, now = await entries(private_redis)
        return set(found) == {"a", "b"} and all(expiry > now for expiry in found.values())

    await until(both_renewed)
    # The first one back removed the other's expired entry; the other re-added it. Whatever
    # the order, neither view lost the other: no user moved.
    assert a.membership.members == b.membership.members == ("a", "b")
    assert all(view == ("a", "b") for view in a.views + b.views), (a.views, b.views)


CLOSED_TRANSPORT = "unable to perform operation on <TCPTransport closed=True>; the handler is closed"


class FailingBeats:
    """Wraps a membership's heartbeat: raises `failure` while `failing`, counts good beats."""

    def __init__(self, membership: Membership, failure: Exception) -> None:
        self.failure = failure
        self.failing = False
        self.good = 0
        beat = membership._heartbeat

        async def heartbeat(client: aioredis.Redis) -> None:
            if self.failing:
                raise self.failure
            await beat(client)
            self.good += 1

        membership._heartbeat = heartbeat  # type: ignore[method-assign]


@pytest.mark.parametrize("fault", ["closed-transport", "task-restarted"])
async def test_a_membership_cut_off_by_any_fault_keeps_its_view_for_a_grace(
    members: tuple[Member, Member, TcpProxy, TcpProxy], private_redis: RedisServer, fault: str
) -> None:
    """A closed transport is a connection failure (the task goes on); a task that dies of
    anything and is restarted starts as after an outage. Either way, a member whose entry
    expired while we could not beat is kept for a grace, not dropped at once."""
    a, b, _, _ = members
    await until(lambda: _async(a.membership.members == ("a", "b")))
    failure: Exception = RuntimeError(CLOSED_TRANSPORT) if fault == "closed-transport" else KeyError("a bug")
    beats = FailingBeats(a.membership, failure)
    views_before = len(a.views)
    beats.failing = True
    await b.stop()  # b's entry now expires in Redis; a cannot beat meanwhile

    async def b_expired() -> bool:
        found, now = await entries(private_redis)
        return "b" not in found or found["b"] < now

    await until(b_expired)
    assert a.task is not None
    if fault == "closed-transport":
        assert not a.task.done(), "a closed transport killed the membership task"
    else:
        with contextlib.suppress(KeyError):
            await a.task  # the bug ends the run; the supervisor would start it again
        a.start()
    seen = beats.good
    beats.failing = False
    await until(lambda: _async(beats.good > seen + 1))
    assert "b" in a.membership.members  # kept for the grace, although its entry is gone
    assert ("a",) not in a.views[views_before:]


async def _async(value: bool) -> bool:
    return value
