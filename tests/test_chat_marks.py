"""A chat message the service marked read must still be in the next sync: handing it to the
publisher does not mean it reached anyone.

Found by the soak (bench/soak.py): with Redis half-open, the publisher still queues for the
seconds before it notices; the queued chat.message is dropped, yet its read mark (which goes
to the Realtime Database, not to Redis) lands, and the resync after the outage carried only
unread messages: the message was lost for good. The stand-in and the service are replaced
here by the two things the stream talks to: a mirror that hands it trees, and an emit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from listeners.envelope import Envelope
from listeners.streams.chat import ChatStream
from listeners_bridge.registry import ChatThread

pytestmark = pytest.mark.asyncio


class Mirror:
    """What ChatStream reads of a NodeMirror."""

    def __init__(self, on_change: Callable[[Any], None]) -> None:
        self.on_change = on_change
        self.reconnects = 0
        self.last_changed: frozenset[str] | None = None
        self.active = True

    def hand(self, tree: dict[str, Any], changed: set[str] | None) -> None:
        self.last_changed = None if changed is None else frozenset(changed)
        self.on_change(tree)

    async def close(self) -> None:
        self.active = False


class Database:
    """The client: one stream, and the read marks it is asked to write."""

    def __init__(self) -> None:
        self.mirror: Mirror | None = None
        self.marked: list[str] = []
        self.wrote = asyncio.Event()

    def stream(self, path: str, on_change: Callable[[Any], None], **options: Any) -> Mirror:
        self.mirror = Mirror(on_change)
        return self.mirror

    async def update(self, path: str, fields: dict[str, Any]) -> None:
        self.marked.append(path.rsplit("/", 1)[1])
        self.wrote.set()


def message(n: int, read: bool = False) -> dict[str, Any]:
    return {
        "message_type": "MESSAGE",
        "content": f"m{n}",
        "timestamp": f"2026-01-01T00:00:0{n}Z",
        "read": read,
    }


async def test_a_message_marked_read_after_a_lost_publish_is_in_the_next_sync() -> None:
    published: list[Envelope] = []

    def emit(envelope: Envelope, lag: float | None) -> bool:
        published.append(envelope)
        return True  # queued: "delivered"

    database = Database()
    stream = ChatStream(
        "u1",
        ChatThread("c1", "t1", "chats"),
        database,  # type: ignore[arg-type]  # the two calls ChatStream makes
        emit,
        mark_read=True,
    )
    stream.start()
    assert database.mirror is not None
    try:
        database.mirror.hand({"-a1": message(1)}, None)  # the first full read: a sync
        database.mirror.hand({"-a1": message(1), "-a2": message(2)}, {"-a2"})  # a new message
        assert [e.type for e in published] == ["chat.sync", "chat.message"]
        # ... which Redis never got (half-open). Its read mark lands all the same:
        async with asyncio.timeout(10):
            while sorted(database.marked) != ["-a1", "-a2"]:
                database.wrote.clear()
                await database.wrote.wait()
        database.mirror.hand({"-a1": message(1, read=True), "-a2": message(2, read=True)}, {"-a1", "-a2"})
        assert len(published) == 2  # the marks deliver nothing again
        stream.resync()  # what the service does once Redis is back
        ids = [m["id"] for m in published[-1].payload["raw_messages"]]
        assert published[-1].type == "chat.sync"
        assert ids == ["-a1", "-a2"]
        # A message read elsewhere (not marked by this stream) is not shown.
        database.mirror.hand(
            {**{k: message(n, read=True) for n, k in ((1, "-a1"), (2, "-a2"))}, "-a3": message(3, read=True)},
            {"-a3"},
        )
        stream.resync()
        assert [m["id"] for m in published[-1].payload["raw_messages"]] == ["-a1", "-a2"]
        # Leaving the window forgets the mark.
        database.mirror.hand({"-a2": message(2, read=True)}, {"-a1"})
        stream.resync()
        assert [m["id"] for m in published[-1].payload["raw_messages"]] == ["-a2"]
    finally:
        await stream.close()
