"""Presence bookkeeping as a pure unit: failing writes never reach the page, and are retried."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from listeners_bridge import Presence

pytestmark = pytest.mark.asyncio


class FlakyDocument:
    def __init__(self, db: FlakyDb) -> None:
        self.db = db

    async def set(self, data: dict[str, Any], merge: bool = False) -> Any:
        assert merge, "presence merges: it never replaces fields it does not own"
        self.db.writes.append(data)
        self.db.calls.append(("set", data["status"]))
        if self.db.failures > 0:
            self.db.failures -= 1
            raise ConnectionError("firestore unreachable")
        return type("Result", (), {"update_time": len(self.db.calls)})()

    async def update(self, data: dict[str, Any], option: Any = None) -> None:
        self.db.calls.append(("update", data["status"]))


class FlakyDb:
    """Stands in for firestore.AsyncClient: only the calls Presence makes."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[tuple[str, str]] = []
        self.writes: list[dict[str, Any]] = []

    def collection(self, name: str) -> FlakyDb:
        return self

    def document(self, uid: str) -> FlakyDocument:
        return FlakyDocument(self)

    def write_option(self, **kwargs: Any) -> dict[str, Any]:
        return kwargs


async def test_failing_heartbeats_are_retried_and_never_raised() -> None:
    db = FlakyDb(failures=2)
    presence = Presence(db, heartbeat_seconds=0.05)
    presence._backoff = type(presence._backoff)(base=0.01, cap=0.02)
    async with presence.online("u1"):
        async with asyncio.timeout(30):
            await presence.wait_written("u1")
            while db.calls.count(("set", "online")) < 4:  # heartbeats go on after the success
                await asyncio.sleep(0.01)
    assert db.calls[:3] == [("set", "online")] * 3  # two failures, then success
    assert db.calls[-1] == ("update", "offline")


async def test_reference_counted_per_user() -> None:
    db = FlakyDb(failures=0)
    presence = Presence(db, heartbeat_seconds=10)
    async with presence.online("u1"):
        async with presence.online("u1"):
            await presence.wait_written("u1")
        assert presence.sessions("u1") == 1 and ("update", "offline") not in db.calls
    assert presence.sessions("u1") == 0 and db.calls[-1] == ("update", "offline")


async def test_fields_not_given_are_left_alone() -> None:
    db = FlakyDb(failures=0)
    presence = Presence(db, heartbeat_seconds=10)
    async with presence.online("u1"):  # as WebSocket presence does: it knows no companies
        await presence.wait_written("u1")
    async with presence.online("u2", companies=["acme"]):
        await presence.wait_written("u2")
    assert "authorized_companies_ids" not in db.writes[0] and "chat_threads" not in db.writes[0]
    assert db.writes[1]["authorized_companies_ids"] == ["acme"]
