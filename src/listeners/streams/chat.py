"""One chat thread a user has open: `{space_code}/{mode}/{thread_key}/messages`.

On subscribe, and after every reconnect, a `chat.sync` with the thread's recent unread
messages; then one `chat.message` per change holding each new displayable message once,
in order. Delivered messages are marked `read: true` in the database, as the old client
did: in the background, only when still unread, and never in the way of delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx

from listeners.envelope import Envelope
from listeners.events import CHAT_MESSAGE, CHAT_SYNC
from listeners.normalise.chat import displayable, in_order, raw_message
from listeners.source.registry import ChatThread
from listeners.source.rtdb import NodeStream, RtdbClient, RtdbError
from listeners.streams.view import Emit

log = logging.getLogger(__name__)

RECENT = 50  # unread messages in a chat.sync
MARK_READ_QUEUE = 1000  # pending read marks per thread; beyond it marks are skipped, never delivery


class ChatStream:
    kind = "chat"

    def __init__(
        self, uid: str, thread: ChatThread, client: RtdbClient, emit: Emit, *, mark_read: bool
    ) -> None:
        self.uid = uid
        self.thread = thread
        self._client = client
        self._emit = emit
        self._mark_read = mark_read
        self._stream: NodeStream | None = None
        self._seen: set[str] = set()
        self._recent: list[dict[str, Any]] = []  # what the last chat.sync would show
        self._synced = False
        self._reconnects = 0
        self._marks: asyncio.Queue[str] = asyncio.Queue(MARK_READ_QUEUE)
        self._marker: asyncio.Task[None] | None = None

    @property
    def path(self) -> str:
        t = self.thread
        return f"{t.space_code}/{t.mode}/{t.thread_key}/messages"

    def start(self) -> None:
        self._synced = False
        try:
            self._stream = self._client.stream(self.path, self._on_change, on_failed=self._on_failed)
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

    def _on_change(self, tree: Any) -> None:
        stream = self._stream
        if stream is not None and stream.reconnects != self._reconnects:
            self._reconnects = stream.reconnects
            self._synced = False  # a fresh full read: a fresh sync
        nodes: dict[str, Any] = tree if isinstance(tree, dict) else {}
        shown = [push_id for push_id in in_order(nodes) if displayable(nodes[push_id])]
        self._recent = [raw_message(p, nodes[p]) for p in shown[-RECENT:]]
        fresh = [p for p in shown if p not in self._seen]
        self._seen.update(fresh)
        # Only what was handed to the publisher is marked read: a message dropped during a
        # Redis outage stays unread, so the resync after it still carries it.
        if not self._synced:
            self._synced = True
            delivered = [m["id"] for m in self._recent] if self._emit_sync() else []
        elif fresh:
            payload = self._payload([raw_message(p, nodes[p]) for p in fresh])
            delivered = fresh if self._emit(Envelope.create(CHAT_MESSAGE, self.uid, payload), None) else []
        else:
            delivered = []
        if self._mark_read:
            for push_id in delivered:
                with contextlib.suppress(asyncio.QueueFull):
                    self._marks.put_nowait(push_id)

    def _payload(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "space_code": self.thread.space_code,
            "thread_key": self.thread.thread_key,
            "raw_messages": messages,
        }

    def _emit_sync(self) -> bool:
        return self._emit(Envelope.create(CHAT_SYNC, self.uid, self._payload(self._recent)), None)

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
