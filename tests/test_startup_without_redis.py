"""Redis unreachable at start: no instance serves users it cannot coordinate.

The rule (docs/scaling.md): an instance serves a user only once it has joined the membership
in Redis, since only that tells it which users are its own. Until then it serves nobody, and
so nobody is served twice. A deployment of exactly one instance can opt in to serving every
user without Redis (`LISTENERS_SINGLE_INSTANCE=true`): there is nobody to agree with.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import pytest

from listeners.assemble import running
from listeners.config import Settings
from listeners.service import Service
from listeners_testkit.processes import RedisServer
from tests.conftest import Firebase, wait_until

pytestmark = pytest.mark.asyncio

USERS = [f"nr-{i}" for i in range(12)]


@contextlib.asynccontextmanager
async def instances(settings: Settings, count: int, **overrides: object) -> AsyncIterator[list[Service]]:
    async with contextlib.AsyncExitStack() as stack:
        services = []
        for i in range(count):
            own = dataclasses.replace(settings, instance_id=f"nr-instance-{i}", **overrides)  # type: ignore[arg-type]
            services.append(await stack.enter_async_context(running(own)))
        yield services


async def registry_seen(services: list[Service]) -> None:
    """Every instance has read every user's online entry: had it been going to attach them,
    it would have done so by now (attaching follows reading in the same reconcile)."""
    await wait_until(
        lambda: (
            all(s.node.entry(uid) is not None for s in services for uid in USERS)
            and not any(s.node.pending for s in services)
        ),
        timeout=60,
    )


async def test_three_instances_serve_nobody_until_redis_is_there_then_each_user_once(
    settings: Settings, fb: Firebase
) -> None:
    redis = RedisServer()  # not started yet: Redis is unreachable when the instances start
    offline = dataclasses.replace(settings, redis=dataclasses.replace(settings.redis, port=redis.port))
    try:
        async with instances(offline, 3) as services:
            for uid in USERS:
                await fb.online(uid)
            await registry_seen(services)
            assert [len(s.node.sessions) for s in services] == [0, 0, 0]
            assert all(s.health()["redis"] == "down" for s in services)

            await asyncio.to_thread(redis.start)
            await wait_until(lambda: all(len(s.membership.members) == 3 for s in services), timeout=60)
            await wait_until(lambda: sum(len(s.node.sessions) for s in services) == len(USERS), timeout=60)
            served = [uid for s in services for uid in s.node.sessions]
            assert sorted(served) == sorted(USERS)  # each user on exactly one instance
            assert all(s.node.sessions for s in services)  # and shared out among them
    finally:
        await asyncio.to_thread(redis.stop)
        redis.cleanup()


async def test_a_single_instance_deployment_may_serve_without_redis(settings: Settings, fb: Firebase) -> None:
    redis = RedisServer()  # never started
    offline = dataclasses.replace(settings, redis=dataclasses.replace(settings.redis, port=redis.port))
    try:
        async with instances(offline, 1, single_instance=True) as services:
            for uid in USERS:
                await fb.online(uid)
            await wait_until(lambda: len(services[0].node.sessions) == len(USERS), timeout=60)
            assert services[0].health()["redis"] == "down"
    finally:
        redis.cleanup()
