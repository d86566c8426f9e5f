"""One user's notifications: Firestore `clients/{uid}/notifications` where `read == false`.

Each snapshot holds every unread document, so the view diffs it against what it last
published: deltas and syncs come from the listener's own data, with no re-query. A new
watch (at attach, or replacing one that ended) starts with exactly one `notif.sync`.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from listeners.normalise.notifications import normalise_notification
from listeners.source.snapshots import Query, Snapshot, SnapshotSource, Watch
from listeners.streams.view import (
    DEFAULT_PUBLISHING,
    Emit,
    EventNames,
    Item,
    PublishedView,
    Publishing,
    digest,
)
from listeners_bridge.backoff import Backoff
from listeners_bridge.events import NOTIF_ADD, NOTIF_REMOVE, NOTIF_SYNC, NOTIF_UPDATE
from listeners_bridge.timestamps import newest_first

log = logging.getLogger(__name__)

NAMES = EventNames(sync=NOTIF_SYNC, add=NOTIF_ADD, update=NOTIF_UPDATE, remove=NOTIF_REMOVE)


def _sync_payload(items: list[Item], added: list[Item]) -> dict[str, Any]:
    ordered = newest_first(items)
    return {"notifications": ordered, "count": len(ordered)}


class NotificationStream:
    kind = "notifications"

    def __init__(
        self,
        uid: str,
        companies: frozenset[str],
        source: SnapshotSource,
        emit: Emit,
        publishing: Publishing = DEFAULT_PUBLISHING,
    ) -> None:
        self.uid = uid
        self._source = source
        self._view = PublishedView(uid, NAMES, emit, companies, _sync_payload, publishing=publishing)
        self._watch: Watch | None = None
        self._watch_id: object | None = None
        self._closed = False
        self._items: dict[str, Item] = {}
        self._versions: dict[str, datetime | None] = {}
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

        self._view.restart()
        try:
            self._watch = self._source.watch(self.query, on_snapshot)
        except Exception as exc:  # left unhealthy: the node's supervisor retries with backoff
            log.error(
                "stream failed to start",
                extra={"uid": self.uid, "stream": self.kind, "reason": f"{type(exc).__name__}: {exc}"},
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
        await self._close_watch()
        if not self._closed:  # the user may have been detached while the old watch closed
            self.start()

    async def close(self) -> None:
        self._closed = True
        await self._close_watch()

    async def _close_watch(self) -> None:
        self._watch_id = None
        watch, self._watch = self._watch, None
        if watch is not None:
            await watch.close()

    def set_companies(self, companies: frozenset[str]) -> None:
        self._view.set_companies(companies)

    def resync(self) -> None:
        self._view.resync()

    def rebase(self) -> None:
        self._view.rebase()

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        items: dict[str, Item] = {}
        versions: dict[str, datetime | None] = {}
        for doc in snapshot.docs:
            known = self._items.get(doc.id)
            unchanged = doc.update_time is not None and self._versions.get(doc.id) == doc.update_time
            # The emulator (and a resumed stream) resends unchanged documents: reuse their item.
            if known is not None and unchanged:
                items[doc.id] = known
            else:
                items[doc.id] = normalise_notification(doc.id, doc.data)
            versions[doc.id] = doc.update_time
        self._items, self._versions = items, versions
        self._failures = 0
        read_time = snapshot.read_time.timestamp() if snapshot.read_time else None
        lag_from = {k: (v.timestamp() if v else read_time) for k, v in versions.items()}
        # The update time names the change: the same on every instance that watches the document.
        changes = {k: _version(v) if v is not None else digest(items[k]) for k, v in versions.items()}
        self._view.replace(items, lag_from, changes)


def _version(update_time: datetime) -> str:
    nanos = getattr(update_time, "nanosecond", 0)  # the SDK's DatetimeWithNanoseconds
    return f"{update_time.isoformat()}+{nanos}ns" if nanos else update_time.isoformat()
