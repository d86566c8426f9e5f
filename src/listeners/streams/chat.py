"""One chat thread a user has open: `{space_code}/{mode}/{thread_key}/messages`.

The stream mirrors only the thread's last `history` messages: the Realtime Database query
`orderBy="$key"&limitToLast=history` (push ids sort in creation order), so a thread's memory
is bounded by the setting (`LISTENERS_CHAT_HISTORY`), however long its history. On subscribe,
and after every reconnect (a new epoch), a `chat.sync` with the window's most recent unread
messages; then one `chat.message` per change holding each new displayable message once, in
order. A change is handled in time proportional to it: the stream names the children an
event touched, and only those are looked at. Ids already delivered are remembered only
while they are in the window.

Delivered messages are marked `read: true` in the database, as the old client did: in the
background, only when still unread, and never in the way of delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx

from listeners.normalise.chat import displayable, in_order, raw_message
from listeners.source.rtdb import RtdbError
from listeners.source.rtdb_wire import RtdbSource, RtdbStream
from listeners.streams.order import StreamOrder
from listeners.streams.view import DEFAULT_PUBLISHING, Emit, Publishing
from listeners_bridge.events import CHAT_MESSAGE, CHAT_SYNC
from listeners_bridge.registry import ChatThread

log = logging.getLogger(__name__)

RECENT = 50  # unread messages in a chat.sync
DEFAULT_HISTORY = 100  # messages of a thread mirrored: the Realtime Database's limitToLast
MARK_READ_QUEUE = 1000  # pending read marks per thread; beyond it marks are skipped, never delivery


class ChatStream:
    kind = "chat"

    def __init__(
        self,
        uid: str,
        thread: ChatThread,
        client: RtdbSource,
        emit: Emit,
        *,
        mark_read: bool,
        history: int = DEFAULT_HISTORY,
        publishing: Publishing = DEFAULT_PUBLISHING,
    ) -> None:
        self.uid = uid
        self.thread = thread
        self._client = client
        self._emit = emit
        self._mark_read = mark_read
        self.history = history
        self._order = StreamOrder(publishing.instance_id)
        self._stream: RtdbStream | None = None
        self._nodes: dict[str, Any] = {}  # the window, as the stream last handed it over
        self._seen: set[str] = set()  # delivered ids still in the window
        # Ids this stream marked read, still in the window: a sync carries them as if unread,
        # since handing a message to the publisher does not mean it reached the consumer (a
        # half-open Redis connection drops what was queued; Pub/Sub keeps nothing).
        self._marked: set[str] = set()
        self._synced = False
        self._reconnects = 0
        self._marks: asyncio.Queue[str] = asyncio.Queue(MARK_READ_QUEUE)
        self._marker: asyncio.Task[None] | None = None

    @property
    def path(self) -> str:
        t = self.thread
        return f"{t.space_code}/{t.mode}/{t.thread_key}/messages"

    @property
    def seen(self) -> int:
        """Delivered ids remembered: at most the window's size."""
        return len(self._seen)

    def start(self) -> None:
        self._synced = False
        query = {"orderBy": '"$key"', "limitToLast": str(self.history)}
        try:
            self._stream = self._client.stream(
                self.path, self._on_change, on_failed=self._on_failed, query=query
            )
        except ValueError as exc:  # a key the database refuses (e.g. a "." in a uid): fails alone
            self._on_failed(f"{type(exc).__name__}: {exc}")
        if self._mark_read and self._marker is None:
            self._marker = asyncio.create_task(self._mark_delivered(), name=f"chat-read {self.path}")

    @property
    def healthy(self) -> bool:
        return self._stream is not None and self._stream.active

    def restart_due(self, now: float) -> bool:
        return False

    async def restart(self, now: float) -> None:
        return None

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if self._marker is not None:
            self._marker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._marker
            self._marker = None
        if stream is not None:
            await stream.close()

    def set_companies(self, companies: frozenset[str]) -> None:
        return None  # the session closes threads whose company is no longer authorised

    def resync(self) -> None:
        if self._synced:
            self._emit_sync()

    def rebase(self) -> None:
        self._order.new_epoch()
        self.resync()

    def _on_change(self, tree: Any) -> None:
        stream = self._stream
        if stream is not None and stream.reconnects != self._reconnects:
            self._reconnects = stream.reconnects
            self._synced = False  # a fresh full read: a fresh sync
        self._nodes = tree if isinstance(tree, dict) else {}
        changed = stream.last_changed if stream is not None else None
        # Only what was handed to the publisher is marked read: a message dropped during a
        # Redis outage stays unread, so the resync after it still carries it.
        delivered: list[str] = []
        if not self._synced:
            self._synced = True
            self._order.new_epoch()
            self._marked &= self._nodes.keys()
            self._seen = {p for p in self._nodes if displayable(self._nodes[p])}
            shown = self._recent()
            delivered = [m["id"] for m in shown] if self._emit_sync(shown) else []
        else:
            if changed is None:  # the node replaced whole mid-stream: look at the window
                self._seen &= self._nodes.keys()
                self._marked &= self._nodes.keys()
            fresh: list[str] = []
            for push_id in self._nodes if changed is None else changed:
                node = self._nodes.get(push_id)
                if node is None:
                    self._seen.discard(push_id)  # left the window: forgotten
                    self._marked.discard(push_id)
                elif push_id not in self._seen and displayable(node):
                    fresh.append(push_id)
            if fresh:
                self._seen.update(fresh)
                delivered = self._emit_message(in_order({p: self._nodes[p] for p in fresh}))
        if self._mark_read:
            for push_id in delivered or ():
                with contextlib.suppress(asyncio.QueueFull):
                    self._marks.put_nowait(push_id)
                    self._marked.add(push_id)

    def _recent(self) -> list[dict[str, Any]]:
        """The window's most recent unread displayable messages, oldest first; those this
        stream marked read itself count as unread."""
        shown = [p for p in in_order(self._nodes) if self._shown(p)]
        return [raw_message(p, self._nodes[p]) for p in shown[-RECENT:]]

    def _shown(self, push_id: str) -> bool:
        node = self._nodes[push_id]
        if push_id in self._marked and isinstance(node, dict):
            return displayable({**node, "read": False})
        return displayable(node)

    def _payload(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "space_code": self.thread.space_code,
            "thread_key": self.thread.thread_key,
            "raw_messages": messages,
        }

    def _emit_message(self, push_ids: list[str]) -> list[str]:
        payload = self._payload([raw_message(p, self._nodes[p]) for p in push_ids])
        # The pushed ids name the change: the same on every instance that sees it.
        envelope = self._order.stamp(CHAT_MESSAGE, self.uid, payload, identity=",".join(push_ids))
        return push_ids if self._emit(envelope, None) else []

    def _emit_sync(self, shown: list[dict[str, Any]] | None = None) -> bool:
        payload = self._payload(self._recent() if shown is None else shown)
        return self._emit(self._order.stamp(CHAT_SYNC, self.uid, payload), None)

    async def _mark_delivered(self) -> None:
        while True:
            push_id = await self._marks.get()
            try:
                await self._client.update(f"{self.path}/{push_id}", {"read": True})
            except (
                RtdbError,
                httpx.HTTPError,
                OSError,
            ) as exc:  # idempotent: the next delivery marks it again
                log.warning(
                    "chat read mark failed",
                    extra={"uid": self.uid, "doc_id": push_id, "reason": f"{type(exc).__name__}: {exc}"},
                )

    def _on_failed(self, reason: str) -> None:
        log.error("stream failed", extra={"uid": self.uid, "stream": self.kind, "reason": reason})
