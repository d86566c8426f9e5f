"""Garbage-collector pauses of the service, for `python -m bench.rtdb --gc-log`.

The benchmark puts this folder first on the service's PYTHONPATH and names a file in
BENCH_GC_LOG; Python then imports this module at start-up, and every full collection, and
every other one that pauses for more than 5 ms, is appended to that file as a JSON line
`{"at": epoch s at the end, "generation": g, "ms": pause, "collected": n}`. Without
BENCH_GC_LOG it does nothing. SIGUSR2 times one full collection on demand (`_on_probe`).
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

    def _timed_full_collection() -> float:
        began = time.perf_counter()
        gc.collect()
        return (time.perf_counter() - began) * 1000

    def _on_probe(signum: int, frame: Any) -> None:
        """SIGUSR2: one full collection as the service is (objects frozen or not), then one
        with every object tracked again, then the freeze restored: the pause gc.freeze() saves,
        in one process at one heap. Logged as {"forced": ..., "frozen": n, "tracked": n, "ms": ...}."""
        frozen = gc.get_freeze_count()
        pauses = [("as-is", len(gc.get_objects()), _timed_full_collection())]
        gc.unfreeze()
        pauses.append(("unfrozen", len(gc.get_objects()), _timed_full_collection()))
        if frozen:
            gc.freeze()
        for label, tracked, ms in pauses:
            record = {"at": time.time(), "forced": label, "frozen": frozen, "tracked": tracked, "ms": ms}
            _out.write(json.dumps(record) + "\n")

    import signal

    signal.signal(signal.SIGUSR2, _on_probe)
