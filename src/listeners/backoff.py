"""Exponential backoff with jitter, shared by every reconnecting part."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float = 0.2
    cap: float = 10.0

    def delay(self, attempt: int) -> float:
        """Equal jitter: between half and all of the exponential step, so it never hits zero."""
        step = min(self.cap, self.base * 2.0 ** min(attempt, 30))
        return step / 2 + random.uniform(0, step / 2)
