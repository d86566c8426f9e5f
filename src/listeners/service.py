"""Builds and runs one service instance from its settings: broker, publisher, source, node."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlsplit

from listeners import __version__
from listeners.cluster import IdentityConflict, Membership, owner
from listeners.config import Settings
from listeners.control import ControlListener, ResyncRequest
from listeners.loopwatch import watch_loop
from listeners.metrics import Metrics
from listeners.node import Node, NodeSettings
from listeners.publish.broker import Broker
from listeners.publish.publisher import Publisher
from listeners.publish.redis import RedisBroker
from listeners.session import Channels, Sources
from listeners.source.firestore import FirestoreSource
from listeners.source.listen import ListenSource
from listeners.source.rtdb import RtdbClient, ServiceAccountTokens
from listeners.source.snapshots import SnapshotSource
from listeners.streams.view import Publishing
from listeners.supervisor import Supervisor

log = logging.getLogger(__name__)

_FIRESTORE_SCOPES = ["https://www.googleapis.com/auth/datastore"]
HANDOVER_SECONDS = 1.5  # on SIGTERM, how long we keep serving after the others know we leave
STARTUP_WAIT_SECONDS = 3.0  # then start anyway: Redis may be down, and it recovers
REGISTRY_WAIT_SECONDS = 10.0  # then start anyway: the registry watch is replaced until it works


@dataclass
class Service:
    settings: Settings
    metrics: Metrics
    publisher: Publisher
    source: SnapshotSource
    node: Node
    control: ControlListener
    membership: Membership
    broker: Broker
    supervisor: Supervisor
    rtdb: RtdbClient | None = None
    stopping: bool = False
    failed: str | None = None  # why a task could not be kept alive: the process must go
    stop_deadline: float | None = None  # loop time by which the process must have stopped
    _leaving: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    def begin_stop(self) -> asyncio.Task[None]:
        """SIGTERM: take no more users and hand ours over now, without waiting for the
        application's shutdown (the server closes its connections first, which takes time).
        The shutdown's steps share the budget counted from here. Returns the leaving of the
        membership (the same task on every call)."""
        if self._leaving is None:
            loop = asyncio.get_running_loop()
            self.stopping = True
            self.stop_deadline = loop.time() + self.settings.shutdown_timeout_seconds
            self.node.stop_attaching()
            self._leaving = asyncio.create_task(self.membership.leave(), name="membership-leave")
        return self._leaving

    def time_left(self, most: float) -> float:
        """At most `most` seconds, and no more than what the shutdown budget has left (less
        half a second for what follows the last step)."""
        if self.stop_deadline is None:
            return most
        left = self.stop_deadline - 0.5 - asyncio.get_running_loop().time()
        return max(0.05, min(most, left))

    def user(self, uid: str) -> dict[str, object]:
        """Where a user is served, for operators (authenticated: it names a uid)."""
        entry = self.node.entry(uid)
        session = self.node.sessions.get(uid)
        return {
            "uid": uid,
            "owner": owner(uid, self.membership.members),
            "instance_id": self.settings.instance_id,
            "members": list(self.membership.members),
            "attached_here": session is not None,
            "registry": None
            if entry is None
            else {
                "status": entry.status,
                "online": entry.is_online(datetime.now(UTC)),
                "heartbeat_at": entry.heartbeat_at.isoformat(),
                "ttl_seconds": entry.ttl_seconds,
                "chat_threads": len(entry.chat_threads),
            },
            "streams": []
            if session is None
            else [{"kind": s.kind, "healthy": s.healthy} for s in session.all_streams()],
        }

    def health(self) -> dict[str, object]:
        redis = "ok" if self.publisher.up else "down"
        # A Listen stream refused for good (PERMISSION_DENIED...): retried slowly, no data flows.
        listen = self.source.degraded_reason if isinstance(self.source, ListenSource) else None
        ok = redis == "ok" and self.node.registry_healthy and not self.stopping and listen is None
        body: dict[str, object] = {
            "status": "failed" if self.failed else "ok" if ok else "degraded",
            "version": __version__,
            "listeners_count": len(self.node.sessions),
            "redis": redis,
        }
        # The specification's four fields always; these two only when there is something to say.
        restarts = {name: n for name, n in self.supervisor.restarts.items() if n}
        if restarts:
            body["task_restarts"] = restarts
        if self.failed:
            body["reason"] = self.failed
        elif listen is not None:
            body["reason"] = f"firestore: {listen}"
        return body


def firestore_source(settings: Settings, metrics: Metrics | None = None) -> SnapshotSource:
    credentials = None
    if not settings.firebase.emulator_host and settings.firebase.admin_json is not None:
        from google.oauth2 import service_account

        info = json.loads(settings.firebase.admin_json.reveal())
        credentials = service_account.Credentials.from_service_account_info(info, scopes=_FIRESTORE_SCOPES)  # type: ignore[no-untyped-call]
    if settings.firestore_source == "listen":
        return ListenSource(
            settings.firebase.project_id,
            emulator_host=settings.firebase.emulator_host or None,
            credentials=credentials,
            max_streams_per_connection=settings.max_streams_per_connection,
            targets_per_stream=settings.targets_per_stream,
            metrics=metrics,
        )
    return FirestoreSource(
        settings.firebase.project_id,
        credentials,
        max_streams_per_connection=settings.max_streams_per_connection,
    )


def rtdb_client(settings: Settings) -> RtdbClient | None:
    """The Realtime Database client, or None when no database is configured."""
    firebase = settings.firebase
    if firebase.database_emulator_host:
        namespace = rtdb_namespace(firebase.database_url, firebase.project_id)
        return RtdbClient(
            f"http://{firebase.database_emulator_host}", namespace=namespace, tokens=_emulator_token
        )
    if firebase.database_url and firebase.admin_json is not None:
        tokens = ServiceAccountTokens.from_service_account_info(json.loads(firebase.admin_json.reveal()))
        return RtdbClient(firebase.database_url, tokens=tokens)
    return None


async def _emulator_token(*, refresh: bool = False) -> str:
    return "owner"  # what the Firebase emulators take as an administrator's token


def rtdb_namespace(url: str, project_id: str) -> str:
    """`https://NAME.firebaseio.com` (or `?ns=NAME`) -> NAME; default `{project}-default-rtdb`."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if "ns" in query:
        return query["ns"]
    if parts.hostname:
        return parts.hostname.split(".")[0]
    return f"{project_id}-default-rtdb"


