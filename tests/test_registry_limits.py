"""Registry values out of range never stop the node's sweeps (issue: `ttl_seconds: 1e20` or a
heartbeat in the year 9999 overflowed the date arithmetic and ended the supervisor for good,
after which nothing expired and no watch was replaced, while /healthz still said "ok")."""

from __future__ import annotations

import time

import pytest
from google.cloud import firestore

from listeners.config import Settings
from tests.conftest import Firebase, wait_until
from tests.test_pipeline import serving

pytestmark = pytest.mark.asyncio


async def test_out_of_range_ttl_and_heartbeat_are_clamped_and_expiry_goes_on(
    settings: Settings, fb: Firebase
) -> None:
    async with serving(settings, fb) as service:
        await fb.set(
            "listeners_registry/huge-ttl",
            {"status": "online", "heartbeat_at": firestore.SERVER_TIMESTAMP, "ttl_seconds": 1e20},
        )
        await fb.online("far-future", heartbeat="9999-12-31T23:59:59Z")
        await wait_until(lambda: {"huge-ttl", "far-future"} <= set(service.node.sessions))
        entries = service.node.entry("huge-ttl"), service.node.entry("far-future")
        assert entries[0] is not None and entries[0].ttl_seconds == 86_400
        assert entries[1] is not None and entries[1].heartbeat_at.year < 9999
        # the sweeps go on: a short-lived user still expires, with no write at all
        started = time.time()
        await fb.online("short", ttl=3)
        await wait_until(lambda: "short" in service.node.sessions)
        await wait_until(lambda: "short" not in service.node.sessions, timeout=60)
        assert time.time() - started >= 3
        assert service.metrics.detaches.labels("expired")._value.get() == 1
        assert not any(service.supervisor.restarts.values())
