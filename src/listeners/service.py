"""One running service instance: the parts it owns, how it starts and stops, and what it
tells the outside (health, where a user is served, the operations page's data).

It builds nothing: listeners.assemble makes the parts and hands them over. deliver/ sees it
only through `deliver.ports.Instance`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from listeners import __version__
from listeners.cluster import IdentityConflict, Membership, owner
from listeners.config import Settings
from listeners.control import ControlListener
from listeners.loopwatch import watch_loop
from listeners.metrics import Metrics
from listeners.node import Node
from listeners.publish.publisher import Publisher
from listeners.source.listen import ListenSource
from listeners.source.rtdb_wire import RtdbSource, WireClient
from listeners.source.snapshots import SnapshotSource
from listeners.supervisor import Supervisor
from listeners_bridge.broker import Broker

log = logging.getLogger(__name__)

HANDOVER_SECONDS = 1.5  # on SIGTERM, how long we keep serving after the others know we leave
STARTUP_WAIT_SECONDS = 3.0  # then start anyway: Redis may be down, and it recovers
REGISTRY_WAIT_SECONDS = 10.0  # then start anyway: the registry watch is replaced until it works
MAX_UIDS = 200  # online users listed by name on the operations page; the count is always exact
MAX_RECENT = 50  # last events shown there


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
    rtdb: RtdbSource | None = None
    stopping: bool = False
    failed: str | None = None  # why a task could not be kept alive: the process must go
    stop_deadline: float | None = None  # loop time by which the process must have stopped
    _leaving: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    @contextlib.asynccontextmanager
    async def run(self, *, process_exits: bool = False) -> AsyncIterator[None]:
        """Serves for the duration of the block; on exit it hands the users over, stops the
        listeners, then flushes what is queued and closes the clients.

        `process_exits`: the process ends right after, so the users' streams are left to the
        kernel instead of being closed one by one (10,000 Realtime Database streams take
        about 5 s to unwind); the Firestore channels and Redis are still closed.
        """
        settings, supervisor, membership = self.settings, self.supervisor, self.membership
        publisher, node = self.publisher, self.node
        supervisor.start("publisher", publisher.run)
        supervisor.start("control", self.control.run)
        supervisor.start("membership", membership.run)
        supervisor.start("loopwatch", lambda: watch_loop(self.metrics))
        log.info("service starting", extra={"version": __version__, "instance_id": settings.instance_id})
        # Attaching before the other instances are known would attach every user here first,
        # and before Redis answers would drop every first sync (to be resent a moment later).
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
                # The registry's first snapshot: from here on, every registry write is seen
                # (Google's emulator may drop a write made while a listener is still opening).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(REGISTRY_WAIT_SECONDS):
                        await node.registry_ready.wait()
                freezing = asyncio.create_task(freeze_after_attach(node), name="gc-freeze")
                yield
                freezing.cancel()
                await self._hand_over(process_exits)
        finally:
            await self._close(process_exits)

    async def _hand_over(self, process_exits: bool) -> None:
        leaving = self.begin_stop()
        log.info("service stopping: handing users over, then closing listeners")
        others = len(self.membership.members) > 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.time_left(2.0)):
                await asyncio.shield(leaving)
        if others:  # the others attach while we still serve
            await asyncio.sleep(self.time_left(HANDOVER_SECONDS))
        await self.supervisor.stop(["node"], self.time_left(1.0))
        if process_exits:
            self.node.abandon()
        else:
            await self.node.aclose(self.time_left(2.0))

    async def _close(self, process_exits: bool) -> None:
        if self.stop_deadline is None:  # stopping on an error before serving: no hand-over
            self.stopping = True
            self.stop_deadline = asyncio.get_running_loop().time() + self.settings.shutdown_timeout_seconds
        publisher = self.publisher
        if publisher.up and not await publisher.flush(self.time_left(1.5)):
            log.warning("shutdown: events still queued were dropped", extra={"dropped": publisher.queued})
        await self.supervisor.stop(timeout=self.time_left(1.0))
        rtdb_closing = [self.rtdb.aclose()] if self.rtdb is not None and not process_exits else []
        for closing in (self.broker.disconnect(), self.source.aclose(), *rtdb_closing):
            try:
                async with asyncio.timeout(self.time_left(1.0)):
                    await closing
            except Exception as exc:  # Redis or Firestore gone, or too slow: exit anyway
                log.warning("shutdown: a client did not close", extra={"reason": type(exc).__name__})
        if self._leaving is not None and not self._leaving.done():
            self._leaving.cancel()
        log.info("service stopped")

    def fail(self, reason: str) -> None:
        """A task could not be kept alive: the process must go (`health` says so meanwhile)."""
        self.failed = reason

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
        # The wire client's auth revoked or its token refresh failing: no direct message flows.
        database = self.rtdb.degraded_reason if isinstance(self.rtdb, WireClient) else None
        ok = redis == "ok" and self.node.registry_healthy and not self.stopping and listen is None
        ok = ok and database is None
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
        elif database is not None:
            body["reason"] = f"realtime database: {database}"
        return body

    def operations(self, websocket: dict[str, Any] | None, now: float | None = None) -> dict[str, Any]:
        """What the operations page shows: counts and identifiers, never a payload."""
        node, publisher, metrics = self.node, self.publisher, self.metrics
        uids = sorted(node.sessions)
        streams = [s for session in node.sessions.values() for s in session.all_streams()]
        events = {
            s.labels["type"]: s.value
            for metric in metrics.events.collect()
            for s in metric.samples
            if s.name.endswith("_total")
        }
        recent = list(publisher.recent)[-MAX_RECENT:]
        return {
            "instance_id": self.settings.instance_id,
            "version": __version__,
            "status": self.health()["status"],
            "time": time.time() if now is None else now,
            "redis": "up" if publisher.up else "down",
            "registry": "up" if node.registry_healthy else "down",
            "users": {"count": len(uids), "uids": uids[:MAX_UIDS], "truncated": len(uids) > MAX_UIDS},
            "streams": {
                "attached": len(streams),
                "failed": sum(not s.healthy for s in streams),
                "firestore_open": self.source.open_streams,
                "rtdb_open": self.rtdb.open_streams if self.rtdb is not None else 0,
                "restarts": _total(metrics.stream_restarts),
            },
            "events": events,
            "publish": {"queued": publisher.queued, "failures": _total(metrics.publish_failures)},
            "websocket": websocket,
            # Field by field: `recent` holds identifiers only, and this keeps it that way.
            "recent": [
                {
                    "at": e.get("at", 0),
                    "uid": e.get("uid", ""),
                    "type": e.get("type", ""),
                    "doc_id": e.get("doc_id", ""),
                }
                for e in reversed(recent)
            ],
        }


def _total(samples: Any) -> float:
    return float(
        sum(s.value for metric in samples.collect() for s in metric.samples if s.name.endswith("_total"))
    )


async def freeze_after_attach(node: Node) -> None:
    """Once the registry's first users are attached, move every object allocated so far out of
    the collector's reach (gc.freeze): modules and sessions live as long as the process, and a
    full collection that walks them holds the GIL, stalling every user's delivery
    (measured in docs/benchmarks.md)."""
    await node.settled.wait()
    gc.freeze()
    log.info("start-up objects frozen", extra={"count": gc.get_freeze_count()})
