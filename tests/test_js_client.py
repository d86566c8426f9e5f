"""The browser module's connection logic (ping and its bound, backoff, reconnecting on the
browser's "online" and "visibilitychange", final close codes, an unknown contract version),
run by Node's own test runner on a fake clock and a fake WebSocket: tests/js/client.test.mjs.
The module under test is the file the service serves."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "src" / "listeners" / "deliver" / "static" / "listeners-client.js"


def test_the_client_module_connection_logic() -> None:
    done = subprocess.run(
        ["node", "--test", "--test-reporter=spec", str(ROOT / "tests" / "js" / "client.test.mjs")],
        env={**os.environ, "MODULE": MODULE.as_uri(), "NODE_NO_WARNINGS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "fail 0" in done.stdout and "pass 0" not in done.stdout, done.stdout[-2000:]
