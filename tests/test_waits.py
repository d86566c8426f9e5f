"""A wait with a timeout keeps a cancellation that arrives with what it waited for.

Python 3.11's `asyncio.wait_for` drops such a cancellation (CPython gh-86296): a loop around it
never stops. Each test sets the awaited event and cancels the waiting task in the same turn
of the loop, which is that race made certain, then requires the task to end.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from listeners_bridge.consumer import _Reader
from listeners_bridge.ordering import Follower
from listeners_bridge.waits import wait_event

pytestmark = pytest.mark.asyncio


Loop = Callable[[], Coroutine[Any, Any, None]]


async def ends_when_cancelled(loop: Loop, wake: Callable[[], None]) -> bool:
    task = asyncio.create_task(loop())
    for _ in range(3):
        await asyncio.sleep(0)  # the task is now waiting
    wake()
    task.cancel()
    try:
        async with asyncio.timeout(5):
            await asyncio.shield(task)
    except asyncio.CancelledError:
        return True
    except TimeoutError:
        task.cancel()  # again, now that nothing wakes it: the test leaves no task behind
        await asyncio.gather(task, return_exceptions=True)
        return False
    return False


async def test_wait_event_keeps_the_cancellation() -> None:
    event = asyncio.Event()

    async def loop() -> None:
        while True:
            event.clear()
            await wait_event(event, 60)

    assert await ends_when_cancelled(loop, event.set)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="fixed in Python 3.12")
async def test_asyncio_wait_for_drops_it_here() -> None:
    """The reason for the rule (and for this module): the same loop on `wait_for` goes on."""
    event = asyncio.Event()

    async def loop() -> None:
        while True:
            event.clear()
            await asyncio.wait_for(event.wait(), 60)

    task_ended = await ends_when_cancelled(loop, event.set)
    assert not task_ended


async def test_a_bridge_reader_cancelled_as_an_event_arrives_ends() -> None:
    reader = _Reader("u1", ["user:u1"], (), Follower())

    async def loop() -> None:
        while True:
            await reader.next(timeout=60)

    event = {"type": "notif.add", "uid": "u1", "event_id": "e1", "payload": {}}
    assert await ends_when_cancelled(loop, lambda: reader.put(event))
