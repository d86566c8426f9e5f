"""Waiting with a timeout without losing a cancellation.

On Python 3.11 (the service's runtime) `asyncio.wait_for` returns the awaited result when the
task is cancelled at the moment that result arrives, and the cancellation is gone (CPython
gh-86296, fixed in 3.12). A loop around it, such as "wait for a wakeup or a timeout, then go
round", can then never be stopped: shutdown waits on it, and a consumer's iterator does not
end. `asyncio.timeout` has no such race, so every wait with a timeout here uses it; ruff bans
`asyncio.wait_for` in src/ and app/ (pyproject.toml).
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Whether `event` is set within `timeout` seconds."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
