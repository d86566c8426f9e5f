"""Builds and runs one service instance from its settings: broker, publisher, source, node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlsplit

from listeners import __version__
from listeners.cluster import IdentityConflict, Membership, owner
from listeners.config import Settings
from listeners.control import ControlListener, ResyncRequest
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
    rtdb: RtdbClient | None = None
    stopping: bool = False
    dead_tasks: list[str] = field(default_factory=list)  # background tasks that ended with an error

    def supervise(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        """A background task that must run for the whole life of the instance: if it dies,
        say so in the log and in /healthz instead of going on silently without it."""

        def done(finished: asyncio.Task[None]) -> None:
            if finished.cancelled() or finished.exception() is None:
                return
            error = finished.exception()
            self.dead_tasks.append(finished.get_name())
            log.error(
                "background task died",
                extra={"task": finished.get_name(), "reason": f"{type(error).__name__}: {error}"},
            )

        task.add_done_callback(done)
        return task

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
        ok = redis == "ok" and self.node.registry_healthy and not self.stopping and not self.dead_tasks
        return {
            "status": "ok" if ok else "degraded",
            "version": __version__,
            "listeners_count": len(self.node.sessions),
            "redis": redis,
        }


def firestore_source(settings: Settings) -> SnapshotSource:
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
) -> AsyncIterator[Service]:
    """The whole service, started; on exit it stops the listeners, then flushes what is queued."""
    metrics = Metrics()
    broker = broker or RedisBroker(settings.redis)
    source = source or firestore_source(settings)
    rtdb = rtdb or rtdb_client(settings)
    membership = Membership(settings.redis, settings.instance_id)
    publisher = Publisher(broker, metrics, max_queue=settings.publish_queue_max)
    node = Node(
        NodeSettings(
            channels=Channels(settings.redis.channel_prefix, settings.redis.chat_channel_prefix),
            default_ttl_seconds=settings.service.heartbeat_ttl_seconds,
            sweep_interval_seconds=settings.sweep_interval_seconds,
            close_timeout_seconds=settings.shutdown_timeout_seconds / 4,
            handover_seconds=HANDOVER_SECONDS,
        ),
        Sources(source, rtdb, settings.firebase.chat_mark_read),
        publisher,
        metrics,
        owns=membership.owns,
        members=lambda: len(membership.members),
    )
    metrics.instance.labels(settings.instance_id).set(1)
    publisher.resync = node.resync
    membership.on_change(node.rebalance)

    def on_resync(request: ResyncRequest) -> None:
        node.resync_user(request.uid, request.threads)

    control = ControlListener(settings.redis, on_resync, metrics)
    publishing = asyncio.create_task(publisher.run(), name="publisher")
    listening = asyncio.create_task(control.run(), name="control")
    coordinating = asyncio.create_task(membership.run(), name="membership")
    service = Service(settings, metrics, publisher, source, node, control, membership, rtdb)
    for task in (publishing, listening, coordinating):
        service.supervise(task)
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
            # The registry's first snapshot: from here on, every registry write is seen (Google's
            # emulator may drop a write made while a listener is still opening).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REGISTRY_WAIT_SECONDS):
                    await node.registry_ready.wait()
            yield service
            service.stopping = True
            log.info("service stopping: handing users over, then closing listeners")
            others = len(membership.members) > 1
            await membership.leave()
            if others:
                await asyncio.sleep(HANDOVER_SECONDS)  # the others attach while we still serve
    finally:
        service.stopping = True
        budget = settings.shutdown_timeout_seconds
        if publisher.up and not await publisher.flush(budget / 4):
            log.warning("shutdown: events still queued were dropped", extra={"dropped": publisher.queued})
        await stop_tasks((listening, publishing, coordinating), budget / 4)
        with contextlib.suppress(Exception):
            await broker.disconnect()
        await source.aclose()
        if rtdb is not None:
            await rtdb.aclose()
        log.info("service stopped")


async def stop_tasks(tasks: Iterable[asyncio.Task[None]], timeout: float) -> None:
    """Cancel and wait, within a bound: a task that ignores its cancellation (a library that
    swallows it mid-connect) must not hold the shutdown past its budget."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    done, stuck = await asyncio.wait(tasks, timeout=timeout)
    for task in done:  # what they died of was logged when they died (an identity conflict, say)
        if not task.cancelled():
            task.exception()
    if stuck:
        log.warning("shutdown: tasks did not stop in time", extra={"tasks": [t.get_name() for t in stuck]})
