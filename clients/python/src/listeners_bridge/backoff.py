"""Exponential backoff with jitter, shared by every reconnecting part."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass


def reraise_if_cancelled() -> None:
    """Call first in an `except` of a reconnect loop. redis-py can turn a cancellation that
    lands while it connects into a ConnectionError; a loop that catches that and retries would
    never stop, and shutdown would wait on it for ever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float = 0.2
    cap: float = 10.0

    def delay(self, attempt: int) -> float:
        """Equal jitter: between half and all of the exponential step, so it never hits zero."""
        step = min(self.cap, self.base * 2.0 ** min(attempt, 30))
        return step / 2 + random.uniform(0, step / 2)
