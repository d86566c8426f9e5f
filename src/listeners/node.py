"""The node: watches the registry and keeps one `UserSession` per online user.

Everything here runs on the event loop, and attach and detach are plain synchronous
dict updates, so they cannot race with each other; only the closing of a detached
user's watches is awaited, in the background.

Users whose state may have changed (a registry change, a change of membership) are queued
and reconciled in slices of at most `slice_seconds`, the loop free in between: taking over
a thousand users from a dead instance, or the first snapshot of a large registry, must not
stall delivery to everyone else.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType

from listeners.envelope import Envelope
from listeners.metrics import Metrics
from listeners.publish.publisher import Publisher
from listeners.session import Sources, StreamOptions, UserSession
from listeners.source.snapshots import Query, Snapshot, SourceDoc, Watch
from listeners.streams import UserStream
from listeners.streams.view import Emit
from listeners_bridge.backoff import Backoff
from listeners_bridge.channels import Channels
from listeners_bridge.inputs import MAX_UID_LENGTH, clean_text, valid_uid
from listeners_bridge.registry import (
    REGISTRY_COLLECTION,
    ChatThread,
    MalformedEntry,
    RegistryEntry,
    parse_entry,
)
from listeners_bridge.waits import wait_event

log = logging.getLogger(__name__)

# Only online entries: an offline one is not served, and a user who goes offline leaves the
# query's result, which the node reads as gone. Every heartbeat of an online user still comes.
REGISTRY_QUERY = Query(REGISTRY_COLLECTION, (("status", "online"),))
ONLINE_COUNT_SECONDS = 15.0  # how often the online users and the Listen targets are counted (O(n))


@dataclass(frozen=True, slots=True)
class NodeSettings:
    channels: Channels = field(default_factory=Channels)
    streams: StreamOptions = field(default_factory=StreamOptions)
    default_ttl_seconds: int = 90
    sweep_interval_seconds: float = 1.0
    close_timeout_seconds: float = 4.0
    handover_seconds: float = 1.5  # a user that moved away is served here this long after
    slice_seconds: float = 0.02  # longest run of reconciles before the loop gets a turn
    # Streams whose health one sweep looks at: a failed stream is noticed within
    # users / health_checks_per_sweep sweeps, and a sweep stays short at 10,000 users.
    health_checks_per_sweep: int = 1000


class Node:
    def __init__(
        self,
        settings: NodeSettings,
        sources: Sources,
        publisher: Publisher,
        metrics: Metrics,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        owns: Callable[[str], bool] = lambda uid: True,
        members: Callable[[], int] = lambda: 1,
    ) -> None:
        self._settings = settings
        self._sources = sources
        self._source = sources.firestore
        self._publisher = publisher
        self._metrics = metrics
        self._clock = clock
        self._owns = owns
        self._members = members
        self.sessions: dict[str, UserSession] = {}
        self._moving: dict[str, float] = {}  # uid -> monotonic time to let a moved user go
        self._entries: dict[str, RegistryEntry] = {}  # last valid registry entry of each uid
        self._online_counted_at = -ONLINE_COUNT_SECONDS  # monotonic: the metric's last count
        # (expiry as a POSIX time, tie-break, entry): entries replaced since are skipped when popped
        self._expiries: list[tuple[float, int, RegistryEntry]] = []
        self._pushes = itertools.count()
        self._health_round: list[str] = []  # users whose streams the sweeps still have to check
        self._failed_in_round = 0
        self._versions: dict[str, object] = {}  # uid -> update time of the document last read
        self._registry: Watch | None = None
        self._registry_failures = 0
        self._registry_retry_at = 0.0
        self._registry_generation = 0  # callbacks of a replaced registry watch are ignored
        self._registry_seeded = False  # the current watch delivered its first snapshot
        self._closing: set[asyncio.Task[None]] = set()
        self._dirty: dict[str, None] = {}  # users to reconcile, in the order they came
        self._dirty_added = asyncio.Event()
        self._attaching = True  # False once the instance stops: nobody new is taken
        self.registry_ready = asyncio.Event()  # set by the registry's first snapshot
        self.settled = asyncio.Event()  # set once the users of that snapshot are reconciled

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Node:
        self._start_registry()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def stop_attaching(self) -> None:
        """The instance is stopping: attach nobody from now on (those served stay served)."""
        self._attaching = False

    async def aclose(self, timeout: float | None = None) -> None:
        """Stops the registry watch and detaches every user (`run` must be stopped first),
        waiting at most `timeout` (default: the settings' close timeout) for their watches."""
        self._registry_generation += 1
        self._dirty.clear()
        if self._registry is not None:
            # Closed within the same budget as the users' watches: the SDK's close can hang.
            closing = asyncio.create_task(self._registry.close(), name="close-registry")
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            self._registry = None
        for count, uid in enumerate(list(self.sessions), 1):
            self._detach(uid, "shutdown")
            if count % 100 == 0:
                await asyncio.sleep(0)  # the loop still has a flush and a socket close to do
        if self._closing:
            # A watch's close joins SDK threads, up to a second each while Firestore is
            # unreachable: past the budget the rest is abandoned (their threads are daemons).
            budget = self._settings.close_timeout_seconds if timeout is None else timeout
            _, pending = await asyncio.wait(self._closing, timeout=budget)
            if pending:
                log.warning("shutdown: watches left closing", extra={"pending": len(pending)})

    def abandon(self) -> None:
        """The process is about to exit: forget every user without closing their watches (the
        kernel closes the sockets; closing them one by one costs seconds at 10,000 users)."""
        self._registry_generation += 1
        self._dirty.clear()
        self._registry = None
        self._metrics.detaches.labels("shutdown").inc(len(self.sessions))
        log.info("shutdown: users left to the exit", extra={"count": len(self.sessions)})
        self.sessions.clear()
        self._moving.clear()

    @property
    def registry_healthy(self) -> bool:
        return self._registry is not None and self._registry.active

    # -- registry ----------------------------------------------------------------

    def _start_registry(self) -> None:
        self._registry_generation += 1
        generation = self._registry_generation

        def on_snapshot(snapshot: Snapshot) -> None:
            # A replaced watch may still deliver a snapshot it had in flight: an older view,
            # which would undo what the new watch said.
            if generation == self._registry_generation:
                self._on_registry(snapshot)

        self._registry_seeded = False
        try:
            self._registry = self._source.watch(REGISTRY_QUERY, on_snapshot)
        except Exception as exc:
            log.error("registry watch failed to start", extra={"reason": f"{type(exc).__name__}: {exc}"})

    def _on_registry(self, snapshot: Snapshot) -> None:
        self._registry_failures = 0
        self.registry_ready.set()
        changed: set[str] = set()
        if snapshot.changes is not None and self._registry_seeded:
            # Heartbeats change the registry all the time: the work is the changed entries.
            for doc in snapshot.changes.upserted:
                self._read_entry(doc, changed)
            gone: Iterable[str] = snapshot.changes.removed
        else:  # a new watch's first view, or a source that does not say what changed
            for doc in snapshot.docs:
                self._read_entry(doc, changed)
            gone = self._versions.keys() - {doc.id for doc in snapshot.docs}
        for uid in list(gone):
            self._versions.pop(uid, None)
            self._entries.pop(uid, None)
            changed.add(uid)
        self._registry_seeded = True
        self._reconcile_soon(changed)

    def _read_entry(self, doc: SourceDoc, changed: set[str]) -> None:
        # Sources without changes deliver the whole collection: skip documents already read.
        if doc.update_time is not None and self._versions.get(doc.id) == doc.update_time:
            return
        self._versions[doc.id] = doc.update_time
        changed.add(doc.id)
        try:
            if not valid_uid(doc.id):
                # it would make `chat:{uid}:…` ambiguous, or a database path another user's
                raise MalformedEntry("the document id is not a valid uid")
            entry = parse_entry(doc.id, doc.data, self._settings.default_ttl_seconds)
        except Exception as exc:  # MalformedEntry, or anything a hostile document triggers
            self._warn_malformed(doc.id, str(exc) if isinstance(exc, MalformedEntry) else type(exc).__name__)
            return  # the last valid entry, if any, stays in force (and can expire)
        self._set_entry(entry)

    def _set_entry(self, entry: RegistryEntry) -> None:
        self._entries[entry.uid] = entry
        heapq.heappush(self._expiries, (entry.expires_at().timestamp(), next(self._pushes), entry))
        if len(self._expiries) > 2 * len(self._entries) + 1024:
            # Heartbeats push an item each; with long TTLs the stale ones would pile up.
            entries = self._entries.values()
            self._expiries = [(e.expires_at().timestamp(), next(self._pushes), e) for e in entries]
            heapq.heapify(self._expiries)

    def _expired(self, now: datetime) -> list[str]:
        """Users whose current entry expired by `now`: the work is the expiries, not the users."""
        expired = []
        limit = now.timestamp()
        while self._expiries and self._expiries[0][0] <= limit:
            entry = heapq.heappop(self._expiries)[2]
            if self._entries.get(entry.uid) is entry:
                expired.append(entry.uid)
        return expired

    def _warn_malformed(self, uid: str, reason: str) -> None:
        # Called once per document version: unchanged documents are not read again.
        self._metrics.malformed_registry.inc()
        self._metrics.rejected_inputs.labels("registry").inc()
        log.warning(
            "registry document skipped as malformed",
            extra={"uid": clean_text(uid)[:MAX_UID_LENGTH], "reason": reason},
        )

    def _reconcile(self, uid: str) -> None:
        entry = self._entries.get(uid)
        online = entry is not None and entry.is_online(self._clock())
        session = self.sessions.get(uid)
        if online and entry is not None and self._owns(uid):
            taken_back = self._moving.pop(uid, None) is not None
            if session is None:
                if self._attaching:
                    self._attach(entry)
            else:
                session.update(entry)
                if taken_back:
                    # Consumers may have followed the other instance's epoch meanwhile: a new
                    # epoch with a sync here, or they would drop this one's events as stale.
                    session.rebase()
        elif session is not None and online and entry is not None:
            # Another instance serves this user now. Keep serving until it has surely
            # attached: an overlap of a moment rather than a gap.
            session.update(entry)
            self._moving.setdefault(uid, time.monotonic() + self._settings.handover_seconds)
        elif session is not None:
            # No entry: it left the online query (went offline, or was deleted).
            reason = "offline" if entry is None else entry.status if entry.status != "online" else "expired"
            self._detach(uid, reason)

    def rebalance(self) -> None:
        """The set of instances changed: take the users that are ours now, hand over the rest."""
        self._reconcile_soon(self._entries.keys() | self.sessions.keys())

    def _reconcile_soon(self, uids: Iterable[str]) -> None:
        for uid in uids:
            self._dirty[uid] = None
        if self._dirty:
            self._dirty_added.set()

    @property
    def pending(self) -> int:
        """Users waiting to be reconciled."""
        return len(self._dirty)

    async def _reconcile_dirty(self) -> None:
        """Reconciles queued users, `slice_seconds` at a time, until none is left."""
        loop = asyncio.get_running_loop()
        while self._dirty:
            until = loop.time() + self._settings.slice_seconds
            while True:  # at least one user per slice, whatever the slice
                uid = next(iter(self._dirty))
                del self._dirty[uid]
                self._reconcile_safely(uid)
                if not self._dirty or loop.time() >= until:
                    break
            await asyncio.sleep(0)

    def _reconcile_safely(self, uid: str) -> None:
        try:
            self._reconcile(uid)
        except Exception:  # a bug for one user must not leave the others unattended
            log.exception("reconcile failed", extra={"uid": uid})

    # -- sessions ----------------------------------------------------------------

    def _emit_to(self, channel: str) -> Emit:
        def emit(envelope: Envelope, lag_from: float | None) -> bool:
            return self._publisher.submit(channel, envelope, lag_from)

        return emit

    def _attach(self, entry: RegistryEntry) -> None:
        session = UserSession(
            entry, self._sources, self._settings.streams, self._emit_to, self._settings.channels
        )
        self.sessions[entry.uid] = session
        session.start()
        self._metrics.attaches.inc()
        log.info("user attached", extra={"uid": entry.uid})

    def _detach(self, uid: str, reason: str) -> None:
        self._moving.pop(uid, None)
        session = self.sessions.pop(uid)
        task = asyncio.create_task(self._close(session), name=f"close-{uid}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        self._metrics.detaches.labels(reason).inc()
        log.info("user detached", extra={"uid": uid, "reason": reason})

    async def _close(self, session: UserSession) -> None:
        channels = session.channels()
        await session.close()
        # A position for its last events would come from here after the next owner's sync (a
        # needless resync for each of the user's consumers); that sync covers those events.
        self._publisher.forget_tails(channels)

    def resync(self, uids: set[str] | None = None) -> None:
        """A fresh sync for these users (None: all), after events could not be delivered.
        Users being handed over are left to their new instance: a sync from here, the old
        one, would pull consumers back to an epoch that ends in a moment."""
        for uid, session in self.sessions.items():
            if (uids is None or uid in uids) and uid not in self._moving:
                session.resync()

    def entry(self, uid: str) -> RegistryEntry | None:
        """The user's last valid registry entry, attached here or not."""
        return self._entries.get(uid)

    def resync_user(self, uid: str, threads: Iterable[ChatThread]) -> None:
        """On a consumer's request: fresh syncs of the user's streams and of these threads.
        A user who is not attached here gets nothing: attaching sends syncs anyway."""
        session = self.sessions.get(uid)
        if session is not None and uid not in self._moving:  # the new instance answers
            session.resync(threads)

    # -- periodic work -----------------------------------------------------------

    async def run(self) -> None:
        """Reconciles queued users as they come; sweeps logical expiry (nothing in Firestore
        changes when it happens) and replaces watches that ended."""
        registry_backoff = Backoff(base=0.5, cap=30.0)
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + self._settings.sweep_interval_seconds
        while True:
            self._dirty_added.clear()
            if self._dirty:
                await self._reconcile_dirty()
                continue
            if self.registry_ready.is_set():
                self.settled.set()
            await wait_event(self._dirty_added, max(0.0, next_sweep - loop.time()))
            if loop.time() < next_sweep:
                continue
            next_sweep = loop.time() + self._settings.sweep_interval_seconds
            try:
                await self._sweep(registry_backoff)
            except Exception:  # one bad round must not end expiry and watch replacement for good
                log.exception("node sweep failed; next round in %ss", self._settings.sweep_interval_seconds)

    async def _sweep(self, registry_backoff: Backoff) -> None:
        for uid in self._expired(self._clock()):
            if uid in self.sessions:
                self._detach(uid, "expired")
        mono = time.monotonic()
        for uid, deadline in list(self._moving.items()):
            if uid not in self.sessions:
                del self._moving[uid]
            elif self._owns(uid):  # taken back: a new epoch, as in _reconcile
                del self._moving[uid]
                self.sessions[uid].rebase()
            elif mono >= deadline:
                self._detach(uid, "moved to another instance")
        self._metrics.registry_up.set(1 if self.registry_healthy else 0)
        if self._sources.rtdb is not None:
            self._metrics.rtdb_streams.set(self._sources.rtdb.open_streams)
        if mono - self._online_counted_at >= ONLINE_COUNT_SECONDS:  # O(users): not each sweep
            self._online_counted_at = mono
            now = self._clock()
            self._metrics.registry_online.set(sum(e.is_online(now) for e in self._entries.values()))
            for state, count in self._source.targets().items():
                self._metrics.listen_targets.labels(state).set(count)
        if not self.registry_healthy and mono >= self._registry_retry_at:
            log.warning("registry watch ended; replacing it")
            self._metrics.stream_restarts.labels("registry").inc()
            self._registry_retry_at = mono + registry_backoff.delay(self._registry_failures)
            self._registry_failures += 1
            if self._registry is not None:
                await self._registry.close()
            self._start_registry()
        restarts = self._health_checks(mono)
        for session, stream in restarts:
            log.warning("stream ended; replacing it", extra={"uid": session.uid, "stream": stream.kind})
            self._metrics.stream_restarts.labels(stream.kind).inc()
        if restarts:
            await asyncio.gather(*(stream.restart(mono) for _, stream in restarts), return_exceptions=True)
        self._metrics.attached_users.set(len(self.sessions))
        self._metrics.cluster_members.set(self._members())
        self._metrics.open_streams.set(self._source.open_streams)
        self._metrics.firestore_connections.set(self._source.connections)

    def _health_checks(self, mono: float) -> list[tuple[UserSession, UserStream]]:
        """The next `health_checks_per_sweep` users' streams that are due a restart. A round
        covers every user once; the failed-streams gauge is set at the end of each round."""
        if not self._health_round:
            self._metrics.failed_streams.set(self._failed_in_round)
            self._failed_in_round = 0
            self._health_round = list(self.sessions)
        batch = self._health_round[-self._settings.health_checks_per_sweep :]
        del self._health_round[-self._settings.health_checks_per_sweep :]
        due = []
        for uid in batch:
            session = self.sessions.get(uid)
            if session is None or uid in self._moving:
                continue
            for stream in session.all_streams():
                if not stream.healthy:
                    self._failed_in_round += 1
                    if stream.restart_due(mono):
                        due.append((session, stream))
        return due
