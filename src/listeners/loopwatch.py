"""How long the event loop is kept from running: every piece of work on it delays all the
others (a takeover attaching many users, a registry snapshot). Measured as the lateness of a
timer that should fire every `interval`; the longest stall seen is a gauge, so a benchmark
can read the worst one around an event and an operator can alert on it."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from listeners.metrics import Metrics

INTERVAL = 0.05
TASKS_EVERY = 20  # timer turns between two counts of the loop's tasks (about once a second)


async def watch_loop(metrics: Metrics, interval: float = INTERVAL) -> None:
    loop = asyncio.get_running_loop()
    turns = 0
    while True:
        if turns % TASKS_EVERY == 0:
            metrics.asyncio_tasks.set(len(asyncio.all_tasks(loop)))
        turns += 1
        expected = loop.time() + interval
        await asyncio.sleep(interval)
        late = max(0.0, loop.time() - expected)
        metrics.loop_lag.observe(late)
        if late > metrics.loop_stall_max_value:
            metrics.loop_stall_max_value = late
            metrics.loop_stall_max.set(late)
