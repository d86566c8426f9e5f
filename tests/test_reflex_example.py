"""The example Reflex States, with the real Reflex package, fed by the real service.

Reflex pins its own dependency versions, so it lives in its own virtualenv
(`.venv-reflex`, from examples/reflex/requirements.lock, installed by scripts/bootstrap);
the check runs there as a subprocess while the service runs here.
"""

from __future__ import annotations

import asyncio
import json
import os
from asyncio.subprocess import PIPE
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.cloud import firestore

from listeners.assemble import running
from listeners.config import Settings
from tests.conftest import CONTROL_TOKEN, Firebase, wait_until
from tests.test_bridge import truth

ROOT = Path(__file__).resolve().parents[1]
REFLEX_PYTHON = ROOT / ".venv-reflex" / "bin" / "python"

pytestmark = pytest.mark.asyncio


async def next_state(
    check: asyncio.subprocess.Process, errors: Path, wanted: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The first state the check prints (one JSON line per event) for which `wanted` holds."""
    assert check.stdout is not None
    async with asyncio.timeout(60):
        while True:
            line = await check.stdout.readline()
            assert line, f"the check ended early: {errors.read_text()[-2000:]}"
            state: dict[str, Any] = json.loads(line)
            if wanted(state):
                return state


async def test_example_states_hold_the_firestore_truth(
    settings: Settings, fb: Firebase, db: firestore.Client, tmp_path: Path
) -> None:
    assert REFLEX_PYTHON.exists(), "run scripts/bootstrap: it installs .venv-reflex"
    await fb.notification("rex", "n1", collection_id="acme")
    await fb.notification("rex", "n2", timestamp="2030-01-01 00:00:00")
    env = {
        **os.environ,
        "LISTENERS_REDIS_HOST": "127.0.0.1",
        "LISTENERS_REDIS_PORT": str(settings.redis.port),
        "LISTENERS_CONTROL_TOKEN": CONTROL_TOKEN,
    }
    errors = tmp_path / "check.err"
    # Online before the service starts: in the registry watch's first snapshot. The emulator
    # can miss a change written while a watch is still starting.
    await fb.online("rex")
    async with running(settings) as service:
        await wait_until(lambda: "rex" in service.node.sessions, 60)
        with errors.open("wb") as stderr:
            check = await asyncio.create_subprocess_exec(
                str(REFLEX_PYTHON), "examples/reflex/check.py", "rex",
                cwd=ROOT, env=env, stdin=PIPE, stdout=PIPE, stderr=stderr,
            )  # fmt: skip
        try:
            synced = await next_state(check, errors, lambda s: s["event"] == "notif.sync")
            assert [n["doc_id"] for n in synced["notifications"]] == ["n2", "n1"]
            # The changes arrive live now; n3 is written last, on the same stream, so once the
            # state holds it, it holds every change before it.
            await fb.update("clients/rex/notifications/n1", {"read": True})
            await fb.notification("rex", "n3")
            await next_state(check, errors, lambda s: "n3" in [n["doc_id"] for n in s["notifications"]])
            assert check.stdin is not None and check.stdout is not None
            check.stdin.close()  # the check stops and prints its final state
            async with asyncio.timeout(60):
                out = await check.stdout.read()
                await check.wait()
        finally:
            if check.returncode is None:
                check.kill()
                await check.wait()
    assert check.returncode == 0, errors.read_text()[-2000:]
    state: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    assert state["event"] is None
    expected = await asyncio.to_thread(truth, db, "rex")
    assert state["notifications"] == expected
    assert [n["doc_id"] for n in state["notifications"]] == ["n2", "n3"]
    assert state["unread_count"] == 2
    assert state["dirty"] == ["notifications", "uid", "unread_count"]  # what Reflex will send
