"""Drives the example States with the real Reflex package and the real bridge.

    .venv-reflex/bin/python examples/reflex/check.py UID

Creates real State instances and feeds them `Bridge.events(UID)` through `_on_event` (what
the background task does under `async with self`) until its standard input is closed. After
each event it prints one JSON line: the event's type and the public attributes and Reflex's
dirty vars; at the end, one more line (`"event": null`) with the final state. This is the
States alone, without Reflex's event loop or a browser: the app that binds them to a page
(listeners_example/, `./reflex.sh run`) runs in Chromium in tests/test_reflex_browser.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from states import MessengerState, NotificationState, bridge

from listeners_bridge import ChatThreads, DirectMessages, Notifications


async def main(uid: str) -> None:
    notes = NotificationState(_reflex_internal_init=True)  # type: ignore[call-arg]
    messenger = MessengerState(_reflex_internal_init=True)  # type: ignore[call-arg]
    notes.uid = messenger.uid = uid
    reducer, reducers = Notifications(), (DirectMessages(), ChatThreads())

    def show(event_type: str | None) -> None:
        state = {
            "event": event_type,
            "notifications": notes.notifications,
            "unread_count": notes.unread_count,
            "dirty": sorted(notes.dirty_vars),
            "direct_messages": messenger.direct_messages,
            "has_new_messages": messenger.has_new_messages,
        }
        print(json.dumps(state), flush=True)

    async def follow() -> None:
        async for event in bridge().events(uid):
            notes._on_event(reducer, event)
            messenger._on_event(reducers, event)
            show(event["type"])

    stdin = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    task = asyncio.create_task(follow())
    stdin_closed = asyncio.create_task(stdin.read())
    await asyncio.wait({task, stdin_closed}, return_when=asyncio.FIRST_COMPLETED)
    for running in (task, stdin_closed):
        running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # raises what ended the bridge early, if anything did
    show(None)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
