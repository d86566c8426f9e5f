"""The example Reflex States, with the real Reflex package, fed by the real service.

Reflex pins its own dependency versions, so it lives in its own virtualenv
(`.venv-reflex`, from examples/reflex/requirements.lock, installed by scripts/bootstrap);
the check runs there as a subprocess while the service runs here.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from google.cloud import firestore

from listeners.config import Settings
from listeners.service import running
from tests.conftest import CONTROL_TOKEN, Firebase
from tests.test_bridge import truth
from tests.test_pipeline import wait_until

ROOT = Path(__file__).resolve().parents[1]
REFLEX_PYTHON = ROOT / ".venv-reflex" / "bin" / "python"

pytestmark = pytest.mark.asyncio


async def test_example_states_hold_the_firestore_truth(
    settings: Settings, fb: Firebase, db: firestore.Client
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
    async with running(settings) as service:
        await fb.online("rex")
        await wait_until(lambda: "rex" in service.node.sessions)
        check = await asyncio.create_subprocess_exec(
            str(REFLEX_PYTHON), "examples/reflex/check.py", "rex", "6",
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.sleep(3)  # the check has subscribed and resynced by now
        await fb.update("clients/rex/notifications/n1", {"read": True})
        await fb.notification("rex", "n3")
        out, err = await asyncio.wait_for(check.communicate(), 60)
    assert check.returncode == 0, err.decode()[-2000:]
    state: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    expected = await asyncio.to_thread(truth, db, "rex")
    assert state["notifications"] == expected
    assert [n["doc_id"] for n in state["notifications"]] == ["n2", "n3"]
    assert state["unread_count"] == 2
    assert state["dirty"] == ["notifications", "uid", "unread_count"]  # what Reflex will send
