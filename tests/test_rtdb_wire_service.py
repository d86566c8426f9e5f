"""The whole service with the wire client in place of the REST one, against the stand-in's
WebSocket, a real Redis and the Firestore emulator: the message and chat streams take it
unchanged (`running(..., rtdb=WireClient(...))`, what `LISTENERS_RTDB_TRANSPORT=wire` selects)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from listeners.assemble import running
from listeners.config import Settings
from listeners.source.rtdb import RtdbClient
from listeners.source.rtdb_wire import WireClient
from listeners_bridge.backoff import Backoff
from listeners_testkit.rtdb_server import RtdbStandin
from tests.conftest import Consumer, Firebase, wait_until
from tests.test_rtdb_streams import chat_message, dm, until_true

pytestmark = pytest.mark.asyncio


async def owner(*, refresh: bool = False) -> str:
    return "owner"


@pytest.fixture(scope="module")
def standin() -> Iterator[RtdbStandin]:
    with RtdbStandin(keepalive=5.0, token="owner") as server:
        yield server


@pytest.fixture
def ns() -> str:
    return f"svc-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def rtdb_settings(settings: Settings, standin: RtdbStandin, ns: str) -> Settings:
    firebase = dataclasses.replace(
        settings.firebase,
        database_url=f"https://{ns}.firebaseio.com",
        database_emulator_host=f"127.0.0.1:{standin.port}",
    )
    return dataclasses.replace(settings, firebase=firebase)


@pytest.fixture
async def rest(standin: RtdbStandin, ns: str) -> AsyncIterator[RtdbClient]:
    client = RtdbClient(standin.url, namespace=ns, tokens=owner)
    yield client
    await client.aclose()


def wire(standin: RtdbStandin, ns: str) -> WireClient:
    return WireClient(standin.url, namespace=ns, tokens=owner, backoff=Backoff(0.05, 0.5))


async def test_messages_and_chat_through_the_service_on_one_socket(
    rtdb_settings: Settings, fb: Firebase, rest: RtdbClient, subscribe: Any, standin: RtdbStandin, ns: str
) -> None:
    base = "clients/mia/direct_message_notif"
    thread = "acme/chats/t1/messages"
    await rest.set(f"{base}/m1", dm(1))
    await rest.set(thread, {f"-a{n}": chat_message(n) for n in range(1, 6)})
    users = [f"u{n}" for n in range(12)]
    consumer: Consumer = await subscribe("mia")
    chat: Consumer = await subscribe("mia:acme:t1", prefix="chat:")
    client = wire(standin, ns)
    async with running(dataclasses.replace(rtdb_settings, chat_history=3), rtdb=client) as service:
        await fb.set("listeners_registry/mia", {
            "status": "online", "heartbeat_at": "2999-01-01T00:00:00Z", "authorized_companies_ids": ["acme"],
            "chat_threads": [{"space_code": "acme", "thread_key": "t1", "mode": "chats"}],
        })  # fmt: skip
        for uid in users:
            await fb.online(uid, companies=["acme"])
        await consumer.wait_for(lambda e: len(consumer.of_type("msg.sync")) == 1)
        assert [m["doc_id"] for m in consumer.of_type("msg.sync")[0]["payload"]["messages"]] == ["m1"]
        await chat.wait_for(lambda e: len(chat.of_type("chat.sync")) == 1)
        synced = chat.of_type("chat.sync")[0]["payload"]["raw_messages"]
        assert [m["id"] for m in synced] == ["-a3", "-a4", "-a5"]  # the window: limitToLast 3

        await rest.set(f"{base}/m2", dm(2))
        await consumer.wait_for(
            lambda e: [x["payload"]["doc_id"] for x in consumer.of_type("msg.add")] == ["m2"]
        )
        await rest.update(f"{base}/m2", {"status": "done"})
        await consumer.wait_for(lambda e: len(consumer.of_type("msg.update")) == 1)
        await rest.delete(f"{base}/m1")
        await consumer.wait_for(lambda e: len(consumer.of_type("msg.remove")) == 1)
        await rest.set(f"{thread}/-b1", chat_message(10))
        await chat.wait_for(lambda e: "-b1" in str(chat.of_type("chat.message")))

        # delivered chat messages are marked read: those writes go over the wire too
        async def all_read() -> bool:
            marked = await rest.get(thread)
            return all(marked[k]["read"] for k in ("-a3", "-a4", "-a5", "-b1"))

        await until_true(all_read)

        # 13 users, 14 listens: one WebSocket, no REST stream
        await until_true(lambda: _listens(standin, ns, 14))
        assert (await standin.wire(ns))["connections"] == 1
        assert await standin.open_streams(ns) == 0
        assert client.open_streams == 14

        # a cut: every user's stream gets a fresh sync, as with the REST client
        syncs = len(consumer.of_type("msg.sync"))
        await standin.drop()
        await consumer.wait_for(lambda e: len(consumer.of_type("msg.sync")) > syncs)
        assert consumer.of_type("msg.sync")[-1]["payload"]["count"] == 1
        await fb.offline("mia")
        await wait_until(lambda: "mia" not in service.node.sessions)
        await until_true(lambda: _listens(standin, ns, 12))
    assert client.open_streams == 0
    direct = [e for e in consumer.events if e["type"].startswith("msg.")]
    # sync, add, update, remove; then the fresh sync after the cut opens a new epoch at 1
    assert [(e["type"], e["seq"]) for e in direct] == [
        ("msg.sync", 1), ("msg.add", 2), ("msg.update", 3), ("msg.remove", 4), ("msg.sync", 1),
    ]  # fmt: skip


async def _listens(standin: RtdbStandin, ns: str, n: int) -> bool:
    return bool((await standin.wire(ns))["listens"] == n)
