"""Every long-lived task is supervised: one that dies is restarted and delivery goes on; one
that keeps dying stops the process with a non-zero status, so that ECS replaces it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from listeners.cluster import Membership
from listeners.config import Settings
from listeners.control import ControlListener
from listeners.deliver.hub import Hub
from listeners.metrics import Metrics
from listeners.node import Node
from listeners.process import EXIT_SHUTDOWN_CUT, EXIT_TASK_FAILED
from listeners.publish.publisher import Publisher
from listeners.supervisor import Fatal, Supervisor
from listeners_bridge.resync import resync_request
from listeners_testkit.auth import LocalIssuer
from listeners_testkit.processes import RedisServer, ServiceProcess
from tests.conftest import CONTROL_TOKEN, Consumer, Firebase, service_env, wait_until
from tests.test_websocket import Client, serving, ws_settings

pytestmark = pytest.mark.asyncio


def quick(on_fatal: Callable[[str], None], max_restarts: int = 3) -> Supervisor:
    from listeners_bridge.backoff import Backoff

    return Supervisor(Metrics(), on_fatal, max_restarts=max_restarts, backoff=Backoff(base=0.01, cap=0.02))


async def test_a_task_that_dies_is_restarted() -> None:
    fatal: list[str] = []
    supervisor = quick(fatal.append)
    runs: list[int] = []
    forever = asyncio.Event()

    async def dies_once() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("a bug")
        await forever.wait()

    supervisor.start("worker", dies_once)
    await wait_until(lambda: len(runs) == 2)
    assert supervisor.restarts == {"worker": 1} and not fatal
    await supervisor.stop()


async def test_a_task_that_keeps_dying_or_raises_fatal_is_given_up() -> None:
    fatal: list[str] = []
    supervisor = quick(fatal.append, max_restarts=3)

    async def always_dies() -> None:
        raise RuntimeError("still broken")

    async def ends() -> None:
        return None  # a long-lived task that returns has died too

    async def conflict() -> None:
        raise Fatal("instance id taken")

    supervisor.start("broken", always_dies)
    await wait_until(lambda: len(fatal) == 1)
    assert fatal[0].startswith("broken: died 4 times") and "still broken" in fatal[0]
    assert supervisor.restarts["broken"] == 3
    supervisor.start("ends", ends)
    await wait_until(lambda: len(fatal) == 2)
    assert "it returned" in fatal[1]
    supervisor.start("conflict", conflict)
    await wait_until(lambda: len(fatal) == 3)
    assert fatal[2] == "conflict: instance id taken" and supervisor.restarts["conflict"] == 0
    await supervisor.stop()


class Explosive:
    """Replaces `cls.run`: the real one runs until `explode()`, then that run raises. The fault
    lands inside the running task, where no handler of the task's own expects it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: Any) -> None:
        self.name = cls.__name__
        self._armed: asyncio.Event | None = None
        original = cls.run

        async def run(instance: Any) -> None:
            self._armed = asyncio.Event()
            inner = asyncio.ensure_future(original(instance))
            armed = asyncio.ensure_future(self._armed.wait())
            try:
                await asyncio.wait({inner, armed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                armed.cancel()
                if not inner.done():
                    inner.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await inner
            if not inner.cancelled():
                inner.result()  # the real run ended by itself: as it did, so does this
                return
            raise RuntimeError(f"injected fault in {self.name}")

        monkeypatch.setattr(cls, "run", run)

    def explode(self) -> None:
        assert self._armed is not None, f"{self.name} is not running"
        self._armed.set()


TASKS = {
    "publisher": Publisher,
    "control": ControlListener,
    "membership": Membership,
    "node": Node,
    "hub": Hub,
}


async def test_each_task_of_the_service_that_dies_is_restarted_and_delivery_goes_on(
    settings: Settings,
    issuer_and_url: tuple[LocalIssuer, str],
    issuer: LocalIssuer,
    fb: Firebase,
    subscribe: Callable[..., Awaitable[Consumer]],
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    faults = {name: Explosive(monkeypatch, cls) for name, cls in TASKS.items()}
    consumer = await subscribe("tia")
    async with serving(ws_settings(settings, issuer_and_url[1])) as (url, app):
        service = app.state.service
        await fb.online("tia")
        await consumer.wait_for(lambda events: any(e["type"] == "notif.sync" for e in events))
        async with connect(f"{url}?token={issuer.mint('tia')}") as ws:
            socket = Client(ws)
            await socket.next("notif.sync")
            for number, (name, fault) in enumerate(faults.items()):
                fault.explode()
                await wait_until(lambda: service.supervisor.restarts[name] == 1)  # noqa: B023 - awaited here
                await wait_until(lambda: service.health()["status"] == "ok")
                # Delivery through every part: Firestore → publisher → Redis → consumer and hub.
                doc = f"after-{name}"
                await fb.notification("tia", doc)
                await consumer.wait_for(lambda events: holds(events, doc))  # noqa: B023 - awaited here
                await socket_sees(socket, doc)
                # The control listener answers a consumer's resync request (asked again until
                # answered, as consumers do: a request made while it resubscribes is lost).
                await resynced(consumer, redis_server)
                assert sum(service.supervisor.restarts.values()) == number + 1
            assert service.health()["task_restarts"] == dict.fromkeys(TASKS, 1)
            assert service.failed is None
            text = service.metrics.render().decode()
            assert all(f'listeners_task_restarts_total{{task="{name}"}} 1.0' in text for name in TASKS)


def holds(events: list[dict[str, Any]], doc_id: str) -> bool:
    return any(e["payload"].get("doc_id") == doc_id for e in events)


async def resynced(consumer: Consumer, redis_server: RedisServer) -> None:
    since = consumer.mark()
    async with aioredis.Redis(port=redis_server.port) as client, asyncio.timeout(60):
        while not any(e["type"] == "notif.sync" for e in consumer.events[since:]):
            await client.publish("listeners:control", resync_request(CONTROL_TOKEN, "tia"))
            with contextlib.suppress(TimeoutError):
                await consumer.wait_for(
                    lambda events: any(e["type"] == "notif.sync" for e in events[since:]), timeout=2
                )


async def socket_sees(socket: Client, doc_id: str) -> None:
    """The socket receives the add of `doc_id`, or a sync holding it (a hub that came back
    tells its sockets, which ask for a resync)."""

    def holds(message: dict[str, Any]) -> bool:
        if message["type"] == "notif.sync":
            return doc_id in json.dumps(message["payload"])
        return bool(message["type"] == "notif.add" and message["payload"].get("doc_id") == doc_id)

    await socket._receive_until(0, holds, 30)


async def test_a_process_whose_task_keeps_dying_exits_non_zero(
    redis_server: RedisServer, project_id: str, tmp_path: Path
) -> None:
    log = tmp_path / "service.log"
    env = service_env(redis_server.port, project_id, LISTENERS_TEST_FAULT="control-dies")
    service = ServiceProcess(env, log_path=log, app="tests.faulty_app:app")
    try:
        service.wait_listening(120)
        status = await asyncio.to_thread(service.process.wait, 180)
    finally:
        service.stop(signal.SIGKILL)
    text = log.read_text()
    assert status == EXIT_TASK_FAILED, text[-3000:]
    assert "task cannot be kept alive" in text and "injected fault" in text


async def test_a_shutdown_that_hangs_ends_within_its_budget(
    redis_server: RedisServer, project_id: str, tmp_path: Path
) -> None:
    """The loop itself is blocked during the shutdown: the watchdog thread ends the process
    when the budget is spent (a generous bound here: the point is that it ends at all)."""
    log = tmp_path / "service.log"
    env = service_env(
        redis_server.port,
        project_id,
        LISTENERS_TEST_FAULT="shutdown-hangs",
        LISTENERS_SHUTDOWN_TIMEOUT_SECONDS="2",
    )
    service = ServiceProcess(env, log_path=log, app="tests.faulty_app:app")
    try:
        service.wait_listening(120)
        async with httpx.AsyncClient(timeout=30) as http:
            await http.get(f"http://127.0.0.1:{service.port}/healthz")
        service.process.send_signal(signal.SIGTERM)
        status = await asyncio.to_thread(service.process.wait, 120)
    finally:
        service.stop(signal.SIGKILL)
    text = log.read_text()
    assert status == EXIT_SHUTDOWN_CUT and "shutdown budget exhausted" in text, text[-3000:]
