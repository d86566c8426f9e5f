"""The service on the npm fallback emulator (@firestore-emulator/server), whichever emulator the
session runs: an emulator of this module's own, with one target per stream as the docs prescribe.

Issue 23, item 6: user A goes offline, then user B comes online. A's notifications stream, now
empty, stays open and takes B's target; the npm package serves only the first request of a
Listen stream, so B's add_target went unanswered and B never got its `notif.sync`. The shim in
tools/firestore-emulator.js serves every add_target and remove_target.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from google.cloud import firestore

from listeners.assemble import running
from listeners.config import FirebaseSettings, RedisSettings, Secret, Settings
from listeners.service import Service
from listeners_testkit.processes import NPM, PROJECT_ROOT, FirestoreEmulator, RedisServer
from tests.conftest import CONTROL_TOKEN, Consumer, Firebase, wait_until

pytestmark = pytest.mark.asyncio

NPM_PACKAGE = PROJECT_ROOT / "node_modules" / "@firestore-emulator" / "server"
WAIT = 60.0  # generous: a loaded 2-core machine; the test waits on events, never sleeps


@pytest.fixture(scope="module")
def npm_emulator() -> Iterator[FirestoreEmulator]:
    if not NPM_PACKAGE.exists():
        pytest.skip(f"the npm emulator is not installed ({NPM_PACKAGE}): run scripts/bootstrap")
    with FirestoreEmulator(kind=NPM) as server:
        yield server


@pytest.fixture
def npm_fb(npm_emulator: FirestoreEmulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[Firebase]:
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", npm_emulator.host)  # read by the SDK client
    client = firestore.Client(project=f"test-{uuid.uuid4().hex[:12]}")
    yield Firebase(client)
    client.close()


@contextlib.asynccontextmanager
async def serving_on_npm(
    redis_server: RedisServer, emulator: FirestoreEmulator, fb: Firebase
) -> AsyncIterator[Service]:
    if redis_server.process is None:  # a fault test stopped it and failed before restarting
        redis_server.start()
    settings = Settings(
        redis=RedisSettings(host="127.0.0.1", port=redis_server.port, control_token=Secret(CONTROL_TOKEN)),
        firebase=FirebaseSettings(project_id=fb.db.project, emulator_host=emulator.host),
        sweep_interval_seconds=0.2,
        instance_id="test",
        targets_per_stream=1,  # what the docs prescribe on the fallback
    )
    async with running(settings) as service:
        yield service


def is_sync(uid: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: any(e["type"] == "notif.sync" and e["uid"] == uid for e in events)


async def test_a_user_online_after_another_went_offline_gets_its_sync(
    redis_server: RedisServer, npm_emulator: FirestoreEmulator, npm_fb: Firebase, subscribe: Any
) -> None:
    fb = npm_fb
    consumer: Consumer = await subscribe("ann", "ben")
    await fb.notification("ben", "b1")
    async with serving_on_npm(redis_server, npm_emulator, fb) as service:
        await fb.online("ann")
        await consumer.wait_for(is_sync("ann"), WAIT)
        await fb.offline("ann")
        await wait_until(lambda: "ann" not in service.node.sessions, WAIT)
        await fb.online("ben")
        events = await consumer.wait_for(is_sync("ben"), WAIT)
    sync = next(e for e in events if e["type"] == "notif.sync" and e["uid"] == "ben")
    assert [n["doc_id"] for n in sync["payload"]["notifications"]] == ["b1"]