@contextlib.asynccontextmanager
async def running(
    settings: Settings,
    *,
    broker: Broker | None = None,
    source: SnapshotSource | None = None,
    rtdb: RtdbClient | None = None,
    on_fatal: Callable[[str], None] = lambda reason: None,
    process_exits: bool = False,
) -> AsyncIterator[Service]:
    """The whole service, started; on exit it stops the listeners, then flushes what is queued.

    `on_fatal(reason)` is called when a task cannot be kept alive (after `service.failed` is
    set): the application then stops the process with a non-zero status (deliver/http.py).
    `process_exits`: the process ends right after, so the users' streams are left to the
    kernel instead of being closed one by one (10,000 Realtime Database streams take about 5 s
    to unwind); the Firestore channels and Redis are still closed.
    """
    metrics = Metrics()
    broker = broker or RedisBroker(settings.redis, metrics)
    source = source or firestore_source(settings, metrics)
    rtdb = rtdb or rtdb_client(settings)
    membership = Membership(settings.redis, settings.instance_id, broker=broker)
    publisher = Publisher(broker, metrics, max_queue=settings.publish_queue_max)
    node = Node(
        NodeSettings(
            channels=Channels(settings.redis.channel_prefix, settings.redis.chat_channel_prefix),
            default_ttl_seconds=settings.service.heartbeat_ttl_seconds,
            sweep_interval_seconds=settings.sweep_interval_seconds,
            close_timeout_seconds=settings.shutdown_timeout_seconds / 4,
            handover_seconds=HANDOVER_SECONDS,
        ),
        Sources(
            source,
            rtdb,
            settings.firebase.chat_mark_read,
            Publishing(settings.instance_id, settings.sync_each_change),
            settings.chat_history,
        ),
        publisher,
        metrics,
        owns=(lambda uid: membership.conflict is None) if settings.single_instance else membership.owns,
        members=lambda: len(membership.members),
    )
    metrics.instance.labels(settings.instance_id).set(1)
    publisher.resync = node.resync
    membership.on_change(node.rebalance)

    def on_resync(request: ResyncRequest) -> None:
        node.resync_user(request.uid, request.threads)

    def fail(reason: str) -> None:
        service.failed = reason
        on_fatal(reason)

    control = ControlListener(broker, settings.redis, on_resync, metrics)
    supervisor = Supervisor(metrics, fail)
    service = Service(
        settings, metrics, publisher, source, node, control, membership, broker, supervisor, rtdb
    )
    supervisor.start("publisher", publisher.run)
    supervisor.start("control", control.run)
    supervisor.start("membership", membership.run)
    supervisor.start("loopwatch", lambda: watch_loop(metrics))
    log.info("service starting", extra={"version": __version__, "instance_id": settings.instance_id})
    # Attaching before the other instances are known would attach every user here first, and
    # before Redis answers would drop every first sync (to be resent a moment later).
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(STARTUP_WAIT_SECONDS):
            await membership.ready.wait()
            await publisher.ready.wait()
    if membership.contested:  # our id is another process's entry: is it alive? Within a TTL we know
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(membership.ttl_seconds + 2 * STARTUP_WAIT_SECONDS):
                await membership.ready.wait()
    try:
        if membership.conflict is not None:
            # The process must not serve, and must say so: startup fails, uvicorn exits non-zero.
            raise IdentityConflict(membership.conflict)
        async with node:
            supervisor.start("node", node.run)
            # The registry's first snapshot: from here on, every registry write is seen (Google's
            # emulator may drop a write made while a listener is still opening).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REGISTRY_WAIT_SECONDS):
                    await node.registry_ready.wait()
            freezing = asyncio.create_task(freeze_after_attach(node), name="gc-freeze")
            yield service
            freezing.cancel()
            leaving = service.begin_stop()
            log.info("service stopping: handing users over, then closing listeners")
            others = len(membership.members) > 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(service.time_left(2.0)):
                    await asyncio.shield(leaving)
            if others:  # the others attach while we still serve
                await asyncio.sleep(service.time_left(HANDOVER_SECONDS))
            await supervisor.stop(["node"], service.time_left(1.0))
            if process_exits:
                node.abandon()
            else:
                await node.aclose(service.time_left(2.0))
    finally:
        if service.stop_deadline is None:  # stopping on an error before serving: no hand-over
            service.stopping = True
            service.stop_deadline = asyncio.get_running_loop().time() + settings.shutdown_timeout_seconds
        if publisher.up and not await publisher.flush(service.time_left(1.5)):
            log.warning("shutdown: events still queued were dropped", extra={"dropped": publisher.queued})
        await supervisor.stop(timeout=service.time_left(1.0))
        rtdb_closing = [rtdb.aclose()] if rtdb is not None and not process_exits else []
        for closing in (broker.disconnect(), source.aclose(), *rtdb_closing):
            try:
                async with asyncio.timeout(service.time_left(1.0)):
                    await closing
            except Exception as exc:  # Redis or Firestore gone, or too slow: exit anyway
                log.warning("shutdown: a client did not close", extra={"reason": type(exc).__name__})
        if service._leaving is not None and not service._leaving.done():
            service._leaving.cancel()
        log.info("service stopped")


async def freeze_after_attach(node: Node) -> None:
    """Once the registry's first users are attached, move every object allocated so far out of
    the collector's reach (gc.freeze): modules and sessions live as long as the process, and a
    full collection that walks them holds the GIL, stalling every user's delivery
    (measured in docs/benchmarks.md)."""
    await node.settled.wait()
    gc.freeze()
    log.info("start-up objects frozen", extra={"count": gc.get_freeze_count()})
