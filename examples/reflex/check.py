"""Drives the example States with the real Reflex package and the real bridge.

    .venv-reflex/bin/python examples/reflex/check.py UID SECONDS

Creates real State instances, feeds them `Bridge.events(UID)` through `_on_event` for
SECONDS (what the background task does under `async with self`), then prints the
public attributes and Reflex's dirty vars as JSON on stdout. What this cannot run here:
the browser side and Reflex's own event loop (`reflex run` builds a Next.js frontend).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from states import MessengerState, NotificationState, bridge

from listeners.bridge import ChatThreads, DirectMessages, Notifications


async def main(uid: str, seconds: float) -> None:
    notes = NotificationState(_reflex_internal_init=True)  # type: ignore[call-arg]
    messenger = MessengerState(_reflex_internal_init=True)  # type: ignore[call-arg]
    notes.uid = messenger.uid = uid
    reducer, reducers = Notifications(), (DirectMessages(), ChatThreads())

    async def follow() -> None:
        async for event in bridge().events(uid):
            notes._on_event(reducer, event)
            messenger._on_event(reducers, event)

    task = asyncio.create_task(follow())
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    print(
        json.dumps(
            {
                "notifications": notes.notifications,
                "unread_count": notes.unread_count,
                "dirty": sorted(notes.dirty_vars),
                "direct_messages": messenger.direct_messages,
                "has_new_messages": messenger.has_new_messages,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
