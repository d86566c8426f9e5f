"""The service as the container runs it: `uvicorn app.main:app`, as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.cloud import firestore

from listeners_testkit.processes import FirestoreEmulator, RedisServer, _Child, free_port, wait_for_port
from tests.test_config import ADMIN, PRIVATE_KEY

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "correct-horse-battery-staple-9"


def uvicorn(env: dict[str, str], port: int) -> subprocess.Popen[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LISTENERS_", "FIREBASE", "FIRESTORE", "GOOGLE_"))
    }
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env={**clean, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def protected_redis() -> Iterator[RedisServer]:
    with RedisServer(password=PASSWORD) as server:
        yield server


def health_when(port: int, ready: Callable[[httpx.Response], bool], timeout: float = 60.0) -> dict[str, Any]:
    """The first /healthz body for which `ready` holds; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30)
        if ready(response):
            body: dict[str, Any] = response.json()
            return body
        assert time.monotonic() < deadline, (
            f"/healthz never got there: {response.status_code} {response.text}"
        )
        time.sleep(0.2)


def stopped(process: subprocess.Popen[str], timeout: float = 60.0) -> str:
    """Its output once it exited; killed (and the test failed) if it did not within `timeout`,
    so that a hung service never outlives the test."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        tail = output[-3000:]
        raise AssertionError(f"still running {timeout} s after SIGTERM; last output:\n{tail}") from None
    return output


def online(users: int) -> None:
    """Registers users before the service starts, so they are in its registry watch's first
    snapshot: the emulator can miss a change written while a watch is still starting."""
    db = firestore.Client(project="process-test")
    for n in range(users):
        db.document(f"listeners_registry/u{n}").set(
            {"status": "online", "heartbeat_at": "2999-01-01T00:00:00Z"}
        )
    db.close()


def service_env(redis: RedisServer, emulator: FirestoreEmulator) -> dict[str, str]:
    return {
        "LISTENERS_REDIS_HOST": "127.0.0.1",
        "LISTENERS_REDIS_PORT": str(redis.port),
        "LISTENERS_REDIS_PASSWORD": PASSWORD,
        "FIRESTORE_EMULATOR_HOST": emulator.host,
        "FIREBASE_ADMIN_JSON": json.dumps({**ADMIN, "project_id": "process-test"}),
        "LOG_LEVEL": "DEBUG",
    }


def test_broken_configuration_exits_with_one_message() -> None:
    port = free_port()
    process = uvicorn({"LISTENERS_REDIS_PORT": "99999", "LISTENERS_REDIS_PASSWORD": PASSWORD}, port)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    errors = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert len(errors) == 1
    message = errors[0]["message"]
    assert "LISTENERS_REDIS_HOST / redis.host: missing" in message
    assert "LISTENERS_REDIS_PORT / redis.port: must be an integer" in message
    assert "FIREBASE_ADMIN_JSON / secret firebase_admin: missing" in message
    assert PASSWORD not in output


def test_runs_reports_health_and_stops_on_sigterm(
    protected_redis: RedisServer, emulator: FirestoreEmulator
) -> None:
    online(20)
    port = free_port()
    process = uvicorn(service_env(protected_redis, emulator), port)
    try:
        wait_for_port(port, 60, None)
        health = health_when(
            port, lambda r: r.json().get("redis") == "ok" and r.json()["listeners_count"] == 20
        )
        assert health == {"status": "ok", "version": "0.1.0", "listeners_count": 20, "redis": "ok"}
        assert httpx.get(f"http://127.0.0.1:{port}/version", timeout=30).json()["version"] == "0.1.0"
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        assert "listeners_publish_lag_seconds_bucket" in metrics and "listeners_attached_users" in metrics
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        # A product bound: the shutdown budget (LISTENERS_SHUTDOWN_TIMEOUT_SECONDS, 8 s), plus
        # 2 s for the interpreter to exit.
        assert time.monotonic() - started < 10
        assert process.returncode in (
            0,
            -signal.SIGTERM,
        )  # uvicorn re-raises the signal after its graceful exit
    finally:
        if process.poll() is None:
            process.kill()
            output, _ = process.communicate()
    assert "service stopped" in output
    # no secret in any log line, even at DEBUG
    assert PASSWORD not in output
    for line in PRIVATE_KEY.splitlines():
        if len(line) > 20:
            assert line not in output
    assert all(line.startswith("{") for line in output.splitlines() if line.strip())


def test_wrong_redis_password_is_reported_without_the_password(emulator: FirestoreEmulator) -> None:
    with RedisServer(password="another-password-123") as redis:
        port = free_port()
        process = uvicorn(service_env(redis, emulator), port)
        try:
            wait_for_port(port, 60, None)
            health = health_when(port, lambda r: r.status_code == 200)  # started, not stopping
            assert health["status"] == "degraded" and health["redis"] == "down"
        finally:
            process.send_signal(signal.SIGTERM)
            output = stopped(process)
    assert "redis unavailable" in output
    assert PASSWORD not in output and "another-password-123" not in output


def test_sigterm_exits_in_time_even_with_firestore_gone(
    protected_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FirestoreEmulator() as own:
        monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", own.host)
        online(40)
        port = free_port()
        env = {**service_env(protected_redis, own), "LISTENERS_SHUTDOWN_TIMEOUT_SECONDS": "6"}
        process = uvicorn(env, port)
        try:
            wait_for_port(port, 60, None)
            health_when(port, lambda r: r.json().get("listeners_count") == 40)
            own.stop(signal.SIGKILL)  # every watch now closes slowly
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=60)
            # A product bound: the 6 s shutdown budget holds even when every watch hangs; 4 s
            # more for the interpreter to exit.
            assert time.monotonic() - started < 10
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()


class _NeverListens(_Child):
    def command(self) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(600)"]


def test_a_child_that_does_not_come_up_is_stopped_not_left_running() -> None:
    """A redis-server or emulator that misses its start-up deadline (a loaded machine) used to
    be left running after the TimeoutError, an orphan for the rest of the session."""
    child = _NeverListens()
    try:
        with pytest.raises(TimeoutError):
            child.start(timeout=0.5)  # nothing ever listens: the deadline passes for sure
        assert child.process is None  # stopped and reaped
    finally:
        child.stop(signal.SIGKILL)
        child.cleanup()
