"""Real parts: a private redis-server and the Firestore emulator, one of each per test session.

Every test gets its own Firestore project id, so tests never see each other's documents.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from google.api_core import exceptions
from google.cloud import firestore

from listeners.config import TARGETS_PER_STREAM, FirebaseSettings, RedisSettings, Secret, Settings
from listeners_bridge.ordering import Ordering, Verdict
from listeners_bridge.reducers import DirectMessages, Notifications
from listeners_testkit.auth import LocalIssuer
from listeners_testkit.processes import GOOGLE, NPM, FirestoreEmulator, RedisServer, emulator_kind

CONTROL_TOKEN = "test-control-token-0123456789"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def emulator() -> Iterator[FirestoreEmulator]:
    with FirestoreEmulator() as server:
        os.environ["FIRESTORE_EMULATOR_HOST"] = server.host
        # for the services the tests start as child processes
        os.environ["LISTENERS_FIRESTORE_TARGETS_PER_STREAM"] = str(targets_per_stream(server.kind))
        yield server


def pytest_report_header(config: pytest.Config) -> str:
    return f"firestore emulator: {FirestoreEmulator.describe(emulator_kind())}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(f"firestore emulator: {FirestoreEmulator.describe(emulator_kind())}")


def google_emulator_only(why: str) -> pytest.MarkDecorator:
    """Skip on the npm fallback a test that only Google's own emulator can show, saying why."""
    return pytest.mark.skipif(
        emulator_kind() != GOOGLE,
        reason=f"only Google's own Firestore emulator can show this (the npm fallback runs): {why}",
    )


@pytest.fixture
def project_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings(redis_server: RedisServer, emulator: FirestoreEmulator, project_id: str) -> Settings:
    if redis_server.process is None:  # a fault test stopped it and failed before restarting
        redis_server.start()
    return Settings(
        redis=RedisSettings(host="127.0.0.1", port=redis_server.port, control_token=Secret(CONTROL_TOKEN)),
        firebase=FirebaseSettings(project_id=project_id, emulator_host=emulator.host),
        sweep_interval_seconds=0.2,
        instance_id="test",
        targets_per_stream=targets_per_stream(emulator.kind),
    )


def targets_per_stream(kind: str) -> int:
    """One per stream on the npm fallback, as the README prescribes: the package serves only a
    stream's first request (our launcher's shim serves every add and remove_target since)."""
    return 1 if kind == NPM else TARGETS_PER_STREAM


@pytest.fixture
def db(emulator: FirestoreEmulator, project_id: str) -> Iterator[firestore.Client]:
    client = firestore.Client(project=project_id)
    yield client
    client.close()


class Firebase:
    """Writes test data through the blocking SDK client, off the event loop."""

    def __init__(self, db: firestore.Client) -> None:
        self.db = db

    async def set(self, path: str, data: dict[str, Any]) -> None:
        await self._write(self.db.document(path).set, data)

    async def update(self, path: str, data: dict[str, Any]) -> None:
        await self._write(self.db.document(path).update, data)

    async def delete(self, path: str) -> None:
        await self._write(self.db.document(path).delete)

    @staticmethod
    async def _write(write: Callable[..., Any], *args: Any) -> None:
        """Retried on the transient errors a loaded emulator gives (it cancelled a commit once
        under load: 499 "call already cancelled"); each of these writes is idempotent."""
        for attempt in range(5):
            try:
                await asyncio.to_thread(write, *args)
                return
            except (exceptions.Cancelled, exceptions.ServiceUnavailable, exceptions.DeadlineExceeded):
                if attempt == 4:
                    raise
                await asyncio.sleep(0.2 * 2**attempt)

    async def online(
        self, uid: str, companies: list[str] | None = None, ttl: int = 90, heartbeat: Any = None
    ) -> None:
        await self.set(
            f"listeners_registry/{uid}",
            {
                "status": "online",
                "heartbeat_at": heartbeat or firestore.SERVER_TIMESTAMP,
                "ttl_seconds": ttl,
                "authorized_companies_ids": companies or [],
                "instance_id": "reflex-1",
            },
        )

    async def offline(self, uid: str) -> None:
        await self.update(f"listeners_registry/{uid}", {"status": "offline"})

    async def notification(self, uid: str, doc_id: str, **fields: Any) -> None:
        data = {
            "job_id": doc_id,
            "file_id": f"file-{doc_id}",
            "file_name": f"{doc_id}.pdf",
            "status": "completed",
            "collection_id": "c1",
            "collection_name": "Company 1",
            "function_name": "Router",
            "timestamp": datetime.now(UTC).replace(tzinfo=None).isoformat(),
            "read": False,
            "additional_info": json.dumps({"message": "ok"}),
        }
        data.update(fields)
        await self.set(f"clients/{uid}/notifications/{doc_id}", data)


@pytest.fixture
def fb(db: firestore.Client) -> Firebase:
    return Firebase(db)


