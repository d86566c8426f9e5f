"""Garbage-collector pauses of the service, for `python -m bench.rtdb --gc-log`.

The benchmark puts this folder first on the service's PYTHONPATH and names a file in
BENCH_GC_LOG; Python then imports this module at start-up, and every full collection, and
every other one that pauses for more than 5 ms, is appended to that file as a JSON line
`{"at": epoch s at the end, "generation": g, "ms": pause, "collected": n}`. Without
BENCH_GC_LOG it does nothing.
"""

from __future__ import annotations

import gc
import json
import os
import time
from typing import Any

_PATH = os.environ.get("BENCH_GC_LOG")

if _PATH:
    _out = open(_PATH, "a", buffering=1)  # noqa: SIM115 - open for the life of the process
    _began = [0.0]

    def _on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            _began[0] = time.perf_counter()
            return
        pause = time.perf_counter() - _began[0]
        if info["generation"] == 2 or pause > 0.005:
            record = {"at": time.time(), "generation": info["generation"], "ms": pause * 1000}
            _out.write(json.dumps({**record, "collected": info["collected"]}) + "\n")

    gc.callbacks.append(_on_gc)
