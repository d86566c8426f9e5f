"""One user's direct messages: Realtime Database `clients/{uid}/direct_message_notif`.

The stream mirrors the node. The first read of a connection hands the whole mirror to the
view (after a reconnect: a new epoch and a sync alone); every later event hands over only
the children it touched, normalised alone, so each change costs time in proportion to the
change, not to the number of messages. The view emits `msg.add` / `msg.update` /
`msg.remove`. `msg.sync` also carries `new_message` (null in a sync alone; with
`sync_each_change`, the newest message of the batch) and `has_new_messages` (any message at
all: reading one deletes it), as the old UI payload did.
"""

from __future__ import annotations

import logging
from typing import Any

from listeners.normalise.messages import normalise_message
from listeners.source.rtdb_wire import RtdbSource, RtdbStream
from listeners.streams.view import DEFAULT_PUBLISHING, Emit, EventNames, Item, PublishedView, Publishing
from listeners_bridge.events import MSG_ADD, MSG_REMOVE, MSG_SYNC, MSG_UPDATE
from listeners_bridge.timestamps import newest_first

log = logging.getLogger(__name__)

NAMES = EventNames(sync=MSG_SYNC, add=MSG_ADD, update=MSG_UPDATE, remove=MSG_REMOVE)


def _sync_payload(items: list[Item], added: list[Item]) -> dict[str, Any]:
    ordered = newest_first(items)
    newest = newest_first(added)
    return {
        "messages": ordered,
        "count": len(ordered),
        "new_message": newest[0] if newest else None,
        "has_new_messages": bool(ordered),
    }


class MessageStream:
    kind = "messages"

    def __init__(
        self,
        uid: str,
        companies: frozenset[str],
        client: RtdbSource,
        emit: Emit,
        publishing: Publishing = DEFAULT_PUBLISHING,
    ) -> None:
        self.uid = uid
        self._client = client
        self._view = PublishedView(uid, NAMES, emit, companies, _sync_payload, publishing=publishing)
        self._stream: RtdbStream | None = None
        self._reconnects = 0
        self._skipped: set[str] = set()

    @property
    def path(self) -> str:
        return f"clients/{self.uid}/direct_message_notif"

    def start(self) -> None:
        self._view.restart()
        try:
            self._stream = self._client.stream(self.path, self._on_change, on_failed=self._on_failed)
        except ValueError as exc:  # a key the database refuses (e.g. a "." in a uid): fails alone
            self._on_failed(f"{type(exc).__name__}: {exc}")

    @property
    def healthy(self) -> bool:
        return self._stream is not None and self._stream.active

    def restart_due(self, now: float) -> bool:
        return False  # the client reconnects by itself; a cancelled stream stays failed

    async def restart(self, now: float) -> None:
        return None

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()

    def set_companies(self, companies: frozenset[str]) -> None:
        self._view.set_companies(companies)

    def resync(self) -> None:
        self._view.resync()

    def rebase(self) -> None:
        self._view.rebase()

    def _on_change(self, tree: Any) -> None:
        stream = self._stream
        if stream is not None and stream.reconnects != self._reconnects:
            self._reconnects = stream.reconnects
            self._view.restart()  # a fresh full read: consumers get a fresh sync
        nodes = tree if isinstance(tree, dict) else {}
        changed = stream.last_changed if stream is not None else None
        if changed is None or not self._view.synced:
            self._skipped &= nodes.keys()  # bounded by the node's own children
            items = {k: item for k in nodes if (item := self._item(k, nodes[k])) is not None}
            self._view.replace(items)
            return
        upserts: dict[str, Item] = {}
        removed: list[str] = []
        for push_id in changed:
            item = self._item(push_id, nodes.get(push_id))
            if item is None:
                removed.append(push_id)
            else:
                upserts[push_id] = item
        self._view.change(upserts, removed)

    def _item(self, push_id: str, node: Any) -> Item | None:
        if node is None:
            self._skipped.discard(push_id)
            return None
        if not isinstance(node, dict):
            if push_id not in self._skipped:  # once per node, not once per change
                self._skipped.add(push_id)
                log.warning(
                    "direct message skipped: not a map",
                    extra={"uid": self.uid, "doc_id": push_id, "reason": type(node).__name__},
                )
            return None
        return normalise_message(push_id, node)

    def _on_failed(self, reason: str) -> None:
        log.error("stream failed", extra={"uid": self.uid, "stream": self.kind, "reason": reason})
