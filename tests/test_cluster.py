"""Several instances: each user served by exactly one, failover, handover and rebalance.

Real service processes (uvicorn app.main:app), one private redis-server, the emulator.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from google.cloud import firestore

from listeners.cluster import owner
from listeners.local.processes import FirestoreEmulator, RedisServer, ServiceProcess

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "cluster-admin-token-0123456789"
USERS = [f"cu{i:03d}" for i in range(80)]


class Instance:
    def __init__(
        self, instance_id: str, redis: RedisServer, emulator: FirestoreEmulator, project: str
    ) -> None:
        self.id = instance_id
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTENERS_", "FIREBASE", "GOOGLE_"))}
        env.update(
            LISTENERS_REDIS_HOST="127.0.0.1",
            LISTENERS_REDIS_PORT=str(redis.port),
            LISTENERS_INSTANCE_ID=instance_id,
            LISTENERS_ADMIN_TOKEN=ADMIN,
            LISTENERS_CONTROL_TOKEN="cluster-control-token-0123",
            FIRESTORE_EMULATOR_HOST=emulator.host,
            FIREBASE_PROJECT_ID=project,
            LOG_LEVEL="WARNING",
        )
        self.service = ServiceProcess(env, log_path=Path(redis.workdir) / f"{instance_id}.log")
        self.process = self.service.process
        self.port = self.service.port
        self.service.wait_listening()

    def count(self) -> int:
        try:
            return int(
                httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=5).json()["listeners_count"]
            )
        except httpx.HTTPError:
            return -1

    def user(self, uid: str) -> dict[str, Any]:
        response = httpx.get(
            f"http://127.0.0.1:{self.port}/v1/users/{uid}",
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=5,
        )
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.service.stop(sig)


class Recorder:
    """Every event of every user, with its arrival time (exact SUBSCRIBE per channel)."""

    def __init__(self, redis: RedisServer) -> None:
        self.client = aioredis.Redis(port=redis.port)
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0.5)

    async def _run(self) -> None:
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(*(f"user:{uid}" for uid in USERS))
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self.events.append((time.monotonic(), json.loads(message["data"])))
            except (OSError, aioredis.RedisError):
                await asyncio.sleep(0.2)

    def adds(self) -> Counter[tuple[str, str]]:
        return Counter((e["uid"], e["payload"]["doc_id"]) for _, e in self.events if e["type"] == "notif.add")

    def seen(self, uid: str, doc_id: str) -> float | None:
        """When the document first reached the user's consumer, by delta or by sync."""
        for at, e in self.events:
            if e["uid"] != uid:
                continue
            if e["type"] == "notif.add" and e["payload"]["doc_id"] == doc_id:
                return at
            if e["type"] == "notif.sync" and any(
                n["doc_id"] == doc_id for n in e["payload"]["notifications"]
            ):
                return at
        return None

    def syncs_after(self, uid: str, moment: float) -> int:
        return sum(
            1 for at, e in self.events if e["uid"] == uid and e["type"] == "notif.sync" and at > moment
        )

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self.client.aclose()


@pytest.fixture(scope="module")
def cluster_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def cluster(cluster_redis: RedisServer, emulator: FirestoreEmulator) -> Iterator[dict[str, Any]]:
    project = f"cluster-{uuid.uuid4().hex[:8]}"
    db = firestore.Client(project=project)
    batch = db.batch()
    for uid in USERS:
        batch.set(
            db.document(f"listeners_registry/{uid}"),
            {"status": "online", "heartbeat_at": "2999-01-01T00:00:00Z"},
        )
    batch.commit()
    state: dict[str, Any] = {"db": db, "instances": {}, "project": project}
    for name in ("i1", "i2", "i3"):
        state["instances"][name] = Instance(name, cluster_redis, emulator, project)
    yield state
    for instance in state["instances"].values():
        instance.stop(signal.SIGKILL)
    db.close()


@pytest.fixture
async def recorder(cluster_redis: RedisServer) -> AsyncIterator[Recorder]:
    recording = Recorder(cluster_redis)
    await recording.start()
    yield recording
    await recording.stop()


def live(cluster: dict[str, Any]) -> dict[str, Instance]:
    return {k: v for k, v in cluster["instances"].items() if v.process.poll() is None}


async def settled(cluster: dict[str, Any], timeout: float = 30.0) -> dict[str, int]:
    """Wait until the live instances serve every user exactly as rendezvous hashing says."""
    deadline = time.monotonic() + timeout
    while True:
        instances = live(cluster)
        expected = Counter(owner(uid, tuple(sorted(instances))) for uid in USERS)
        counts = {name: await asyncio.to_thread(i.count) for name, i in instances.items()}
        if counts == dict(expected):
            return counts
        assert time.monotonic() < deadline, f"not settled: {counts} != {dict(expected)}"
        await asyncio.sleep(0.3)


async def write(cluster: dict[str, Any], uid: str, doc_id: str) -> float:
    sent = time.monotonic()
    await asyncio.to_thread(
        cluster["db"].document(f"clients/{uid}/notifications/{doc_id}").set,
        {"read": False, "file_name": doc_id, "timestamp": "2025-01-01 00:00:00"},
    )
    return sent


