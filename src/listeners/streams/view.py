"""What one stream last published for one user, and the events that move consumers on.

Each source hands over the whole current set of items (a Firestore snapshot, a Realtime
Database mirror); the view diffs it against what consumers were last told, emits the
deltas, then one sync. The first set after a (re)start is a sync alone, and a set that
changes nothing visible emits nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from listeners.envelope import Envelope
from listeners.normalise.timestamps import format_utc

Item = Mapping[str, Any]
# (envelope, source update time in epoch seconds for the lag) -> False when it was dropped
Emit = Callable[[Envelope, float | None], bool]
SyncPayload = Callable[[list[Item], list[Item]], dict[str, Any]]  # (visible items, added) -> payload


@dataclass(frozen=True, slots=True)
class EventNames:
    sync: str
    add: str
    update: str
    remove: str


class PublishedView:
    def __init__(
        self,
        uid: str,
        names: EventNames,
        emit: Emit,
        companies: frozenset[str],
        sync_payload: SyncPayload,
    ) -> None:
        self.uid = uid
        self._names = names
        self._emit = emit
        self._companies = companies
        self._sync_payload = sync_payload
        self._all: dict[str, Item] = {}  # every item, before the company filter
        self._published: dict[str, Item] | None = None  # None until the first sync

    @property
    def synced(self) -> bool:
        return self._published is not None

    def restart(self) -> None:
        """The next set is a fresh start: a sync alone, whatever consumers had."""
        self._published = None

    def replace(self, items: dict[str, Item], lag_from: Mapping[str, float | None] | None = None) -> None:
        self._all = items
        current = self._visible()
        previous, self._published = self._published, current
        if previous is None:
            self._emit_sync([])
            return
        added: list[Item] = []
        lags = lag_from or {}
        for doc_id, item in current.items():
            before = previous.get(doc_id)
            if before == item:
                continue
            if before is None:
                added.append(item)
            kind = self._names.add if before is None else self._names.update
            self._emit(Envelope.create(kind, self.uid, dict(item)), lags.get(doc_id))
        removed = previous.keys() - current.keys()
        for doc_id in sorted(removed):
            self._emit(Envelope.create(self._names.remove, self.uid, {"doc_id": doc_id}), None)
        if current != previous:
            self._emit_sync(added)

    def set_companies(self, companies: frozenset[str]) -> None:
        """A new company filter applies at once, as a fresh sync."""
        if companies == self._companies:
            return
        self._companies = companies
        if self._published is not None:
            self._published = self._visible()
            self._emit_sync([])

    def resync(self) -> None:
        if self._published is not None:
            self._emit_sync([])

    def _visible(self) -> dict[str, Item]:
        if not self._companies:
            return dict(self._all)
        return {k: v for k, v in self._all.items() if v.get("collection_id") in self._companies}

    def _emit_sync(self, added: list[Item]) -> None:
        payload = self._sync_payload(list((self._published or {}).values()), added)
        payload["timestamp"] = format_utc(datetime.now(UTC))
        self._emit(Envelope.create(self._names.sync, self.uid, payload), None)
