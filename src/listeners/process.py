"""The process around one service: stop signals, the shutdown watchdog, the exit status.

ECS stops a task with SIGTERM and counts on it being gone within the stop timeout; a task
that exits non-zero is replaced. So the stop begins at the signal (not once the server has
closed its connections), a watchdog thread ends the process when the shutdown overruns its
budget, and the process leaves with `os._exit` once everything is closed: 0, or
EXIT_TASK_FAILED after a task could not be kept alive (docs/liveness.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

EXIT_TASK_FAILED = 70  # EX_SOFTWARE: a task could not be kept alive (docs/liveness.md)
EXIT_SHUTDOWN_CUT = 75  # EX_TEMPFAIL: the shutdown overran its budget and was cut short
log = logging.getLogger("listeners")


def _sigterm_self(reason: str) -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _exit_now(status: int) -> None:
    logging.shutdown()
    os._exit(status)


@dataclass(frozen=True)
class ProcessHooks:
    """What the app does to its own process. Tests running the app in their own process
    replace both, so that a failure there fails the test instead of ending it."""

    # A task cannot be kept alive: stop as on SIGTERM (hand users over, flush), after which
    # the lifespan exits with EXIT_TASK_FAILED so that ECS replaces the task.
    stop: Callable[[str], None] = _sigterm_self
    # Leave now with this status (everything that could be closed is closed).
    exit: Callable[[int], None] = _exit_now
    # `exit` ends the process: the shutdown leaves the users' streams to it (Service.run).
    exits: bool = True


THIS_PROCESS = ProcessHooks()  # the real thing: SIGTERM to itself, os._exit


class Lifetime:
    """One service's process: `stopping_on_signal` around the time it serves, `exit` once
    it is closed. The shutdown is bounded by `budget` seconds from the stop's start."""

    def __init__(self, hooks: ProcessHooks, budget: float) -> None:
        self._hooks = hooks
        self._watchdog = Watchdog(budget, hooks)

    @contextlib.contextmanager
    def stopping_on_signal(self, begin_stop: Callable[[], object]) -> Iterator[None]:
        """On SIGTERM or SIGINT: the watchdog starts and `begin_stop` runs on the loop. A stop
        without a signal (the server's own) starts the watchdog when this block ends."""

        def stop_signal() -> None:
            self._watchdog.start()
            begin_stop()  # the leaving goes on; the shutdown awaits it

        with on_stop_signal(stop_signal):
            yield
        self._watchdog.start()

    def exit(self, failed: str | None) -> None:
        """Everything is closed: leave now, non-zero when a task could not be kept alive."""
        self._watchdog.cancel()
        if failed:
            # uvicorn has no exit status of its own for this: everything is closed, so leave now.
            log.critical("exiting after a task failure", extra={"status": EXIT_TASK_FAILED, "reason": failed})
            self._hooks.exit(EXIT_TASK_FAILED)
        # Events are flushed, the membership left, every client closed or its budget spent.
        # asyncio's own teardown would now cancel the stream tasks still unwinding one at a
        # time (5 s for 10,000 Realtime Database streams, measured); the kernel closes their
        # sockets at once.
        log.info("exiting", extra={"status": 0})
        self._hooks.exit(0)


class Watchdog:
    """Ends the process `budget` seconds after `start()`, whatever the shutdown waits on (a
    saturated loop, a library that does not let go): ECS and deployments count on it. A
    thread, because the loop may be the thing that is stuck."""

    def __init__(self, budget: float, process: ProcessHooks) -> None:
        self._timer = threading.Timer(budget, self._overrun, (process,))
        self._timer.daemon = True

    def start(self) -> None:
        if not self._timer.is_alive() and not self._timer.finished.is_set():
            self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()

    @staticmethod
    def _overrun(process: ProcessHooks) -> None:
        log.error("shutdown budget exhausted (LISTENERS_SHUTDOWN_TIMEOUT_SECONDS); exiting now")
        process.exit(EXIT_SHUTDOWN_CUT)


@contextlib.contextmanager
def on_stop_signal(begin: Callable[[], object]) -> Iterator[None]:
    """Runs `begin` on the loop as soon as SIGTERM or SIGINT arrives, then the handler that
    was there (the server's, which starts its own shutdown). The stop begins at the signal,
    not after the server has closed its connections, which can take seconds."""
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(begin)
        chained = previous.get(signum)
        if callable(chained):
            chained(signum, frame)
        elif chained == signal.SIG_DFL:
            raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield  # signals are only delivered to the main thread
        return
    for signum in (int(signal.SIGTERM), int(signal.SIGINT)):
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, chained in previous.items():
            if signal.getsignal(signum) is handler:
                signal.signal(signum, chained)