async def test_users_are_spread_with_one_publisher_each(cluster: dict[str, Any], recorder: Recorder) -> None:
    counts = await settled(cluster)
    assert len(counts) == 3 and sum(counts.values()) == len(USERS) and min(counts.values()) > 0
    instance = cluster["instances"]["i1"]
    described = await asyncio.to_thread(instance.user, USERS[0])
    assert described["owner"] == owner(USERS[0], ("i1", "i2", "i3"))
    assert described["attached_here"] == (described["owner"] == "i1")
    for uid in USERS:
        await write(cluster, uid, f"spread-{uid}")
    async with asyncio.timeout(30):
        while len(recorder.adds()) < len(USERS):
            await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    assert set(recorder.adds().values()) == {1}  # each change published once, by one instance
    metrics = httpx.get(f"http://127.0.0.1:{instance.port}/metrics", timeout=5).text
    assert (
        'listeners_instance{instance_id="i1"} 1.0' in metrics and "listeners_cluster_members 3.0" in metrics
    )


async def test_kill_9_is_taken_over_within_15_s(cluster: dict[str, Any], recorder: Recorder) -> None:
    await settled(cluster)
    victims = [uid for uid in USERS if owner(uid, ("i1", "i2", "i3")) == "i3"]
    killed_at = time.monotonic()
    cluster["instances"]["i3"].stop(signal.SIGKILL)
    async with asyncio.timeout(15):
        while not all(recorder.syncs_after(uid, killed_at) for uid in victims):
            await asyncio.sleep(0.2)
    took = time.monotonic() - killed_at
    await settled(cluster)
    for uid in victims:  # their consumers converge: new changes arrive
        await write(cluster, uid, f"after-kill-{uid}")
    async with asyncio.timeout(20):
        while not all(recorder.seen(uid, f"after-kill-{uid}") for uid in victims):
            await asyncio.sleep(0.2)
    print(f"takeover of {len(victims)} users after kill -9: {took:.1f} s")


async def test_sigterm_hands_over_without_a_gap(
    cluster: dict[str, Any], recorder: Recorder, cluster_redis: RedisServer, emulator: FirestoreEmulator
) -> None:
    cluster["instances"]["i3"] = Instance("i3", cluster_redis, emulator, cluster["project"])
    await settled(cluster)
    movers = [uid for uid in USERS if owner(uid, ("i1", "i2", "i3")) == "i2"][:8]
    writes: dict[tuple[str, str], float] = {}
    stopping = asyncio.create_task(asyncio.to_thread(cluster["instances"]["i2"].stop, signal.SIGTERM))
    for n in range(24):  # a change every 0.25 s across the handover
        uid = movers[n % len(movers)]
        writes[(uid, f"handover-{n}")] = await write(cluster, uid, f"handover-{n}")
        await asyncio.sleep(0.25)
    await stopping
    await asyncio.sleep(3)
    delays = {key: (recorder.seen(*key) or float("inf")) - sent for key, sent in writes.items()}
    assert max(delays.values()) <= 2.0, sorted(delays.items(), key=lambda kv: -kv[1])[:3]
    await settled(cluster)


async def test_a_new_instance_takes_its_share(
    cluster: dict[str, Any], recorder: Recorder, cluster_redis: RedisServer, emulator: FirestoreEmulator
) -> None:
    for name in ("i2", "i3"):
        if cluster["instances"][name].process.poll() is not None:
            cluster["instances"][name] = Instance(name, cluster_redis, emulator, cluster["project"])
    await settled(cluster)
    joined_at = time.monotonic()
    cluster["instances"]["i4"] = Instance("i4", cluster_redis, emulator, cluster["project"])
    counts = await settled(cluster, timeout=30)
    assert time.monotonic() - joined_at < 30
    even = len(USERS) / 4
    assert all(abs(c - even) <= 0.2 * even for c in counts.values()), counts
    moved = [uid for uid in USERS if owner(uid, ("i1", "i2", "i3", "i4")) == "i4"]
    assert all(recorder.syncs_after(uid, joined_at) for uid in moved)  # a fresh sync for each


async def test_redis_restart_does_not_flap(
    cluster: dict[str, Any], recorder: Recorder, cluster_redis: RedisServer
) -> None:
    before = await settled(cluster)
    churn_before = {name: await asyncio.to_thread(churn, i) for name, i in live(cluster).items()}
    owners_before = {uid: owner(uid, tuple(sorted(live(cluster)))) for uid in USERS}
    cluster_redis.stop()
    await asyncio.sleep(3)
    during = {name: await asyncio.to_thread(i.count) for name, i in live(cluster).items()}
    assert during == before  # every instance keeps serving what it owns
    await write(cluster, USERS[0], "during-outage")
    cluster_redis.start()
    await asyncio.sleep(8)  # longer than a membership TTL: nobody was dropped meanwhile
    assert await settled(cluster) == before
    assert {uid: owner(uid, tuple(sorted(live(cluster)))) for uid in USERS} == owners_before
    async with asyncio.timeout(30):
        while not recorder.seen(USERS[0], "during-outage"):
            await asyncio.sleep(0.2)
    # no user was detached or attached anywhere: ownership never flapped
    churn_after = {name: await asyncio.to_thread(churn, i) for name, i in live(cluster).items()}
    reasons = httpx.get(f"http://127.0.0.1:{live(cluster)['i4'].port}/metrics", timeout=5).text
    assert churn_after == churn_before, [line for line in reasons.splitlines() if "detaches_total" in line]


def churn(instance: Instance) -> tuple[float, float]:
    """(attaches, detaches) so far, from the instance's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{instance.port}/metrics", timeout=5).text
    attaches = sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("listeners_user_attaches_total")
    )
    detaches = sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("listeners_user_detaches_total")
    )
    return attaches, detaches
