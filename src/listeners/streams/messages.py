"""One user's direct messages: Realtime Database `clients/{uid}/direct_message_notif`.

The stream mirrors the node; every change hands the whole mirror to the view, which emits
`msg.add` / `msg.update` / `msg.remove` and one `msg.sync`. After a reconnect (a fresh full
read) the view starts again with a sync alone. `msg.sync` also carries `new_message` (the
newest message that arrived in this batch, or null) and `has_new_messages` (any message
at all: reading one deletes it), as the old UI payload did.
"""

from __future__ import annotations

import logging
from typing import Any

from listeners.events import MSG_ADD, MSG_REMOVE, MSG_SYNC, MSG_UPDATE
from listeners.normalise.messages import normalise_message
from listeners.normalise.notifications import newest_first
from listeners.source.rtdb import NodeStream, RtdbClient
from listeners.streams.view import Emit, EventNames, Item, PublishedView

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

    def __init__(self, uid: str, companies: frozenset[str], client: RtdbClient, emit: Emit) -> None:
        self.uid = uid
        self._client = client
        self._view = PublishedView(uid, NAMES, emit, companies, _sync_payload)
        self._stream: NodeStream | None = None
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

    def _on_change(self, tree: Any) -> None:
        stream = self._stream
        if stream is not None and stream.reconnects != self._reconnects:
            self._reconnects = stream.reconnects
            self._view.restart()  # a fresh full read: consumers get a fresh sync
        nodes = tree if isinstance(tree, dict) else {}
        items: dict[str, Item] = {}
        for push_id, node in nodes.items():
            if not isinstance(node, dict):
                if push_id not in self._skipped:  # once per node, not once per change
                    self._skipped.add(push_id)
                    log.warning(
                        "direct message skipped: not a map",
                        extra={"uid": self.uid, "doc_id": push_id, "reason": type(node).__name__},
                    )
                continue
            items[push_id] = normalise_message(push_id, node)
        self._view.replace(items)

    def _on_failed(self, reason: str) -> None:
        log.error("stream failed", extra={"uid": self.uid, "stream": self.kind, "reason": reason})
