"""listeners.multiproc: each run of the service starts from a clean metrics directory, left
ones are removed, and it refuses to start once prometheus_client is imported (too late to
choose multiprocess mode). In child processes: this one imported prometheus_client long ago."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PREPARE = "from listeners import multiproc; print(multiproc.prepare())"


def python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def test_a_new_supervisor_gets_an_empty_directory_and_left_ones_are_removed(tmp_path: Path) -> None:
    base = tmp_path / "listeners-metrics"
    left = base / str(dead_pid())  # a task or run that is gone
    left.mkdir(parents=True)
    (left / "counter_123.db").write_bytes(b"old")
    alive = base / str(os.getpid())  # another run, still going: kept
    alive.mkdir()
    done = python(PREPARE, tmp_path)
    assert done.returncode == 0, done.stderr
    mine = Path(done.stdout.strip())
    assert mine.parent == base and mine.name.isdigit()
    assert not left.exists() and alive.exists()


def test_a_worker_writes_its_values_there_and_removes_its_live_gauges_at_exit(tmp_path: Path) -> None:
    code = (
        PREPARE
        + "\nfrom listeners.metrics import Metrics\nm = Metrics()"
        + "\nm.ws_sockets.inc(3)\nm.events.labels('a').inc()"
        + "\nimport os; print(sorted(os.listdir(multiproc.directory())))"
    )
    done = python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    directory, files = done.stdout.splitlines()
    assert "gauge_livesum_" in files and "counter_" in files
    left = os.listdir(directory)
    assert any(f.startswith("counter_") for f in left)  # counters stay: the task's totals
    assert not any(f.startswith("gauge_live") for f in left)  # live gauges go with the worker


def test_too_late_once_prometheus_client_is_imported(tmp_path: Path) -> None:
    done = python("import prometheus_client\n" + PREPARE, tmp_path)
    assert done.returncode != 0 and "before prometheus_client is imported" in done.stderr
