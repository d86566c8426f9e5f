"""The control channel against hostile input: anything that can publish on Redis, with or
without the control token, neither stops the control listener nor gets a request served
twice. Over the wire: the real service, a real redis-server and the Firestore emulator."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from listeners.assemble import running
from listeners.config import Settings
from listeners.control import MAX_SKEW, InvalidRequest, SeenRequests, verify
from listeners.service import Service
from listeners_bridge.registry import ChatThread
from listeners_bridge.resync import resync_request
from listeners_testkit.processes import RedisServer
from tests.conftest import CONTROL_TOKEN, Consumer, Firebase, wait_until


def signed(fields: dict[str, Any]) -> bytes:
    """A message signed with the right token, whatever its fields hold."""
    from listeners_bridge.resync import request_signature

    return json.dumps({**fields, "sig": request_signature(CONTROL_TOKEN, fields)}).encode()


def fresh(**fields: Any) -> dict[str, Any]:
    request = json.loads(resync_request(CONTROL_TOKEN, "fay"))
    del request["sig"]
    return {**request, **fields}


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(r, "reason", "") for r in caplog.records if r.getMessage() == "control request refused"]


def rejected(service: Service) -> float:
    value = service.metrics.registry.get_sample_value(
        "listeners_rejected_inputs_total", {"source": "control"}
    )
    return value or 0.0


def syncs(consumer: Consumer, uid: str) -> int:
    return sum(1 for e in consumer.events if e["type"] == "notif.sync" and e["uid"] == uid)


async def test_hostile_messages_are_refused_one_by_one(
    settings: Settings,
    fb: Firebase,
    subscribe: Any,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hostile: list[tuple[bytes, str]] = [
        (b"[" * 3000, "nested deeper than 4"),  # json.loads recursion before any signature
        (
            b'{"type":"resync","uid":"\\udcff","ts":1,"nonce":"n","sig":"00"}',
            "a string holds a lone surrogate",
        ),
        (b'{"type":"resync","uid":"\xff\xfe","sig":"00"}', "not UTF-8"),
        ('{"uid": "fay"}'.encode("utf-16"), "not UTF-8"),
        (json.dumps({"a": [[[[1]]]]}).encode(), "nested deeper than 4"),
        (json.dumps({**fresh(), "sig": "\u00e9" * 64}).encode(), "bad signature"),  # not ASCII
        (signed(fresh(uid="fay:x")), "not a resync request for a valid uid"),
        (signed(fresh(uid="a" * 129)), "not a resync request for a valid uid"),
        (signed(fresh(ts=float("nan"))), "stale or future request"),
        (signed(fresh(ts=True)), "stale or future request"),
        (signed(fresh(ts=10**400)), "stale or future request"),  # too large for a float
        (signed(fresh(nonce="")), "no nonce"),
        (
            signed(fresh(threads=[["acme", "t/1", "chats"]])),
            "threads must be [space_code, thread_key, mode] triples",
        ),
        (
            signed(fresh(threads=[["acme", "t1", "chats", "x"]])),
            "threads must be [space_code, thread_key, mode] triples",
        ),
    ]
    consumer: Consumer = await subscribe("fay")
    async with running(settings) as service:
        await fb.online("fay")
        await wait_until(lambda: "fay" in service.node.sessions)
        await wait_until(lambda: service.control.subscribed.is_set())
        await consumer.wait_for(lambda _: syncs(consumer, "fay") >= 1)
        client = aioredis.Redis(port=redis_server.port)
        for raw, _ in hostile:
            await client.publish("listeners:control", raw)
        before = syncs(consumer, "fay")
        await client.publish("listeners:control", resync_request(CONTROL_TOKEN, "fay"))
        await consumer.wait_for(lambda _: syncs(consumer, "fay") > before)  # still listening
        await client.aclose()
        assert not any(service.supervisor.restarts.values()) and service.health()["status"] == "ok"
        assert rejected(service) == len(hostile)
        refused = service.metrics.registry.get_sample_value(
            "listeners_control_requests_total", {"outcome": "refused"}
        )
        assert refused == len(hostile)
    assert refusals(caplog) == [reason for _, reason in hostile]
    logged = "\n".join(r.getMessage() + str(vars(r)) for r in caplog.records if r.name == "listeners.control")
    assert "udcff" not in logged and "fay:x" not in logged  # the reason only, never the payload


async def test_a_signed_request_is_served_once(
    settings: Settings,
    fb: Firebase,
    subscribe: Any,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer: Consumer = await subscribe("fay", "gus")
    async with running(settings) as service:
        await fb.online("fay")
        await fb.online("gus")
        await wait_until(lambda: {"fay", "gus"} <= service.node.sessions.keys())
        await wait_until(lambda: service.control.subscribed.is_set())
        await consumer.wait_for(lambda _: syncs(consumer, "fay") >= 1 and syncs(consumer, "gus") >= 1)
        fay, gus = syncs(consumer, "fay"), syncs(consumer, "gus")
        client = aioredis.Redis(port=redis_server.port)
        request = resync_request(CONTROL_TOKEN, "fay")
        await client.publish("listeners:control", request)
        await consumer.wait_for(lambda _: syncs(consumer, "fay") == fay + 1)
        await client.publish("listeners:control", request)  # the same bytes, inside the window
        reordered = json.dumps(dict(reversed(json.loads(request).items())), indent=1).encode()
        await client.publish("listeners:control", reordered)  # same fields, other text: same signature
        # A request for another user comes after the replays: once its sync is in, theirs would be too.
        await client.publish("listeners:control", resync_request(CONTROL_TOKEN, "gus"))
        await consumer.wait_for(lambda _: syncs(consumer, "gus") == gus + 1)
        await client.aclose()
        assert syncs(consumer, "fay") == fay + 1
        assert rejected(service) == 2
    assert refusals(caplog) == ["replayed request", "replayed request"]


def test_replays_are_refused_inside_the_window_only() -> None:
    seen = SeenRequests()
    request = resync_request(CONTROL_TOKEN, "fay", (ChatThread("acme", "t1", "chats"),), now=1000.0)
    assert verify(CONTROL_TOKEN, request, now=1000.0, seen=seen).uid == "fay"
    with pytest.raises(InvalidRequest, match="replayed request"):
        verify(CONTROL_TOKEN, request, now=1000.0 + MAX_SKEW, seen=seen)
    with pytest.raises(InvalidRequest, match="stale"):  # past the window the time check refuses it
        verify(CONTROL_TOKEN, request, now=1000.0 + MAX_SKEW + 1, seen=seen)
    later = 1000.0 + MAX_SKEW + 1
    verify(CONTROL_TOKEN, resync_request(CONTROL_TOKEN, "fay", now=later), now=later, seen=seen)
    assert len(seen) == 1  # the first entry is gone, only the new one is kept


def test_the_cache_is_bounded_and_refuses_when_full() -> None:
    seen = SeenRequests(capacity=3)
    for n in range(3):
        verify(CONTROL_TOKEN, resync_request(CONTROL_TOKEN, f"u{n}", now=1000.0), now=1000.0, seen=seen)
    with pytest.raises(InvalidRequest, match="too many requests"):
        verify(CONTROL_TOKEN, resync_request(CONTROL_TOKEN, "u4", now=1000.0), now=1000.0, seen=seen)
    later = 1000.0 + 2 * MAX_SKEW  # the first three have expired: room again
    verify(CONTROL_TOKEN, resync_request(CONTROL_TOKEN, "u4", now=later), now=later, seen=seen)
    assert len(seen) == 1
