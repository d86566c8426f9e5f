"""The service as the container runs it (`uvicorn tests.faulty_app:app`), with one injected
fault chosen by LISTENERS_TEST_FAULT, for the tests that such a process still ends as it must:

- `control-dies`: the control listener dies each time it starts, so the process exits with
  status 70 (a task that cannot be kept alive);
- `shutdown-hangs`: closing the node blocks the event loop for an hour, so only the shutdown
  watchdog can end the process within its budget.
"""

from __future__ import annotations

import os
import time

from listeners import multiproc

multiproc.prepare()  # before anything imports prometheus_client, as app.main does

from listeners.control import ControlListener  # noqa: E402
from listeners.node import Node  # noqa: E402

FAULT = os.environ.get("LISTENERS_TEST_FAULT", "")


async def _dies(self: ControlListener) -> None:
    raise RuntimeError("injected fault")


async def _hangs(self: Node, timeout: float | None = None) -> None:
    time.sleep(3600)  # blocks the loop itself, as a stuck library call would


if FAULT == "control-dies":
    ControlListener.run = _dies  # type: ignore[method-assign]
elif FAULT == "shutdown-hangs":
    Node.aclose = _hangs  # type: ignore[method-assign]
else:
    raise SystemExit(f"LISTENERS_TEST_FAULT: unknown fault {FAULT!r}")

from app.main import app  # noqa: E402 - the fault is in place before the service is built

__all__ = ["app"]
