"""Half-open Redis connections (issue 12): every consumer notices and recovers, consumers converge.

A `TcpProxy` sits between the consumer under test and the real redis-server; the test's own
observers connect to Redis directly. `freeze()` makes every open connection through the proxy
silent without closing it (a dropped NAT or conntrack entry), while new connections work: a
consumer that notices (a heartbeat, a timeout) reconnects and recovers, one that does not
waits forever.

Two figures per consumer, both from the moment of the freeze, printed and recorded as test
properties (`--junitxml`) for bench/failures.py:

- noticed: when the consumer was seen on the wire reconnecting: its channel subscribed again
  on a new connection through the proxy (for the publisher, a command on a new connection).
  Black-box: it reads the proxy's copy of what clients sent, not the service's internals.
- recovered: when what the consumer serves was seen working again (an event reached its
  destination, a request was answered, ownership converged).

The issue's bound for noticing is 10 s; the assertion allows 5 s more for a loaded 2-core
machine, and the whole recovery gets 30 s. Recovery is checked first, so a failure says
whether the consumer stayed broken or only noticed late.

On the code before the shared subscriber: the hub, the control listener and the bridge never
notice (they wait on `get_message` forever) and fail by timeout; the membership converges
through its heartbeat (a command connection with a 5 s timeout) but its change watcher never
subscribes again, and fails there; the publisher already notices (5 s socket timeout, 5 s idle
ping) and passes: its test guards that.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from google.cloud import firestore
from websockets.asyncio.client import connect

from listeners.cluster import CHANGES_CHANNEL, owner
from listeners.config import Settings
from listeners.service import Service
from listeners_bridge import Bridge
from listeners_bridge.resync import resync_request
from listeners_testkit.auth import LocalIssuer
from listeners_testkit.processes import RedisServer
from listeners_testkit.proxy import Link, TcpProxy
from tests.conftest import CONTROL_TOKEN, Consumer, Firebase, wait_until
from tests.test_bridge import Tab, converged, published
from tests.test_cluster import carried
from tests.test_pipeline import serving
from tests.test_websocket import Client, ws_settings
from tests.test_websocket import serving as serving_app

pytestmark = pytest.mark.asyncio

NOTICE_BOUND = 10.0  # issue 12: every consumer notices a half-open connection within this
LOAD_MARGIN = 5.0  # a loaded 2-core machine schedules late
RECOVERY_TIMEOUT = 30.0


# -- the wire, as the proxy saw it ----------------------------------------------------


def parse(sent: bytes) -> list[tuple[int, list[bytes]]]:
    """(offset just past it, arguments) of each complete RESP command in a client's traffic."""
    found: list[tuple[int, list[bytes]]] = []
    at = 0
    while sent.startswith(b"*", at):
        try:
            end = sent.index(b"\r\n", at)
            count, at = int(sent[at + 1 : end]), end + 2
            args = []
            for _ in range(count):
                end = sent.index(b"\r\n", at)
                size, at = int(sent[at + 1 : end]), end + 2
                args.append(sent[at : at + size])
                at += size + 2
        except ValueError:
            break  # cut off by the proxy's head limit, or not a RESP array
        if at > len(sent):
            break
        found.append((at, args))
    return found


def subscribed_at(link: Link, channel: str) -> float | None:
    """When this connection sent a SUBSCRIBE that includes `channel`."""
    for end, args in parse(link.sent):
        if args and args[0].upper() == b"SUBSCRIBE" and channel.encode() in args[1:]:
            return link.at(end - 1)
    return None


def commanded_at(link: Link, names: tuple[bytes, ...]) -> float | None:
    """When a connection that never subscribed sent one of these commands."""
    parsed = parse(link.sent)
    if any(args and args[0].upper() in (b"SUBSCRIBE", b"PSUBSCRIBE") for _, args in parsed):
        return None
    return next((link.at(end - 1) for end, args in parsed if args and args[0].upper() in names), None)


