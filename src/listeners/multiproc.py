"""One scrape of /metrics sees the whole task, whichever uvicorn worker answers it.

The task runs `WEB_CONCURRENCY` worker processes behind one port; a scrape reaches one of
them. prometheus_client's multiprocess mode makes every worker write its values to files in
one directory (`PROMETHEUS_MULTIPROC_DIR`), and the worker that answers a scrape reads them
all (metrics.Metrics.render): counters and histograms are summed over the workers, dead ones
included (a counter never goes back when a worker is replaced), and each gauge is combined
as its `multiprocess_mode` says, over the live workers only.

prometheus_client chooses how it stores values when it is first imported, so `prepare()`
runs before anything imports it (app.main, the container's entry point; tests and the CLI
that build several nodes in one process keep the plain per-registry mode). The directory is
`$TMPDIR/listeners-metrics/<pid of uvicorn's supervisor>` (/tmp is writable in the image,
whose root filesystem is read-only): every worker of one task shares it, a new task or a
restarted supervisor starts from an empty one, and directories left by supervisors that are
gone are removed. A worker's live gauges are removed when it exits, and by whichever worker
answers the next scrape when it was killed (`forget_dead_workers`).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_FILE = re.compile(r"^gauge_live\w+_(\d+)\.db$")


def base_dir() -> Path:
    return Path(tempfile.gettempdir()) / "listeners-metrics"


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


_prepared: list[Path] = []  # this process's directory, once prepared


def prepare() -> Path:
    """Multiprocess mode for this process, in its supervisor's directory; returns it. Once
    per process: a second call returns the same directory."""
    if _prepared:
        return _prepared[0]
    if "prometheus_client" in sys.modules:
        raise RuntimeError("multiproc.prepare() must run before prometheus_client is imported")
    in_worker = multiprocessing.parent_process() is not None  # uvicorn's workers are spawned
    supervisor = os.getppid() if in_worker else os.getpid()
    base = base_dir()
    directory = base / str(supervisor)
    directory.mkdir(parents=True, exist_ok=True)
    for other in base.iterdir():  # left by tasks or runs that are gone
        if other != directory and other.name.isdigit() and not alive(int(other.name)):
            shutil.rmtree(other, ignore_errors=True)
    os.environ[ENV] = str(directory)
    atexit.register(_exiting, os.getpid(), directory)
    _prepared.append(directory)
    return directory


def _exiting(pid: int, directory: Path) -> None:
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


def directory() -> str | None:
    """The shared directory when this process runs in multiprocess mode, else None."""
    return os.environ.get(ENV)


def forget_dead_workers(path: str) -> None:
    """Removes the live gauges of workers that are gone (killed, so they could not)."""
    from prometheus_client import multiprocess

    pids = {int(m.group(1)) for name in os.listdir(path) if (m := _LIVE_FILE.match(name))}
    for pid in pids:
        if pid != os.getpid() and not alive(pid):
            with contextlib.suppress(OSError):
                multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
