"""Builds and runs one service instance from its settings: broker, publisher, source, node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from listeners import __version__
from listeners.config import Settings
from listeners.control import ControlListener, ResyncRequest
from listeners.metrics import Metrics
from listeners.node import Node, NodeSettings
from listeners.publish.broker import Broker
from listeners.publish.publisher import Publisher
from listeners.publish.redis import RedisBroker
from listeners.source.firestore import FirestoreSource
from listeners.source.snapshots import SnapshotSource

log = logging.getLogger(__name__)

_FIRESTORE_SCOPES = ["https://www.googleapis.com/auth/datastore"]


@dataclass
class Service:
    settings: Settings
    metrics: Metrics
    publisher: Publisher
    source: SnapshotSource
    node: Node
    control: ControlListener
    stopping: bool = False

    def health(self) -> dict[str, object]:
        redis = "ok" if self.publisher.up else "down"
        ok = redis == "ok" and self.node.registry_healthy and not self.stopping
        return {
            "status": "ok" if ok else "degraded",
            "version": __version__,
            "listeners_count": len(self.node.sessions),
            "redis": redis,
        }


def firestore_source(settings: Settings) -> FirestoreSource:
    credentials = None
    if not settings.firebase.emulator_host and settings.firebase.admin_json is not None:
        from google.oauth2 import service_account

        info = json.loads(settings.firebase.admin_json.reveal())
        credentials = service_account.Credentials.from_service_account_info(info, scopes=_FIRESTORE_SCOPES)  # type: ignore[no-untyped-call]
    return FirestoreSource(
        settings.firebase.project_id,
        credentials,
        max_streams_per_connection=settings.max_streams_per_connection,
    )


@contextlib.asynccontextmanager
async def running(
    settings: Settings, *, broker: Broker | None = None, source: SnapshotSource | None = None
) -> AsyncIterator[Service]:
    """The whole service, started; on exit it stops the listeners, then flushes what is queued."""
    metrics = Metrics()
    broker = broker or RedisBroker(settings.redis)
    source = source or firestore_source(settings)
    publisher = Publisher(broker, metrics, max_queue=settings.publish_queue_max)
    node = Node(
        NodeSettings(
            channel_prefix=settings.redis.channel_prefix,
            default_ttl_seconds=settings.service.heartbeat_ttl_seconds,
            sweep_interval_seconds=settings.sweep_interval_seconds,
        ),
        source,
        publisher,
        metrics,
    )
    publisher.resync = node.resync

    def on_resync(request: ResyncRequest) -> None:
        node.resync({request.uid})

    control = ControlListener(settings.redis, on_resync)
    publishing = asyncio.create_task(publisher.run(), name="publisher")
    listening = asyncio.create_task(control.run(), name="control")
    service = Service(settings, metrics, publisher, source, node, control)
    log.info("service starting", extra={"version": __version__, "instance_id": settings.instance_id})
    try:
        async with node:
            yield service
            service.stopping = True
            log.info("service stopping: closing listeners")
    finally:
        service.stopping = True
        budget = settings.shutdown_timeout_seconds
        if publisher.up and not await publisher.flush(budget / 2):
            log.warning("shutdown: events still queued were dropped", extra={"dropped": publisher.queued})
        for task in (listening, publishing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await broker.disconnect()
        await source.aclose()
        log.info("service stopped")
