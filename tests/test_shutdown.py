"""Stopping: from SIGTERM on, the instance takes nobody new, hands its users over at once, and
its shutdown shares one budget."""

from __future__ import annotations

import pytest

from listeners.assemble import running
from listeners.config import Settings
from tests.conftest import Firebase, wait_until

pytestmark = pytest.mark.asyncio


async def test_a_stopping_instance_attaches_nobody_and_leaves_at_once(
    settings: Settings, fb: Firebase
) -> None:
    async with running(settings) as service:
        await fb.online("early")
        await wait_until(lambda: "early" in service.node.sessions)
        leaving = service.begin_stop()  # what SIGTERM does, before the server has closed its connections
        assert service.stopping and service.health()["status"] == "degraded"
        await fb.online("late")
        await wait_until(lambda: service.node.entry("late") is not None and not service.node.pending)
        assert set(service.node.sessions) == {"early"}  # still served until the shutdown; nobody new
        await wait_until(leaving.done)
        assert service.begin_stop() is leaving  # a second signal starts nothing new
        assert service.time_left(100.0) <= settings.shutdown_timeout_seconds
