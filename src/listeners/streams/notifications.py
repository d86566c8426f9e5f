"""One user's notifications: `clients/{uid}/notifications` where `read == false`.

Each snapshot holds every unread document, so the stream diffs it against what it last
published: the deltas and the sync come from the listener's own data, with no re-query.
The first snapshot of a watch yields exactly one `notif.sync`; later snapshots yield the
deltas and one `notif.sync`, and a snapshot that changes nothing yields nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from listeners.backoff import Backoff
from listeners.envelope import Envelope
from listeners.events import (
    NOTIF_ADD,
    NOTIF_REMOVE,
    NOTIF_SYNC,
    NOTIF_UPDATE,
    NotificationItem,
)
from listeners.normalise.notifications import newest_first, normalise_notification, visible
from listeners.normalise.timestamps import format_utc
from listeners.source.snapshots import Query, Snapshot, SnapshotSource, Watch

log = logging.getLogger(__name__)

Emit = Callable[[Envelope, float | None], None]  # envelope, Firestore update time (epoch s)


class NotificationStream:
    kind = "notifications"

    def __init__(self, uid: str, companies: frozenset[str], source: SnapshotSource, emit: Emit) -> None:
        self.uid = uid
        self._companies = companies
        self._source = source
        self._emit = emit
        self._watch: Watch | None = None
        self._watch_id: object | None = None
        self._all: dict[str, NotificationItem] = {}  # every unread item, before the company filter
        self._update_times: dict[str, datetime | None] = {}
        self._published: dict[str, NotificationItem] | None = None  # None until the first sync
        self._failures = 0  # consecutive watches that ended before their first snapshot
        self._retry_at = 0.0
        self._backoff = Backoff(base=0.5, cap=30.0)

    @property
    def query(self) -> Query:
        return Query(f"clients/{self.uid}/notifications", (("read", False),))

    def start(self) -> None:
        watch_id = object()
        self._watch_id = watch_id

        def on_snapshot(snapshot: Snapshot) -> None:
            if self._watch_id is watch_id:  # ignore late callbacks of a replaced watch
                self._on_snapshot(snapshot)

        self._published = None
        try:
            self._watch = self._source.watch(self.query, on_snapshot)
        except Exception as exc:  # left unhealthy: the node's supervisor retries with backoff
            log.error(
                "stream failed to start",
                extra={
                    "uid": self.uid,
                    "stream": self.kind,
                    "reason": f"{type(exc).__name__}: {exc}",
                },
            )

    @property
    def healthy(self) -> bool:
        return self._watch is not None and self._watch.active

    def restart_due(self, now: float) -> bool:
        return not self.healthy and now >= self._retry_at

    async def restart(self, now: float) -> None:
        """Replace a watch that ended, with backoff; its first snapshot is a fresh sync."""
        self._retry_at = now + self._backoff.delay(self._failures)
        self._failures += 1
        await self.close()
        self.start()

    async def close(self) -> None:
        self._watch_id = None
        watch, self._watch = self._watch, None
        if watch is not None:
            await watch.close()

    def set_companies(self, companies: frozenset[str]) -> None:
        """A new company filter applies at once, as a fresh sync."""
        if companies == self._companies:
            return
        self._companies = companies
        if self._published is not None:
            self._published = self._visible()
            self._emit_sync()

    def resync(self) -> None:
        if self._published is not None:
            self._emit_sync()

    def _visible(self) -> dict[str, NotificationItem]:
        return {k: v for k, v in self._all.items() if visible(v, self._companies)}

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        fresh: dict[str, NotificationItem] = {}
        update_times: dict[str, datetime | None] = {}
        for doc in snapshot.docs:
            known = self._all.get(doc.id)
            # The emulator (and a resumed stream) resends unchanged documents: reuse their item.
            if (
                known is not None
                and doc.update_time is not None
                and self._update_times.get(doc.id) == doc.update_time
            ):
                fresh[doc.id] = known
            else:
                fresh[doc.id] = normalise_notification(doc.id, doc.data)
            update_times[doc.id] = doc.update_time
        self._all, self._update_times = fresh, update_times
        self._failures = 0
        current = self._visible()
        previous, self._published = self._published, current
        if previous is None:
            self._emit_sync()
            return
        changed = False
        read_time = _epoch(snapshot.read_time)
        for doc_id, item in current.items():
            before = previous.get(doc_id)
            if before == item:
                continue
            changed = True
            kind = NOTIF_ADD if before is None else NOTIF_UPDATE
            lag_from = _epoch(update_times.get(doc_id)) or read_time
            self._emit(Envelope.create(kind, self.uid, dict(item)), lag_from)
        for doc_id in previous.keys() - current.keys():
            changed = True
            self._emit(Envelope.create(NOTIF_REMOVE, self.uid, {"doc_id": doc_id}), read_time)
        if changed:
            self._emit_sync()

    def _emit_sync(self) -> None:
        items = newest_first((self._published or {}).values())
        payload = {
            "notifications": items,
            "count": len(items),
            "timestamp": format_utc(datetime.now(UTC)),
        }
        self._emit(Envelope.create(NOTIF_SYNC, self.uid, payload), None)


def _epoch(moment: datetime | None) -> float | None:
    return moment.timestamp() if moment is not None else None
