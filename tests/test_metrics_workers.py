"""One scrape of /metrics sees the whole task (listeners.multiproc): `uvicorn app.main:app`
with two workers, as the task runs it; each scrape reaches either worker and shows what both
did. A real redis-server, the emulator, a local token issuer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import defaultdict
from pathlib import Path

import httpx
import psutil
import pytest
import redis.asyncio as aioredis
from google.cloud import firestore
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from listeners_testkit.auth import LocalIssuer
from listeners_testkit.processes import FirestoreEmulator, RedisServer
from tests.conftest import register_online
from tests.test_metrics_doc import documented
from tests.test_websocket_workers import (
    envelope,
    healthy,
    hub_connections,
    instance_ids,
    open_socket,
    service,
)

pytestmark = pytest.mark.asyncio

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


async def scrape(port: int) -> Samples:
    """One scrape, on a new connection (the kernel hands it to either worker)."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics", timeout=30)).text
    samples: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name][tuple(sorted(s.labels.items()))] = s.value
    return samples


def total(samples: Samples, name: str) -> float:
    return sum(samples.get(name, {}).values())


async def test_one_scrape_shows_the_work_of_both_workers(
    redis_server: RedisServer,
    emulator: FirestoreEmulator,
    db: firestore.Client,
    issuer: LocalIssuer,
    issuer_and_url: tuple[LocalIssuer, str],
    tmp_path: Path,
) -> None:
    run = uuid.uuid4().hex[:6]
    users = [f"m{run}-{i}" for i in range(20)]  # spread over both workers by ownership
    register_online(db, users)
    with service(redis_server, issuer, issuer_and_url[1], tmp_path) as process:
        await healthy(process.port)
        ids = await instance_ids(process.port, 2)
        seen: set[float] = set()  # until every user is attached somewhere
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(120):
                while (attached := total(await scrape(process.port), "listeners_attached_users")) != len(
                    users
                ):
                    seen.add(attached)
                    await asyncio.sleep(0.5)
        # (Per-worker registries: each scrape showed one worker's share, never all 20.)
        assert attached == len(users), f"attached users seen by single scrapes: {sorted(seen)}"
        async with asyncio.timeout(60):  # counted every 15 s
            while total(await scrape(process.port), "listeners_registry_online_users") != len(users):
                await asyncio.sleep(0.5)
        async with asyncio.timeout(60):  # every user's Listen targets caught up, on both workers
            while True:
                targets = (await scrape(process.port))["listeners_listen_targets"]
                if targets.get((("state", "current"),), 0) >= len(users) and not targets.get(
                    (("state", "pending"),)
                ):
                    break
                await asyncio.sleep(0.5)

        # Whichever worker answers, the same whole-task figures: 12 scrapes in a row. On a loaded
        # machine a membership beat can lapse and move users for a moment (both workers hold
        # some during the handover), so a run of 12 is waited for, not the first 12 taken.
        # With a registry per worker no single scrape ever shows all the users.
        def whole(samples: Samples) -> bool:
            instances = {dict(k)["instance_id"] for k, v in samples["listeners_instance"].items() if v}
            return (
                instances == ids
                and total(samples, "listeners_attached_users") == len(users)
                and total(samples, "listeners_cluster_members") == 2  # livemax, not a sum
                and total(samples, "listeners_redis_up") == 1  # livemin
                and total(samples, "listeners_registry_up") == 1  # livemin
                and total(samples, "listeners_registry_online_users") == len(users)  # livemax
            )

        in_a_row = 0
        async with asyncio.timeout(120):
            while in_a_row < 12:
                samples = await scrape(process.port)
                in_a_row = in_a_row + 1 if whole(samples) else 0
        # each user attached once, counted across both workers' files
        assert total(samples, "listeners_user_attaches_total") >= len(users)

        # Direct mode on both workers: sockets until both hubs hold some, events to each.
        sockets: dict[str, ClientConnection] = {}
        async with asyncio.timeout(120):
            while len(await hub_connections(redis_server.port)) < 2 or len(sockets) < 10:
                uid = f"s{run}-{len(sockets)}"
                sockets[uid] = await open_socket(process.port, issuer.mint(uid))
        with contextlib.suppress(ConnectionClosed):  # refused: a token for another project
            bad = await connect(
                f"ws://127.0.0.1:{process.port}/ws",
                subprotocols=[Subprotocol("bearer"), Subprotocol(LocalIssuer("elsewhere").mint("x"))],
            )
            await bad.recv()
        publisher = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
        events = 5
        for n in range(events):
            for uid in sockets:
                await publisher.publish(f"user:{uid}", envelope(uid, n))
        await publisher.aclose()
        for ws in sockets.values():
            got = 0
            async with asyncio.timeout(60):
                while got < events:
                    got += json.loads(await ws.recv())["type"] == "notif.add"
        for _ in range(6):
            samples = await scrape(process.port)
            undocumented = {n for n in samples if not n.startswith(tuple(documented()))}
            assert undocumented == set()  # docs/metrics.md, against a multiprocess scrape
            assert total(samples, "listeners_ws_sockets") == len(sockets)
            assert total(samples, "listeners_ws_users") == len(sockets)
            handshakes = {dict(k)["outcome"]: v for k, v in samples["listeners_ws_handshakes_total"].items()}
            assert handshakes.pop("accepted") == len(sockets)
            assert sum(handshakes.values()) == 1 and all(k.startswith("40") for k in handshakes)
            # auth.ok, then each event: a resync may add sync messages, never fewer
            assert total(samples, "listeners_ws_messages_sent_total") >= len(sockets) * (events + 1)
            assert total(samples, "listeners_ws_delivery_seconds_count") == total(
                samples, "listeners_ws_messages_sent_total"
            )
        for ws in sockets.values():
            await ws.close()
        async with asyncio.timeout(60):
            while total(samples := await scrape(process.port), "listeners_ws_sockets") != 0:
                await asyncio.sleep(0.2)
        assert samples["listeners_ws_closes_total"][(("code", "client"),)] == len(sockets)
        assert total(samples, "listeners_ws_users") == 0
        assert total(samples, "listeners_ws_queue_bytes") == 0

        # A worker killed outright: its live gauges go, its counters stay (never backwards).
        victim = int(sorted(ids)[0].rsplit("-", 2)[-2])
        psutil.Process(victim).kill()
        async with asyncio.timeout(120):
            while True:
                samples = await scrape(process.port)
                instances = {dict(k)["instance_id"] for k, v in samples["listeners_instance"].items() if v}
                attached = total(samples, "listeners_attached_users")
                if sorted(ids)[0] not in instances and len(instances) == 2 and attached == len(users):
                    break  # the dead one forgotten, its replacement counted, the users served
                await asyncio.sleep(0.5)
        assert total(samples, "listeners_user_attaches_total") >= len(users)
