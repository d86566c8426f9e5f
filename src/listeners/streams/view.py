"""What one stream last published for one user, and the events that move consumers on.

A source hands over either the whole current set of items (a Firestore snapshot: `replace`)
or only what changed (a Realtime Database event: `change`). The view diffs that against what
consumers were last told and publishes the deltas alone, in order (streams.order stamps
`epoch` and `seq`). A sync (the whole visible list) is published when the stream starts or
restarts (a new epoch), on a company-filter change, on request and after Redis recovers;
with `sync_each_change` (the behaviour before issue 14, for consumers not yet migrated) also
after every batch of deltas. A set that changes nothing visible publishes nothing.

Each delta's `event_id` comes from its source: the document id and its version (Firestore's
update time), or a digest of the item when the source has no version (the Realtime
Database). Two instances that see the same change give it the same id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from listeners.envelope import Envelope
from listeners.streams.order import StreamOrder
from listeners_bridge.inputs import encode_json
from listeners_bridge.timestamps import format_utc

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


@dataclass(frozen=True, slots=True)
class Publishing:
    """How streams publish: the instance that names their epochs, and whether a sync follows
    every batch of deltas (`LISTENERS_SYNC_EACH_CHANGE`, for consumers not yet migrated)."""

    instance_id: str = "local"
    sync_each_change: bool = False


DEFAULT_PUBLISHING = Publishing()


def digest(item: Item) -> str:
    """A version for an item whose source has none: the same item gives the same text."""
    return hashlib.sha256(encode_json(dict(item))).hexdigest()[:16]


class PublishedView:
    def __init__(
        self,
        uid: str,
        names: EventNames,
        emit: Emit,
        companies: frozenset[str],
        sync_payload: SyncPayload,
        *,
        publishing: Publishing = DEFAULT_PUBLISHING,
    ) -> None:
        self.uid = uid
        self._names = names
        self._emit = emit
        self._companies = companies
        self._sync_payload = sync_payload
        self.order = StreamOrder(publishing.instance_id)
        self._sync_each_change = publishing.sync_each_change
        self._all: dict[str, Item] = {}  # every item, before the company filter
        self._versions: dict[str, str] = {}  # doc_id -> the version of the item in _all
        self._published: dict[str, Item] | None = None  # None until the first sync

    @property
    def synced(self) -> bool:
        return self._published is not None

    def restart(self) -> None:
        """The next set is a fresh start: a new epoch, a sync alone, whatever consumers had."""
        self._published = None
        self.order.new_epoch()

    def rebase(self) -> None:
        """A new epoch from the current state (this instance took the user back): a sync now."""
        self.order.new_epoch()
        if self._published is not None:
            self._emit_sync([])

    def replace(
        self,
        items: dict[str, Item],
        lag_from: Mapping[str, float | None] | None = None,
        versions: Mapping[str, str] | None = None,
    ) -> None:
        """The whole current set; `versions` (doc_id -> the source's version) name the changes."""
        previous_all = self._all
        self._all = items
        old_versions = self._versions
        self._versions = (
            dict(versions)
            if versions is not None
            else {k: (old_versions[k] if previous_all.get(k) == v and k in old_versions else digest(v))
                  for k, v in items.items()}
        )  # fmt: skip
        current = self._visible()
        previous, self._published = self._published, current
        if previous is None:
            self._emit_sync([])
            return
        keys = [*current, *(k for k in previous if k not in current)]
        self._publish_changes(previous, current, keys, old_versions, lag_from)

    def change(self, upserts: Mapping[str, Item], removed: Iterable[str]) -> None:
        """Only what changed: time proportional to the change, not to the list."""
        old_versions: dict[str, str] = {}
        touched: set[str] = set()
        for doc_id in removed:
            if doc_id in self._all:
                old_versions[doc_id] = self._versions.pop(doc_id, "")
                del self._all[doc_id]
                touched.add(doc_id)
        for doc_id, item in upserts.items():
            if self._all.get(doc_id) == item:
                continue
            if doc_id in self._versions:
                old_versions[doc_id] = self._versions[doc_id]
            self._all[doc_id] = item
            self._versions[doc_id] = digest(item)
            touched.add(doc_id)
        if self._published is None:
            self._published = self._visible()
            self._emit_sync([])
            return
        previous = {k: self._published[k] for k in touched if k in self._published}
        current = {k: self._all[k] for k in touched if k in self._all and self._shown(self._all[k])}
        for k in touched:
            if k in current:
                self._published[k] = current[k]
            else:
                self._published.pop(k, None)
        self._publish_changes(previous, current, sorted(touched), old_versions, None)

    def _publish_changes(
        self,
        previous: Mapping[str, Item],
        current: Mapping[str, Item],
        keys: Iterable[str],
        old_versions: Mapping[str, str],
        lag_from: Mapping[str, float | None] | None,
    ) -> None:
        added: list[Item] = []
        lags = lag_from or {}
        changed = False
        removed: list[str] = []
        for doc_id in keys:
            before, item = previous.get(doc_id), current.get(doc_id)
            if item is None:
                if before is not None:
                    removed.append(doc_id)
                continue
            if before == item:
                continue
            changed = True
            if before is None:
                added.append(item)
            kind = self._names.add if before is None else self._names.update
            identity = f"{doc_id}@{self._versions.get(doc_id, '')}"
            self._emit(self.order.stamp(kind, self.uid, dict(item), identity), lags.get(doc_id))
        for doc_id in sorted(removed):
            changed = True
            version = old_versions.get(doc_id, self._versions.get(doc_id, ""))
            identity = f"{doc_id}@{version}#removed"
            self._emit(self.order.stamp(self._names.remove, self.uid, {"doc_id": doc_id}, identity), None)
        if changed and self._sync_each_change:
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

    def _shown(self, item: Item) -> bool:
        return not self._companies or item.get("collection_id") in self._companies

    def _visible(self) -> dict[str, Item]:
        if not self._companies:
            return dict(self._all)
        return {k: v for k, v in self._all.items() if v.get("collection_id") in self._companies}

    def _emit_sync(self, added: list[Item]) -> None:
        payload = self._sync_payload(list((self._published or {}).values()), added)
        payload["timestamp"] = format_utc(datetime.now(UTC))
        self._emit(self.order.stamp(self._names.sync, self.uid, payload), None)