class Fault:
    """A freeze of (some of) the proxy's connections, and what happened since, on the wire."""

    def __init__(self, proxy: TcpProxy, where: Callable[[Link], bool] | None = None) -> None:
        self.proxy = proxy
        self.at = time.monotonic()
        self.frozen = proxy.freeze(where)
        assert self.frozen > 0, "nothing was connected through the proxy"

    def new_links(self) -> list[Link]:
        return [link for link in self.proxy.links() if not link.frozen and link.opened_at >= self.at]

    def resubscribed(self, channel: str) -> float | None:
        times = [t for link in self.new_links() if (t := subscribed_at(link, channel)) is not None]
        return min(times) - self.at if times else None

    def reconnected(self, *names: bytes) -> float | None:
        times = [t for link in self.new_links() if (t := commanded_at(link, names)) is not None]
        return min(times) - self.at if times else None

    def since(self) -> float:
        return time.monotonic() - self.at


async def noticed(measure: Callable[[], float | None], what: str) -> float:
    """Seconds from the freeze until `measure` saw the consumer reconnect; fails past the bound."""
    try:
        async with asyncio.timeout(RECOVERY_TIMEOUT):
            while (seconds := measure()) is None:
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(
            f"{what}: never reconnected in {RECOVERY_TIMEOUT:.0f} s after the freeze"
        ) from None
    assert seconds <= NOTICE_BOUND + LOAD_MARGIN, f"{what}: noticed after {seconds:.1f} s"
    return seconds


async def recovered(fault: Fault, check: Awaitable[object], what: str) -> float:
    """Seconds from the freeze until `check` completes; fails after RECOVERY_TIMEOUT."""
    try:
        async with asyncio.timeout(RECOVERY_TIMEOUT):
            await check
    except TimeoutError:
        raise AssertionError(f"{what}: not recovered {RECOVERY_TIMEOUT:.0f} s after the freeze") from None
    return fault.since()


def report(record: Callable[[str, object], None], consumer: str, **figures: float) -> None:
    """Printed, and recorded as test properties: noticed_s, recovered_s, and where it applies
    lost (writes made during the fault that never reached the consumer) and duplicates (a
    write's delta delivered more than once)."""
    for name, value in figures.items():
        record(name, round(value, 2))
    shown = ", ".join(f"{name} {round(value, 2):g}" for name, value in figures.items())
    print(f"\nhalf-open {consumer}: {shown}")


def extra(deltas: int) -> int:
    """Duplicates among the deltas of one write (it may also come by a sync alone: 0 deltas)."""
    return max(0, deltas - 1)


def adds_of(events: list[dict[str, Any]], doc_id: str) -> int:
    return sum(1 for e in events if e["type"] == "notif.add" and e["payload"]["doc_id"] == doc_id)


# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[TcpProxy]:
    with TcpProxy(redis_server.port) as running:
        yield running


def via(settings: Settings, proxy: TcpProxy, **changes: Any) -> Settings:
    """The same settings, with Redis reached through the proxy."""
    return dataclasses.replace(
        settings, redis=dataclasses.replace(settings.redis, port=proxy.port), **changes
    )


def subscribers(link: Link) -> bool:
    """Connections that subscribed to something: the idle pub/sub flows a NAT forgets first."""
    return any(args and args[0].upper() == b"SUBSCRIBE" for _, args in parse(link.sent))