class Consumer:
    """A Redis subscriber on exact channels, as the Reflex bridge is (no PSUBSCRIBE)."""

    def __init__(self, client: aioredis.Redis, channels: list[str]) -> None:
        self.client = client
        self.channels = channels
        self.events: list[dict[str, Any]] = []
        self._pubsub = client.pubsub()
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        await self._pubsub.subscribe(*self.channels)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except (OSError, RuntimeError, aioredis.RedisError):
                await asyncio.sleep(0.1)  # Redis restarted by a fault test: subscribe again
                try:
                    await self._pubsub.aclose()
                    self._pubsub = self.client.pubsub()
                    await self._pubsub.subscribe(*self.channels)
                except (OSError, aioredis.RedisError):
                    pass
                continue
            if message is not None:
                self.events.append(json.loads(message["data"]))
                self._changed.set()

    async def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while not predicate(self.events):
                self._changed.clear()
                await self._changed.wait()
        return self.events

    def mark(self) -> int:
        """Where the events received so far end: pass it to `until_sentinel`."""
        return len(self.events)

    async def until_sentinel(
        self,
        since: int,
        write: Callable[[], Awaitable[object]],
        is_sentinel: Callable[[dict[str, Any]], bool],
        timeout: float = 30.0,
    ) -> list[dict[str, Any]]:
        """The events received after `since` and before the sentinel's.

        A "nothing else arrives" check never sleeps: it writes a sentinel change *after* the
        change under test, on the same stream (so it is published after it), waits for the
        sentinel's event and asserts on what came in between. A late event then fails the test
        instead of passing it.
        """
        await write()
        await self.wait_for(lambda events: any(is_sentinel(e) for e in events[since:]), timeout)
        between = self.events[since:]
        return between[: next(i for i, e in enumerate(between) if is_sentinel(e))]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    def last_sync(self) -> dict[str, Any] | None:
        syncs = self.of_type("notif.sync")
        return syncs[-1] if syncs else None

    def doc_ids(self, family: str = "notif") -> list[str]:
        """The list a consumer holds after these events (the bridge's order rules and
        reducers), as doc ids: what a sync after each change used to show."""
        ordering = Ordering()
        reducer: Any = Notifications() if family == "notif" else DirectMessages()
        for event in self.events:
            if event["type"].startswith(family + ".") and ordering.admit(event) is Verdict.APPLY:
                reducer.apply(event)
        items = reducer.items if family == "notif" else reducer.view["messages"]
        return [item["doc_id"] for item in items]

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        with contextlib.suppress(OSError, aioredis.RedisError):
            await self._pubsub.aclose()


@pytest.fixture
async def subscribe(redis_server: RedisServer) -> AsyncIterator[Callable[..., Any]]:
    consumers: list[Consumer] = []
    client = aioredis.Redis(host="127.0.0.1", port=redis_server.port)

    async def make(*uids: str, prefix: str = "user:") -> Consumer:
        consumer = Consumer(client, [f"{prefix}{uid}" for uid in uids])
        await consumer.start()
        consumers.append(consumer)
        return consumer

    yield make
    for consumer in consumers:
        await consumer.stop()
    with contextlib.suppress(OSError, aioredis.ConnectionError):
        await client.aclose()


@pytest.fixture(scope="session")
def issuer_and_url() -> Iterator[tuple[LocalIssuer, str]]:
    """A local Firebase Auth stand-in: signs ID tokens, serves its certificates over HTTP."""
    issuer = LocalIssuer("placeholder")
    url = issuer.serve()
    yield issuer, url
    issuer.close()


@pytest.fixture
def issuer(issuer_and_url: tuple[LocalIssuer, str], project_id: str) -> LocalIssuer:
    found, _ = issuer_and_url
    found.project_id = project_id  # tokens for this test's Firebase project
    return found


def iso_ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()


async def wait_until(condition: Callable[[], object], timeout: float = 30.0) -> None:
    """Polls `condition` until it is true; TimeoutError after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


def service_env(
    redis_port: int, project: str, control_token: str = CONTROL_TOKEN, **extra: str
) -> dict[str, str]:
    """The environment of a service process (`uvicorn app.main:app`) in a test: this process's,
    without any setting of ours, plus Redis, the emulator, the project and the control token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTENERS_", "FIREBASE", "GOOGLE_"))}
    env.update(
        # what the emulator fixture chose for the children: one target per stream on npm's
        LISTENERS_FIRESTORE_TARGETS_PER_STREAM=os.environ["LISTENERS_FIRESTORE_TARGETS_PER_STREAM"],
        LISTENERS_REDIS_HOST="127.0.0.1",
        LISTENERS_REDIS_PORT=str(redis_port),
        LISTENERS_CONTROL_TOKEN=control_token,
        FIRESTORE_EMULATOR_HOST=os.environ["FIRESTORE_EMULATOR_HOST"],
        FIREBASE_PROJECT_ID=project,
    )
    env.update(extra)  # may override any of the above
    return env


def register_online(db: firestore.Client, uids: Iterable[str]) -> None:
    """Registry entries online until 2999, in one batch: written before the services start, so
    that they are in the registry watch's first snapshot."""
    batch = db.batch()
    for uid in uids:
        batch.set(
            db.document(f"listeners_registry/{uid}"),
            {"status": "online", "heartbeat_at": "2999-01-01T00:00:00Z"},
        )
    batch.commit()
