"""Checked by a real Prometheus (Debian's `prometheus` server): it scrapes a 2-worker service
(`uvicorn app.main:app`, WEB_CONCURRENCY=2) every second, with deploy/prometheus/alerts.yml
loaded, during a short scripted load; the test then asks Prometheus's HTTP API. Events
published equal the notifications written, sockets equal those opened, and the Redis alert's
condition turns on (ListenersRedisDown pending) while Redis is stopped.

With LISTENERS_SCREENSHOT=path, it also saves Prometheus's graph page of the key series, in
Chromium, to that path (docs/prometheus-e2e.png was made so)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.cloud import firestore
from websockets.asyncio.client import ClientConnection

from listeners_testkit.auth import LocalIssuer
from listeners_testkit.processes import FirestoreEmulator, RedisServer, free_port, wait_for_port
from tests.conftest import register_online
from tests.test_websocket_workers import healthy, instance_ids, open_socket, service

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(
        shutil.which("prometheus") is None, reason="prometheus missing: run scripts/bootstrap"
    ),
]

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"


@contextlib.contextmanager
def prometheus(target_port: int, tmp_path: Path) -> Iterator[str]:
    """A Prometheus server scraping 127.0.0.1:target_port every second; yields its base URL."""
    port = free_port()
    rules = tmp_path / "alerts.yml"
    shutil.copy(ALERTS, rules)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files: ['{rules}']\n"
        "scrape_configs:\n  - job_name: listeners\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port(port, 60, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


async def query(base: str, expr: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=base) as http:
        body = (await http.get("/api/v1/query", params={"query": expr}, timeout=30)).json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def value(base: str, expr: str) -> float | None:
    result = await query(base, expr)
    return float(result[0]["value"][1]) if result else None


async def until(base: str, expr: str, wanted: float, timeout: float = 120) -> None:
    seen: float | None = None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while (seen := await value(base, expr)) != wanted:
                await asyncio.sleep(1)
    assert seen == wanted, f"{expr}: {seen}, wanted {wanted}"


async def test_a_real_prometheus_sees_the_whole_task_and_the_redis_alert(
    emulator: FirestoreEmulator,
    db: firestore.Client,
    issuer: LocalIssuer,
    issuer_and_url: tuple[LocalIssuer, str],
    tmp_path: Path,
) -> None:
    run = uuid.uuid4().hex[:6]
    users = [f"p{run}-{i}" for i in range(12)]
    register_online(db, users)
    with (
        RedisServer() as redis_server,  # its own: the test stops it
        service(redis_server, issuer, issuer_and_url[1], tmp_path) as process,
        prometheus(process.port, tmp_path) as base,
    ):
        await healthy(process.port)
        await instance_ids(process.port, 2)
        await until(base, 'sum(listeners_attached_users{job="listeners"})', len(users))
        before = await value(base, 'sum(listeners_events_total{type="notif.add"})') or 0.0

        # The scripted load: notifications for every user, sockets on both workers.
        written = 0
        for n in range(3):
            for uid in users:
                await asyncio.to_thread(
                    db.document(f"clients/{uid}/notifications/e2e-{n}").set,
                    {"read": False, "file_name": f"e2e-{n}", "timestamp": "2025-01-01 00:00:00"},
                )
                written += 1
        sockets: list[ClientConnection] = [
            await open_socket(process.port, issuer.mint(f"ws{run}-{i}")) for i in range(8)
        ]
        try:
            await until(base, 'sum(listeners_events_total{type="notif.add"})', before + written)
            await until(base, "sum(listeners_ws_sockets)", len(sockets))
            await until(base, 'sum(listeners_ws_handshakes_total{outcome="accepted"})', len(sockets))
            assert await value(base, "count(listeners_instance)") == 2  # both workers in one target

            # Redis stops: the condition of ListenersRedisDown turns on, the alert goes pending.
            assert await value(base, 'ALERTS{alertname="ListenersRedisDown"}') is None
            redis_server.stop()
            await until(base, "min(listeners_redis_up)", 0.0, timeout=90)
            await until(base, 'count(ALERTS{alertname="ListenersRedisDown"})', 1.0, timeout=60)
            path = os.environ.get("LISTENERS_SCREENSHOT")
            if path:
                await screenshot(base, Path(path))
            redis_server.restart()
            await until(base, "min(listeners_redis_up)", 1.0, timeout=120)
        finally:
            for ws in sockets:
                await ws.close()


async def screenshot(base: str, path: Path) -> None:
    """Prometheus's graph page with the key series, in Debian's Chromium."""
    from playwright.async_api import async_playwright

    from tests.test_browser import CHROMIUM, CHROMIUM_ARGS

    exprs = [
        'sum by (type) (listeners_events_total{type="notif.add"})',
        "sum(listeners_ws_sockets)",
        "min(listeners_redis_up)",
        'ALERTS{alertname="ListenersRedisDown"}',
    ]
    params: dict[str, str] = {}
    for i, expr in enumerate(exprs):
        params |= {f"g{i}.expr": expr, f"g{i}.tab": "0", f"g{i}.range_input": "1m"}
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1400, "height": 3000})
        await page.goto(f"{base}/graph?{urllib.parse.urlencode(params)}")
        await page.wait_for_timeout(4000)
        await page.screenshot(path=str(path))
        await browser.close()
