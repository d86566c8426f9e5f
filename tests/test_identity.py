"""Instance identity: processes sharing a host each get their own id; a duplicated id is refused.

Real service processes (uvicorn app.main:app) on this one host, one private redis-server, the
emulator. Every write must be published exactly once, counted on the user channels up to a
sentinel write made after it.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis.asyncio as aioredis
from google.cloud import firestore

from listeners.cluster import MEMBERS_KEY, entry_id, owner
from listeners_testkit.processes import FirestoreEmulator, RedisServer, ServiceProcess
from tests.conftest import register_online, service_env
from tests.test_cluster import ADMIN, CONTROL, USERS, Recorder

pytestmark = pytest.mark.asyncio

SERVED = USERS[:24]


class Process:
    """One service process; `instance_id=None` leaves LISTENERS_INSTANCE_ID unset (the default)."""

    def __init__(
        self, name: str, redis: RedisServer, project: str, instance_id: str | None, *, listen: bool = True
    ) -> None:
        env = service_env(redis.port, project, CONTROL, LISTENERS_ADMIN_TOKEN=ADMIN, LOG_LEVEL="INFO")
        if instance_id is not None:
            env["LISTENERS_INSTANCE_ID"] = instance_id
        self.log_path = Path(redis.workdir) / f"{name}.log"
        self.service = ServiceProcess(env, log_path=self.log_path)
        self.process = self.service.process
        self.port = self.service.port
        if listen:
            self.service.wait_listening(120)
        self.id: str = self.version()["instance_id"] if listen else (instance_id or "")

    def version(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"http://127.0.0.1:{self.port}/version", timeout=30).json()
        return body

    def count(self) -> int:
        try:
            return int(
                httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=30).json()["listeners_count"]
            )
        except httpx.HTTPError:
            return -1

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return self.service.stop(sig)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def project(emulator: FirestoreEmulator) -> Iterator[tuple[str, firestore.Client]]:
    name = f"identity-{uuid.uuid4().hex[:8]}"
    db = firestore.Client(project=name)
    register_online(db, SERVED)
    yield name, db
    db.close()


@pytest.fixture
async def recorder(redis_server: RedisServer) -> AsyncIterator[Recorder]:
    recording = Recorder(redis_server)
    await recording.start()
    yield recording
    await recording.stop()


async def member_entries(redis: RedisServer) -> list[str]:
    client = aioredis.Redis(port=redis.port)
    try:
        return [m.decode() for m in cast(list[bytes], await client.zrange(MEMBERS_KEY, 0, -1))]
    finally:
        await client.aclose()


async def settled(processes: list[Process], redis: RedisServer, timeout: float = 120.0) -> None:
    """Each live process serves the users rendezvous hashing gives its id, over the ids in Redis."""
    deadline = time.monotonic() + timeout
    while True:
        ids = tuple(sorted({entry_id(e) for e in await member_entries(redis)}))
        live = [p for p in processes if p.process.poll() is None]
        counts = [await asyncio.to_thread(p.count) for p in live]
        expected = [sum(1 for uid in SERVED if ids and owner(uid, ids) == p.id) for p in live]
        if ids and counts == expected and all(p.id in ids for p in live):
            return
        assert time.monotonic() < deadline, f"not settled: ids {ids}, counts {counts} != {expected}"
        await asyncio.sleep(0.3)


async def write(db: firestore.Client, uid: str, doc_id: str) -> None:
    await asyncio.to_thread(
        db.document(f"clients/{uid}/notifications/{doc_id}").set,
        {"read": False, "file_name": doc_id, "timestamp": "2025-01-01 00:00:00"},
    )


async def published_once(recorder: Recorder, db: firestore.Client, tag: str) -> Counter[tuple[str, str]]:
    """Write one change per user, then a sentinel per user: how often each change was published."""
    await recorder.resynced(SERVED, timeout=120)
    since = recorder.mark()
    for uid in SERVED:
        await write(db, uid, f"{tag}-{uid}")

    async def sentinels() -> None:
        for uid in SERVED:
            await write(db, uid, f"{tag}-sentinel-{uid}")

    between = await recorder.until_sentinels(
        since, sentinels, {(uid, f"{tag}-sentinel-{uid}") for uid in SERVED}
    )
    return recorder.adds(between)


@pytest.mark.timeout(300)
async def test_processes_on_one_host_get_their_own_ids_and_publish_once(
    redis_server: RedisServer, project: tuple[str, firestore.Client], recorder: Recorder
) -> None:
    name, db = project
    processes = []
    try:
        for n in range(3):  # no LISTENERS_INSTANCE_ID: the default, as uvicorn --workers would run
            processes.append(await asyncio.to_thread(Process, f"p{n}", redis_server, name, None))
        await settled(processes, redis_server)
        published = await published_once(recorder, db, "once")
        # With the host name as the default id, all three believed they owned every user: 3 each.
        assert published == {(uid, f"once-{uid}"): 1 for uid in SERVED}, Counter(published.values())
        ids = [p.id for p in processes]
        host = socket.gethostname()
        assert len(set(ids)) == 3 and all(
            i.startswith(f"{host}-{p.process.pid}-") for i, p in zip(ids, processes, strict=True)
        ), ids
    finally:
        for p in processes:
            p.stop(signal.SIGKILL)


@pytest.mark.timeout(480)
async def test_a_second_process_with_the_same_id_refuses_to_serve(
    redis_server: RedisServer, project: tuple[str, firestore.Client], recorder: Recorder
) -> None:
    name, db = project
    first = await asyncio.to_thread(Process, "first", redis_server, name, "dup")
    processes = [first]
    try:
        await settled(processes, redis_server)
        second = await asyncio.to_thread(Process, "second", redis_server, name, "dup", listen=False)
        processes.append(second)
        try:
            code = await asyncio.to_thread(second.process.wait, 90)
        except subprocess.TimeoutExpired:
            pytest.fail("the second process with the same instance id is still running: it serves too")
        assert code != 0
        log = second.log()
        assert "instance id in use, refusing to serve" in log and "is held by another live process" in log, (
            log
        )
        print(next(line for line in log.splitlines() if "refusing to serve" in line), f"exit status {code}")
        assert first.process.poll() is None
        assert [entry_id(e) for e in await member_entries(redis_server)] == ["dup"]
        published = await published_once(recorder, db, "dup")
        assert published == {(uid, f"dup-{uid}"): 1 for uid in SERVED}, Counter(published.values())

        # The holder dies without leaving: its entry expires after the membership TTL, and a
        # process started with the same id meanwhile waits for that, then serves.
        first.stop(signal.SIGKILL)
        third = await asyncio.to_thread(Process, "third", redis_server, name, "dup")
        processes.append(third)
        await settled([third], redis_server)
        assert third.process.poll() is None
        published = await published_once(recorder, db, "after")
        assert published == {(uid, f"after-{uid}"): 1 for uid in SERVED}, Counter(published.values())
    finally:
        for p in processes:
            p.stop(signal.SIGKILL)
