"""Long-lived tasks kept alive: one that dies is restarted with backoff; one that cannot be
kept alive ends the process.

A task of the service (the publisher, the control listener, the membership, the node's sweep,
the hub) must run for the whole life of the instance. Each catches the faults it expects
(Redis going away) and goes on by itself; what reaches the supervisor is a bug or a fault
nobody foresaw. A restart usually heals it. If the task dies `max_restarts` times within
`window_seconds`, or raises `Fatal`, restarting will not help: `on_fatal` is called, and the
service stops and exits non-zero so that ECS replaces it, instead of running on without the
task behind a 200 health check.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from listeners_bridge.backoff import Backoff

if TYPE_CHECKING:
    from listeners.metrics import Metrics

log = logging.getLogger(__name__)

Run = Callable[[], Coroutine[Any, Any, None]]


class Fatal(Exception):
    """Raised by a task when restarting it cannot help (e.g. its instance id is taken)."""


class Supervisor:
    def __init__(
        self,
        metrics: Metrics,
        on_fatal: Callable[[str], None],
        *,
        max_restarts: int = 5,
        window_seconds: float = 60.0,
        backoff: Backoff | None = None,
    ) -> None:
        self._metrics = metrics
        self._on_fatal = on_fatal
        self._max_restarts = max_restarts
        self._window = window_seconds
        self._backoff = backoff or Backoff(base=0.5, cap=10.0)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.restarts: dict[str, int] = {}

    def start(self, name: str, run: Run) -> None:
        self.restarts.setdefault(name, 0)
        self.tasks[name] = asyncio.create_task(self._keep(name, run), name=name)

    async def _keep(self, name: str, run: Run) -> None:
        loop = asyncio.get_running_loop()
        deaths: deque[float] = deque()
        while True:
            try:
                await run()
                reason = "it returned"  # a long-lived task never ends by itself
            except Fatal as exc:
                self._fatal(name, str(exc))
                return
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"[:300]
            now = loop.time()
            deaths.append(now)
            while deaths[0] < now - self._window:
                deaths.popleft()
            if len(deaths) > self._max_restarts:
                self._fatal(name, f"died {len(deaths)} times within {self._window:g} s; last: {reason}")
                return
            delay = self._backoff.delay(len(deaths) - 1)
            log.error(
                "task died; restarting it",
                extra={"task": name, "reason": reason, "in_seconds": round(delay, 2)},
            )
            self.restarts[name] += 1
            self._metrics.task_restarts.labels(name).inc()
            await asyncio.sleep(delay)

    def _fatal(self, name: str, reason: str) -> None:
        log.critical("task cannot be kept alive; the process stops", extra={"task": name, "reason": reason})
        self._on_fatal(f"{name}: {reason}")

    async def stop(self, names: Iterable[str] | None = None, timeout: float = 2.0) -> None:
        """Cancel these tasks (all by default) and wait for them, within `timeout`."""
        names = list(self.tasks) if names is None else [n for n in names if n in self.tasks]
        await stop_tasks([self.tasks.pop(n) for n in names], timeout)


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], timeout: float) -> None:
    """Cancel and wait, within a bound: a task that ignores its cancellation (a library that
    swallows it mid-connect) must not hold the shutdown past its budget."""
    tasks = list(tasks)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    done, stuck = await asyncio.wait(tasks, timeout=timeout)
    for task in done:  # what they died of was logged when they died (an identity conflict, say)
        if not task.cancelled():
            task.exception()
    if stuck:
        log.warning("shutdown: tasks did not stop in time", extra={"tasks": [t.get_name() for t in stuck]})