def has(uid: str, doc_id: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: any(e["uid"] == uid and doc_id in carried(e) for e in events)


# -- one test per consumer ----------------------------------------------------------------


async def test_publisher(
    settings: Settings,
    proxy: TcpProxy,
    fb: Firebase,
    subscribe: Any,
    record_property: Callable[[str, object], None],
) -> None:
    """After the freeze, a Firestore write reaches a direct subscriber (as its add, or in a
    sync that has it): the publisher gave up the dead connection and published on a new one."""
    consumer: Consumer = await subscribe("hp-pub")
    async with serving(via(settings, proxy), fb):
        await fb.online("hp-pub")
        # The attach's sync first: Google's emulator can miss a write made while a watch starts.
        await consumer.wait_for(lambda events: bool(consumer.of_type("notif.sync")))
        await fb.notification("hp-pub", "before")
        await consumer.wait_for(has("hp-pub", "before"))
        fault = Fault(proxy)
        await fb.notification("hp-pub", "during")
        took = await recovered(fault, consumer.wait_for(has("hp-pub", "during")), "publisher")
        seen = await noticed(lambda: fault.reconnected(b"PUBLISH", b"PING"), "publisher")
    dupes = extra(adds_of(consumer.events, "during"))
    report(record_property, "publisher", noticed_s=seen, recovered_s=took, lost=0, duplicates=dupes)


async def test_hub(
    settings: Settings,
    proxy: TcpProxy,
    fb: Firebase,
    issuer_and_url: tuple[LocalIssuer, str],
    issuer: LocalIssuer,
    record_property: Callable[[str, object], None],
) -> None:
    """A Direct-mode WebSocket keeps receiving: after the freeze, a write reaches the socket
    (a resync may come first). The whole service reaches Redis through the proxy."""
    wss = ws_settings(via(settings, proxy), issuer_and_url[1])
    async with serving_app(wss) as (url, _):
        await fb.online("hp-hub")
        async with connect(f"{url}?token={issuer.mint('hp-hub')}") as ws:
            client = Client(ws)
            await client.next("notif.sync")
            fault = Fault(proxy)
            await fb.notification("hp-hub", "during")
            arrived = client.until_sentinel(
                0, lambda: asyncio.sleep(0), lambda m: "during" in carried(m), timeout=RECOVERY_TIMEOUT + 1
            )
            took = await recovered(fault, arrived, "hub")
            seen = await noticed(lambda: fault.resubscribed("user:hp-hub"), "hub")
    dupes = extra(adds_of(client.received, "during"))
    report(record_property, "hub", noticed_s=seen, recovered_s=took, lost=0, duplicates=dupes)


async def test_control(
    settings: Settings,
    proxy: TcpProxy,
    fb: Firebase,
    subscribe: Any,
    redis_server: RedisServer,
    record_property: Callable[[str, object], None],
) -> None:
    """After the freeze, a signed resync request published on the real Redis is answered with a
    sync on `user:{uid}`.

    Only the subscribed connections are frozen (idle pub/sub flows are what a NAT or a load
    balancer forgets first): the publisher keeps its path, so it never resyncs everyone on its
    own, and a sync after the request can only be the control listener's answer."""
    consumer: Consumer = await subscribe("hp-ctl")
    async with serving(via(settings, proxy), fb):
        await fb.online("hp-ctl")
        await consumer.wait_for(lambda events: bool(consumer.of_type("notif.sync")))
        direct = aioredis.Redis(port=redis_server.port)
        fault = Fault(proxy, where=subscribers)
        channel = settings.redis.control_channel

        async def answered() -> None:
            # A request published before the new subscription is in place is lost (Pub/Sub
            # keeps nothing): ask again every 2 s, as the bridge does every 5 s.
            start = consumer.mark()
            while True:
                await direct.publish(channel, resync_request(CONTROL_TOKEN, "hp-ctl"))
                try:
                    await consumer.wait_for(
                        lambda events: any(e["type"] == "notif.sync" for e in events[start:]), timeout=2
                    )
                    return
                except TimeoutError:
                    continue

        took = await recovered(fault, answered(), "control listener")
        seen = await noticed(lambda: fault.resubscribed(channel), "control listener")
        await direct.aclose()
    report(record_property, "control", noticed_s=seen, recovered_s=took)


USERS = [f"hp-m{i}" for i in range(8)]


async def test_membership(
    settings: Settings,
    proxy: TcpProxy,
    fb: Firebase,
    subscribe: Any,
    redis_server: RedisServer,
    record_property: Callable[[str, object], None],
) -> None:
    """After the freeze of instance a's Redis, instance b joins (directly): a sees it, each user is
    served by exactly one of them, and every write is published exactly once (counted up to a
    sentinel write after it, on the same user's stream)."""
    consumer: Consumer = await subscribe(*USERS)
    first = via(settings, proxy, instance_id="hp-a")
    second = dataclasses.replace(settings, instance_id="hp-b")
    for uid in USERS:
        await fb.online(uid)
    async with serving(first, fb) as a:
        await wait_until(lambda: set(a.node.sessions) >= set(USERS))
        await consumer.wait_for(lambda events: {e["uid"] for e in events} >= set(USERS))
        fault = Fault(proxy)
        async with serving(second, fb) as b:
            expected = {uid: owner(uid, ("hp-a", "hp-b")) for uid in USERS}
            assert set(expected.values()) == {"hp-a", "hp-b"}, "pick users that both instances share"
            took = await recovered(fault, partitioned(a, b, expected), "membership")
            seen = await noticed(lambda: fault.resubscribed(CHANGES_CHANNEL), "membership")
            published = await published_once(consumer, fb, redis_server, "after")
    lost = sum(1 for uid in USERS if published[(uid, f"after-{uid}")] == 0)
    dupes = sum(extra(n) for n in published.values())
    report(record_property, "membership", noticed_s=seen, recovered_s=took, lost=lost, duplicates=dupes)
    assert published == {(uid, f"after-{uid}"): 1 for uid in USERS}, published


async def partitioned(a: Service, b: Service, expected: dict[str, str]) -> None:
    """Each user is served by its owner alone (a moved user is let go after the handover)."""
    while not (
        set(a.node.sessions) & set(USERS) == {u for u, o in expected.items() if o == "hp-a"}
        and set(b.node.sessions) & set(USERS) == {u for u, o in expected.items() if o == "hp-b"}
    ):
        await asyncio.sleep(0.05)


async def published_once(
    consumer: Consumer, fb: Firebase, redis_server: RedisServer, tag: str
) -> Counter[tuple[str, str]]:
    """One write per user, then a sentinel per user: how often each write was published."""
    await synced(consumer, redis_server)
    since = consumer.mark()
    for uid in USERS:
        await fb.notification(uid, f"{tag}-{uid}")
    for uid in USERS:
        await fb.notification(uid, f"{tag}-sentinel-{uid}")
    sentinels = {(uid, f"{tag}-sentinel-{uid}") for uid in USERS}

    def adds(events: list[dict[str, Any]]) -> set[tuple[str, str]]:
        return {(e["uid"], e["payload"]["doc_id"]) for e in events if e["type"] == "notif.add"}

    try:
        await consumer.wait_for(lambda events: sentinels <= adds(events[since:]))
    except TimeoutError:
        raise AssertionError(
            f"sentinels never published: {sentinels - adds(consumer.events[since:])}"
        ) from None
    # Up to the last sentinel: a duplicate of a write lands before its user's sentinel.
    last = max(i for i, e in enumerate(consumer.events) if i >= since and adds([e]) & sentinels)
    return Counter(
        (e["uid"], e["payload"]["doc_id"])
        for e in consumer.events[since:last]
        if e["type"] == "notif.add" and not e["payload"]["doc_id"].startswith(f"{tag}-sentinel-")
    )


async def synced(consumer: Consumer, redis_server: RedisServer) -> None:
    """Ask for every user's state until each one's sync has come (as tests/test_cluster.py's
    Recorder does): a sync comes only from a watch that has had its first snapshot, and Google's
    emulator can miss a change written while a watch (of a user that just moved) is starting."""
    direct = aioredis.Redis(port=redis_server.port)
    since = consumer.mark()
    try:
        async with asyncio.timeout(RECOVERY_TIMEOUT):
            while missing := set(USERS) - {
                e["uid"] for e in consumer.events[since:] if e["type"] == "notif.sync"
            }:
                for uid in missing:
                    await direct.publish("listeners:control", resync_request(CONTROL_TOKEN, uid))
                await asyncio.sleep(1.0)
    finally:
        await direct.aclose()


async def test_bridge(
    settings: Settings,
    proxy: TcpProxy,
    fb: Firebase,
    db: firestore.Client,
    record_property: Callable[[str, object], None],
) -> None:
    """`Bridge(...).events(uid)` through the proxy keeps yielding the user's events after the
    freeze; the service itself reaches Redis directly."""
    async with serving(settings, fb) as service:
        await fb.online("hp-br")
        tab = Tab(Bridge(via(settings, proxy).redis), "hp-br")
        await wait_until(lambda: published(service, "hp-br", "notif.sync"))  # its watch is set up
        await fb.notification("hp-br", "before")
        await converged(tab, db, "hp-br")
        fault = Fault(proxy)
        await fb.notification("hp-br", "during")

        async def has_during() -> None:
            while not any(i["doc_id"] == "during" for i in tab.items):
                await asyncio.sleep(0.05)

        took = await recovered(fault, has_during(), "bridge")
        seen = await noticed(lambda: fault.resubscribed("user:hp-br"), "bridge")
        await converged(tab, db, "hp-br")
        await tab.close()
    dupes = extra(adds_of(tab.events, "during"))
    report(record_property, "bridge", noticed_s=seen, recovered_s=took, lost=0, duplicates=dupes)
