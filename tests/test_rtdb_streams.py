"""Direct messages (msg.*) and chat threads (chat.*) from the Realtime Database stand-in,
through the real service, to a real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect

from listeners.assemble import running
from listeners.config import Settings
from listeners.source.rtdb import RtdbClient
from listeners_testkit.auth import LocalIssuer
from listeners_testkit.rtdb_server import RtdbStandin
from tests.conftest import Consumer, Firebase, wait_until
from tests.test_rtdb import no_streams
from tests.test_websocket import next_event, serving, ws_settings

pytestmark = pytest.mark.asyncio


async def owner(*, refresh: bool = False) -> str:
    return "owner"


@pytest.fixture(scope="module")
def standin() -> Iterator[RtdbStandin]:
    with RtdbStandin(keepalive=1.0, token="owner") as server:
        yield server


@pytest.fixture
def ns() -> str:
    return f"db-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def rtdb_settings(settings: Settings, standin: RtdbStandin, ns: str) -> Settings:
    firebase = dataclasses.replace(
        settings.firebase,
        database_url=f"https://{ns}.firebaseio.com",
        database_emulator_host=f"127.0.0.1:{standin.port}",
    )
    return dataclasses.replace(settings, firebase=firebase)


@pytest.fixture
async def rtdb(standin: RtdbStandin, ns: str) -> AsyncIterator[RtdbClient]:
    client = RtdbClient(standin.url, namespace=ns, tokens=owner)
    yield client
    await client.aclose()


def dm(n: int, **fields: Any) -> dict[str, Any]:
    return {
        "file_name": f"doc-{n}.pdf",
        "status": "to_review",
        "job_id": f"job-{n}",
        "file_id": f"file-{n}",
        "collection_id": "acme",
        "collection_name": "ACME",
        "function_name": "APbookeeper",
        "timestamp": f"2025-09-0{n} 10:11:12.123456",
        "additional_info": "{}",
        "sender_id": "u-sender",
        **fields,
    }


def of(consumer: Consumer, kind: str) -> list[dict[str, Any]]:
    return consumer.of_type(kind)


def ids(syncs: list[dict[str, Any]]) -> list[str] | None:
    """The doc ids of the last sync, or None before the first."""
    return [m["doc_id"] for m in syncs[-1]["payload"]["messages"]] if syncs else None


async def test_direct_messages_sync_and_deltas(
    rtdb_settings: Settings, fb: Firebase, rtdb: RtdbClient, subscribe: Any
) -> None:
    base = "clients/mia/direct_message_notif"
    await rtdb.set(f"{base}/m1", dm(1))
    await rtdb.set(f"{base}/m2", dm(2, collection_id="other"))  # not authorised
    await rtdb.set(f"{base}/m3", dm(3, file_name=17, status=None, message="Please review"))
    await rtdb.set(f"{base}/junk", "not a map")
    consumer: Consumer = await subscribe("mia")
    async with running(rtdb_settings):
        await fb.online("mia", companies=["acme"])
        await consumer.wait_for(lambda e: len(of(consumer, "msg.sync")) == 1)
        first = of(consumer, "msg.sync")[0]["payload"]
        assert [m["doc_id"] for m in first["messages"]] == ["m3", "m1"]  # newest first, m2 filtered
        assert first["count"] == 2 and first["has_new_messages"] is True and first["new_message"] is None
        m3 = first["messages"][0]
        assert m3["file_name"] == "17" and m3["status"] == "info" and m3["message"] == "Please review"
        assert (
            m3["timestamp"] == "2025-09-03T10:11:12.123456Z" and "read" not in m3 and "info_message" not in m3
        )
        assert m3["sender_id"] == "u-sender" and m3["url"] == "/edit_form/job-3"

        await rtdb.set(f"{base}/m4", dm(4))
        await consumer.wait_for(lambda e: len(of(consumer, "msg.add")) == 1)
        assert [e["payload"]["doc_id"] for e in of(consumer, "msg.add")] == ["m4"]
        assert consumer.doc_ids("msg") == ["m4", "m3", "m1"]  # deltas alone, no sync after them

        await rtdb.update(f"{base}/m4", {"status": "done"})
        await consumer.wait_for(lambda e: len(of(consumer, "msg.update")) == 1)
        await rtdb.delete(f"{base}/m1")  # reading a direct message deletes it
        await consumer.wait_for(lambda e: len(of(consumer, "msg.remove")) == 1)
        assert of(consumer, "msg.remove")[0]["payload"] == {"doc_id": "m1"}
        await consumer.wait_for(lambda e: consumer.doc_ids("msg") == ["m4", "m3"])
    assert "m2" not in str(consumer.events)
    assert len(of(consumer, "msg.sync")) == 1
    # the channel also carries the notifications' stream, which counts its own seq
    direct = [e for e in consumer.events if e["type"].startswith("msg.")]
    assert [e["seq"] for e in direct] == list(range(1, len(direct) + 1))


async def until_true(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


def chat_message(n: int, kind: str = "MESSAGE", **fields: Any) -> dict[str, Any]:
    return {
        "content": f"hello {n}",
        "sender_id": "bot",
        "timestamp": f"2025-09-05 10:00:{n:02d}",
        "read": False,
        "message_type": kind,
        **fields,
    }


async def test_chat_threads_from_the_registry(
    rtdb_settings: Settings,
    fb: Firebase,
    rtdb: RtdbClient,
    subscribe: Any,
    standin: RtdbStandin,
    ns: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    thread = "acme/chats/t1/messages"
    await rtdb.set(thread, {
        "-a1": chat_message(1),
        "-a2": chat_message(2, read=True),  # already read: not shown
        "-a3": chat_message(3, "CARD", action="approve"),  # a card response
        "-a4": {**chat_message(4), "message_type": None, "type": "TOOL", "content": "{not json"},
        "-a5": chat_message(5, "DEBUG"),  # not a display type
        "-a6": "junk",
    })  # fmt: skip
    user: Consumer = await subscribe("noa")
    chat: Consumer = await subscribe("noa:acme:t1", prefix="chat:")
    async with running(rtdb_settings) as service:
        await fb.set("listeners_registry/noa", {
            "status": "online", "heartbeat_at": "2999-01-01T00:00:00Z", "authorized_companies_ids": ["acme"],
            "chat_threads": [{"space_code": "acme", "thread_key": "t1", "mode": "chats"},
                             {"space_code": "globex", "thread_key": "t9", "mode": "chats"}],
        })  # fmt: skip
        await chat.wait_for(lambda e: len(chat.of_type("chat.sync")) == 1)
        sync = chat.of_type("chat.sync")[0]["payload"]
        assert sync["space_code"] == "acme" and sync["thread_key"] == "t1"
        assert [m["id"] for m in sync["raw_messages"]] == ["-a1", "-a4"]
        assert sync["raw_messages"][1]["content"] == "{not json"  # raw, as it is

        await rtdb.set(f"{thread}/-b1", chat_message(10))
        await rtdb.set(f"{thread}/-b2", chat_message(11, "SPEEDDIAL", action="call"))
        await chat.wait_for(
            lambda e: sum(len(x["payload"]["raw_messages"]) for x in chat.of_type("chat.message")) == 2
        )
        delivered = [m["id"] for x in chat.of_type("chat.message") for m in x["payload"]["raw_messages"]]
        assert delivered == ["-b1", "-b2"]

        # delivered messages are marked read, as the old client did
        async def all_read() -> bool:
            marked = await rtdb.get(thread)
            return all(marked[k]["read"] for k in ("-a1", "-a4", "-b1", "-b2"))

        await until_true(all_read)
        # the marks change the thread, yet nothing is delivered twice: up to a message written
        # after them, the thread's channel carries the two messages once, then that one alone
        before = await chat.until_sentinel(
            0,
            lambda: rtdb.set(f"{thread}/-b3", chat_message(12)),
            lambda e: e["type"] == "chat.message" and "-b3" in str(e["payload"]),
        )
        messages = [e["payload"]["raw_messages"] for e in before if e["type"] == "chat.message"]
        assert [m["id"] for batch in messages for m in batch] == delivered
        sentinel = chat.events[len(before)]
        assert [m["id"] for m in sentinel["payload"]["raw_messages"]] == ["-b3"]
        # chat goes to its own channel: the user's channel carries none of it, up to a direct
        # message written after every chat event above was published
        before = await user.until_sentinel(
            0,
            lambda: rtdb.set("clients/noa/direct_message_notif/d1", dm(1)),
            lambda e: e["type"] == "msg.add",
        )
        assert before and not [e for e in before if e["type"].startswith("chat.")]
        assert "chat:noa:globex:t9" not in str(service.node.sessions["noa"].threads)
        refused = [r for r in caplog.records if r.getMessage() == "chat thread refused"]
        assert [getattr(r, "space_code", "") for r in refused] == ["globex"]

        # losing the thread's company closes it; so does closing it in the registry; going
        # offline closes every stream
        await fb.update("listeners_registry/noa", {"authorized_companies_ids": ["globex-only"]})
        await wait_until(lambda: not service.node.sessions["noa"].threads)
        await fb.update("listeners_registry/noa", {"authorized_companies_ids": ["acme"]})
        await wait_until(lambda: bool(service.node.sessions["noa"].threads))
        await fb.update("listeners_registry/noa", {"chat_threads": []})
        await wait_until(lambda: not service.node.sessions["noa"].threads)
        await fb.offline("noa")
        await wait_until(lambda: "noa" not in service.node.sessions)
        await no_streams(standin, ns)
    assert not user.of_type("chat.message")  # chat goes to its own channel


async def test_cancel_fails_one_stream_and_the_others_continue(
    rtdb_settings: Settings, fb: Firebase, rtdb: RtdbClient, subscribe: Any, standin: RtdbStandin, ns: str
) -> None:
    ola: Consumer = await subscribe("ola")
    pia: Consumer = await subscribe("pia")
    async with running(rtdb_settings) as service:
        await fb.online("ola")
        await fb.online("pia")
        await ola.wait_for(lambda e: len(of(ola, "msg.sync")) >= 1)
        await pia.wait_for(lambda e: len(of(pia, "msg.sync")) >= 1)
        assert await standin.cancel("clients/ola/direct_message_notif", ns=ns) == 1
        await wait_until(lambda: not service.node.sessions["ola"].streams[1].healthy)
        await wait_until(lambda: service.metrics.failed_streams._value.get() == 1)
        await rtdb.set("clients/pia/direct_message_notif/x", dm(1))
        await pia.wait_for(lambda e: len(of(pia, "msg.add")) == 1)
        assert service.node.sessions["ola"].streams[0].healthy  # notifications go on


async def test_auth_revoked_then_converges(
    rtdb_settings: Settings, fb: Firebase, rtdb: RtdbClient, subscribe: Any, standin: RtdbStandin
) -> None:
    consumer: Consumer = await subscribe("quin")
    async with running(rtdb_settings):
        await fb.online("quin")
        await consumer.wait_for(lambda e: len(of(consumer, "msg.sync")) == 1)
        assert await standin.revoke() >= 1
        await rtdb.set("clients/quin/direct_message_notif/after", dm(1))
        await consumer.wait_for(lambda e: consumer.doc_ids("msg") == ["after"])


async def test_cut_and_restart_give_a_fresh_sync(
    rtdb_settings: Settings, fb: Firebase, rtdb: RtdbClient, subscribe: Any, standin: RtdbStandin
) -> None:
    consumer: Consumer = await subscribe("ray")
    async with running(rtdb_settings):
        await fb.online("ray")
        await rtdb.set("clients/ray/direct_message_notif/a", dm(1))
        await consumer.wait_for(lambda e: consumer.doc_ids("msg") == ["a"])
        syncs = len(of(consumer, "msg.sync"))
        await standin.drop()
        await consumer.wait_for(lambda e: len(of(consumer, "msg.sync")) > syncs)  # fresh after the cut
        standin.restart()  # its data is gone
        await rtdb.set("clients/ray/direct_message_notif/b", dm(2))
        await consumer.wait_for(lambda e: consumer.doc_ids("msg") == ["b"], timeout=30)


async def test_an_enormous_node(
    rtdb_settings: Settings, fb: Firebase, rtdb: RtdbClient, subscribe: Any
) -> None:
    await rtdb.set("clients/sam/direct_message_notif", {f"m{n:05d}": dm(1 + n % 9) for n in range(5000)})
    consumer: Consumer = await subscribe("sam")
    async with running(rtdb_settings):
        await fb.online("sam")
        await consumer.wait_for(lambda e: len(of(consumer, "msg.sync")) == 1, timeout=60)
    assert of(consumer, "msg.sync")[0]["payload"]["count"] == 5000


async def test_websocket_chat_subscription(
    rtdb_settings: Settings, fb: Firebase, rtdb: RtdbClient, issuer: LocalIssuer, issuer_and_url: Any
) -> None:
    """Direct mode: a client message opens a thread (through the registry) and its events arrive."""
    await rtdb.set("acme/job_chats/j1/messages/-m1", chat_message(1))
    settings = ws_settings(rtdb_settings, issuer_and_url[1])
    async with serving(settings) as (url, app):
        await fb.online("tia", companies=["acme"])
        async with connect(f"{url}?token={issuer.mint('tia')}") as ws:
            await next_event(ws, "msg.sync")
            thread = {"space_code": "acme", "thread_key": "j1", "mode": "job_chats"}
            await ws.send(json.dumps({"type": "chat.subscribe", **thread}))
            await next_event(ws, "chat.subscribed")
            sync = await next_event(ws, "chat.sync")
            assert [m["id"] for m in sync["payload"]["raw_messages"]] == ["-m1"]
            await rtdb.set("acme/job_chats/j1/messages/-m2", chat_message(2))
            message = await next_event(ws, "chat.message")
            assert [m["id"] for m in message["payload"]["raw_messages"]] == ["-m2"]
            await ws.send(
                json.dumps(
                    {"type": "chat.subscribe", "space_code": "globex", "thread_key": "x", "mode": "chats"}
                )
            )
            refused = await next_event(ws, "chat.refused")
            assert refused["space_code"] == "globex"
            await ws.send(json.dumps({**thread, "type": "chat.subscribe", "thread_key": "a.b"}))  # not a key
            assert "database keys" in (await next_event(ws, "error"))["reason"]
            await ws.send(json.dumps({"type": "chat.unsubscribe", **thread}))
            await next_event(ws, "chat.unsubscribed")
            service = app.state.service
            await wait_until(lambda: not service.node.sessions["tia"].threads)  # the stream is closed


async def test_chat_fails_closed_without_companies(
    rtdb_settings: Settings, fb: Firebase, rtdb: RtdbClient, subscribe: Any
) -> None:
    """An entry with no companies gets no chat at all: another company's thread is neither
    delivered nor marked read (it used to be both, for every Direct-mode presence entry)."""
    thread = "globex/chats/t7/messages"
    await rtdb.set(f"{thread}/-g1", chat_message(1))
    user: Consumer = await subscribe("ivy")
    chat: Consumer = await subscribe("ivy:globex:t7", prefix="chat:")
    async with running(rtdb_settings):
        await fb.set("listeners_registry/ivy", {
            "status": "online", "heartbeat_at": "2999-01-01T00:00:00Z", "authorized_companies_ids": [],
            "chat_threads": [{"space_code": "globex", "thread_key": "t7", "mode": "chats"}],
        })  # fmt: skip
        await user.wait_for(lambda e: len(of(user, "msg.sync")) >= 1)  # attached, streams open
        # sentinel: a direct message for ivy, published after anything the thread could give
        since = user.mark()
        await user.until_sentinel(
            since,
            lambda: rtdb.set("clients/ivy/direct_message_notif/s1", dm(1)),
            lambda e: e["type"] == "msg.add",
        )
        await rtdb.set(f"{thread}/-g2", chat_message(2))
        await user.until_sentinel(
            user.mark(),
            lambda: rtdb.set("clients/ivy/direct_message_notif/s2", dm(2)),
            lambda e: e["type"] == "msg.add" and "s2" in json.dumps(e["payload"]),
        )
    assert chat.events == []
    marked = await rtdb.get(thread)
    assert not marked["-g1"]["read"] and not marked["-g2"]["read"]


async def test_a_chat_thread_keeps_only_its_last_messages(
    rtdb_settings: Settings, fb: Firebase, rtdb: RtdbClient, subscribe: Any
) -> None:
    """LISTENERS_CHAT_HISTORY=20: the stream mirrors the thread's last 20 messages (limitToLast),
    however long the thread; new messages come once each, and what it remembers stays bounded."""
    thread = "acme/chats/long/messages"
    await rtdb.set(thread, {f"-m{n:04d}": chat_message(n) for n in range(300)})
    chat: Consumer = await subscribe("lea:acme:long", prefix="chat:")
    bounded = dataclasses.replace(rtdb_settings, chat_history=20)
    async with running(bounded) as service:
        await fb.set("listeners_registry/lea", {
            "status": "online", "heartbeat_at": "2999-01-01T00:00:00Z", "authorized_companies_ids": ["acme"],
            "chat_threads": [{"space_code": "acme", "thread_key": "long", "mode": "chats"}],
        })  # fmt: skip
        await chat.wait_for(lambda e: len(chat.of_type("chat.sync")) == 1)
        sync = chat.of_type("chat.sync")[0]["payload"]
        assert [m["id"] for m in sync["raw_messages"]] == [f"-m{n:04d}" for n in range(280, 300)]
        stream = next(iter(service.node.sessions["lea"].threads.values()))
        for n in range(300, 330):
            await rtdb.set(f"{thread}/-m{n:04d}", chat_message(n))
            # the read marks of the delivered messages come back as changes too
            assert len(stream._nodes) <= 20 and stream.seen <= 20
        await chat.wait_for(lambda e: "-m0329" in str(e[-1]))
        delivered = [m["id"] for x in chat.of_type("chat.message") for m in x["payload"]["raw_messages"]]
        assert delivered == [f"-m{n:04d}" for n in range(300, 330)]
        assert len(stream._nodes) <= 20 and stream.seen <= 20
        events = chat.events
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


class _Stub:
    """What MessageStream reads of its NodeMirror: the children the last event touched."""

    reconnects = 0
    active = True
    last_changed: frozenset[str] | None = None

    async def close(self) -> None:
        return None


async def test_a_direct_message_change_costs_the_change_not_the_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pure unit: of 2,000 direct messages, one changed child is normalised alone."""
    import listeners.streams.messages as messages
    from listeners.normalise.messages import normalise_message as real

    normalised: list[str] = []

    def counting(push_id: str, node: dict[str, Any]) -> Any:
        normalised.append(push_id)
        return real(push_id, node)

    monkeypatch.setattr(messages, "normalise_message", counting)
    published: list[Any] = []
    stream = messages.MessageStream("u", frozenset(), Any, lambda e, lag: published.append(e) is None)  # type: ignore[arg-type, func-returns-value]
    stub = _Stub()
    stream._stream = stub  # type: ignore[assignment]
    tree = {f"m{n:04d}": dm(1 + n % 9) for n in range(2000)}
    stream._on_change(tree)  # the first read: every node
    assert len(normalised) == 2000 and [e.type for e in published] == ["msg.sync"]
    normalised.clear()
    stub.last_changed = frozenset({"m0007"})
    stream._on_change({**tree, "m0007": dm(3, status="done")})
    assert normalised == ["m0007"] and [e.type for e in published[1:]] == ["msg.update"]
    stub.last_changed = frozenset({"m0008"})
    stream._on_change({k: v for k, v in tree.items() if k != "m0008"})
    assert normalised == ["m0007"] and published[-1].type == "msg.remove"
    assert [e.seq for e in published] == [1, 2, 3]
