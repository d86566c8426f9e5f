"""The service as the container runs it: `uvicorn app.main:app`, as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from google.cloud import firestore

from listeners.local.processes import FirestoreEmulator, RedisServer, free_port, wait_for_port
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
    port = free_port()
    process = uvicorn(service_env(protected_redis, emulator), port)
    try:
        wait_for_port(port, 60, None)
        deadline = time.monotonic() + 30
        while True:
            health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            if health.json().get("redis") == "ok" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "version": "0.1.0", "listeners_count": 0, "redis": "ok"}
        assert httpx.get(f"http://127.0.0.1:{port}/version", timeout=5).json()["version"] == "0.1.0"
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "listeners_publish_lag_seconds_bucket" in metrics and "listeners_attached_users" in metrics
        db = firestore.Client(project="process-test")
        for n in range(20):
            db.document(f"listeners_registry/u{n}").set(
                {"status": "online", "heartbeat_at": firestore.SERVER_TIMESTAMP, "ttl_seconds": 90}
            )
        db.close()
        while httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()["listeners_count"] < 20:
            assert time.monotonic() < deadline + 30
            time.sleep(0.2)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
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
            time.sleep(1.0)
            health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()
            assert health["status"] == "degraded" and health["redis"] == "down"
        finally:
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=15)
    assert "redis unavailable" in output
    assert PASSWORD not in output and "another-password-123" not in output


def test_sigterm_exits_in_time_even_with_firestore_gone(
    protected_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FirestoreEmulator() as own:
        monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", own.host)
        port = free_port()
        env = {**service_env(protected_redis, own), "LISTENERS_SHUTDOWN_TIMEOUT_SECONDS": "6"}
        process = uvicorn(env, port)
        try:
            wait_for_port(port, 60, None)
            db = firestore.Client(project="process-test")
            for n in range(40):
                db.document(f"listeners_registry/u{n}").set(
                    {"status": "online", "heartbeat_at": "2999-01-01T00:00:00Z"}
                )
            db.close()
            deadline = time.monotonic() + 60
            while httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()["listeners_count"] < 40:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            own.stop(signal.SIGKILL)  # every watch now closes slowly
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=30)
            assert time.monotonic() - started < 10
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
