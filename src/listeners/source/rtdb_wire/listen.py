"""A listen (one path and query on one connection) and the streams that share its mirror.

`WireStream` has the interface of the REST client's stream, as `streams/messages.py` and
`streams/chat.py` use it: `tree`, `last_changed`, `reconnects`, `synced`, `active`, `failed`,
`reason`, `events`, `path`, `start()`, `await close()`, and `on_change(tree)` /
`on_failed(reason)` called on the loop. Several streams of the same path and query (two users
with the same chat thread open) share one listen on the wire; each keeps its own counters and
gets its own first full read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from listeners.source.rtdb import Json
from listeners.source.rtdb_wire.protocol import apply_writes, query_key, trim_window

log = logging.getLogger("listeners.source.rtdb_wire")

ChangeHandler = Callable[[Json], None]
FailureHandler = Callable[[str], None]

# a listen's state on its connection
IDLE = "idle"  # not sent on the connection's current session (or no session)
QUEUED = "queued"  # waiting for a turn among the listens awaiting their answer
SENT = "sent"  # sent; the pushes until the answer make up the full read
LIVE = "live"  # answered ok: every push is a change


class WireStream:
    """A live mirror of one node (or one query's window), fed by a listen on a shared connection.

    `on_change(tree)` runs after every change with the whole node (None when it does not
    exist). After a reconnect the listen's full read replaces the mirror: `reconnects` has gone
    up by one and `last_changed` is None, as with the REST stream."""

    def __init__(
        self,
        path: str,
        on_change: ChangeHandler,
        on_failed: FailureHandler | None,
        release: Callable[[WireStream], None],
    ) -> None:
        self.path = path
        self._on_change = on_change
        self._on_failed = on_failed
        self._release = release
        self._tree: Json = None
        self._closed = False
        self._failed = False
        self._reason: str | None = None
        self._synced = False
        self._had_full_read = False
        self.reconnects = 0
        self.events = 0
        self.last_changed: frozenset[str] | None = None

    def start(self) -> None:
        """Nothing to start: the client has joined the stream to its listen already."""

    @property
    def tree(self) -> Json:
        """The mirror as of the last applied change; never mutated once handed out."""
        return self._tree

    @property
    def active(self) -> bool:
        """False once closed or failed; a stream waiting for its connection is still active."""
        return not self._closed and not self._failed

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def reason(self) -> str | None:
        return self._reason

    @property
    def synced(self) -> bool:
        """True while connected and past the listen's full read."""
        return self._synced and self.active

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._synced = False
        self._release(self)

    # --- fed by the listen --------------------------------------------------------------

    def _full(self, tree: Json) -> None:
        if not self.active:
            return
        if self._had_full_read:
            self.reconnects += 1  # a fresh full read: the consumer publishes a fresh sync
        self._had_full_read = True
        self._synced = True
        self._tree = tree
        self.last_changed = None
        self._changed()

    def _delta(self, tree: Json, changed: frozenset[str] | None) -> None:
        if not self.active or not self._synced:
            return
        self._tree = tree
        self.last_changed = changed
        self._changed()

    def _lost(self) -> None:
        self._synced = False

    def _fail(self, reason: str) -> None:
        if not self.active:
            return
        self._failed = True
        self._synced = False
        self._reason = reason
        log.warning("rtdb stream %s failed: %s", self.path, reason)
        if self._on_failed is not None:
            try:
                self._on_failed(reason)
            except Exception:
                log.exception("rtdb stream %s: on_failed failed", self.path)

    def _changed(self) -> None:
        self.events += 1
        try:
            self._on_change(self._tree)
        except Exception:
            log.exception("rtdb stream %s: on_change failed", self.path)


class Listen:
    """One path and query listened on one connection, its mirror, and the streams sharing it."""

    def __init__(self, keys: tuple[str, ...], query: dict[str, Json] | None) -> None:
        self.keys = keys
        self.query = query
        self.ident = (keys, query_key(query))
        self.path = "/" + "/".join(keys)
        self.streams: dict[WireStream, None] = {}  # insertion-ordered set
        self.tree: Json = None
        self.state = IDLE
        self.tag: int | None = None
        self.connection: Any = None  # the Connection it is assigned to
        self._loading: Json = None
        self._live = False

    @property
    def live(self) -> bool:
        return self._live

    def join(self, stream: WireStream) -> None:
        self.streams[stream] = None
        if self._live:  # the others have their full read: this one gets it on the next turn
            asyncio.get_running_loop().call_soon(self._catch_up, stream)

    def _catch_up(self, stream: WireStream) -> None:
        if self._live and stream in self.streams and not stream._had_full_read:
            stream._full(self.tree)

    def leave(self, stream: WireStream) -> bool:
        """Forget a stream; True when none is left."""
        self.streams.pop(stream, None)
        return not self.streams

    def sent(self) -> None:
        """Sent on a new session: the pushes until the answer are the full read."""
        self.state = SENT
        self._loading = None
        self._live = False
        for stream in self.streams:
            stream._lost()

    def push(self, writes: list[tuple[tuple[str, ...], Json]]) -> None:
        if not writes:
            return
        if self.state == SENT:
            self._loading, _ = apply_writes(self._loading, writes)
            return
        if not self._live:
            return
        tree, changed = apply_writes(self.tree, writes)
        tree, dropped = trim_window(tree, self.query)
        if tree is self.tree:
            return  # nothing changed (an overlapping listen's copy of the same write)
        if dropped and changed is not None:
            changed = changed | frozenset(dropped)
        self.tree = tree
        for stream in list(self.streams):
            stream._delta(tree, changed)

    def answered(self) -> None:
        """The server answered ok: the full read is complete."""
        self.tree, _ = trim_window(self._loading, self.query)
        self._loading = None
        self.state = LIVE
        self._live = True
        for stream in list(self.streams):
            stream._full(self.tree)

    def lost(self) -> None:
        self.state = IDLE
        self.tag = None
        self._loading = None
        self._live = False
        for stream in self.streams:
            stream._lost()

    def fail(self, reason: str) -> None:
        self.state = IDLE
        self._live = False
        for stream in list(self.streams):
            stream._fail(reason)
        self.streams.clear()
