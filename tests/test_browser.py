"""The web pages in a real headless Chromium (Debian's `chromium`, driven by Playwright).

The app runs under uvicorn in this process with real Redis, the Firestore emulator and the
Realtime Database stand-in; a local issuer serves the certificates and the demo's tokens.
Screenshots land in test-artifacts/ (demo.png, ops.png).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from google.cloud import firestore
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect
from starlette.applications import Starlette

from listeners.assemble import create_app
from listeners.config import Secret, Settings, WebSocketSettings
from listeners.process import ProcessHooks
from listeners_testkit.auth import LocalIssuer
from listeners_testkit.processes import free_port
from listeners_testkit.rtdb_server import RtdbStandin
from tests.conftest import Firebase, wait_until

pytestmark = pytest.mark.asyncio

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium tries to reach Google and, on a closed
# network, fails; the sandbox needs privileges a container does not have.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
ADMIN_TOKEN = "browser-test-admin-token-0123456789"
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def standin() -> Iterator[RtdbStandin]:
    with RtdbStandin() as server:
        yield server


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert os.path.exists(CHROMIUM), "Debian's chromium is missing: run scripts/bootstrap"
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@contextlib.asynccontextmanager
async def serving(settings: Settings, port: int) -> AsyncIterator[Starlette]:
    # A failure must never SIGTERM or exit the test process.
    hooks = ProcessHooks(stop=lambda reason: None, exit=lambda status: None, exits=False)
    app = create_app(settings, process=hooks)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started)
    try:
        yield app
    finally:
        server.should_exit = True
        await task


def page_errors(page: Page) -> list[str]:
    """Console errors and uncaught exceptions of the page (CSP violations show up here)."""
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda error: errors.append(str(error)))
    return errors


async def animations_done(page: Page) -> None:
    # Polled from here: Playwright's wait_for_function evaluates strings, which the CSP forbids.
    async with asyncio.timeout(WAIT_MS / 1000):
        while await page.evaluate("document.getAnimations().length"):
            await asyncio.sleep(0.05)


async def doc_ids(page: Page, selector: str) -> list[str]:
    found: list[str] = await page.locator(selector).evaluate_all("els => els.map(e => e.dataset.docId)")
    return found


async def test_demo_and_operations_pages(
    settings: Settings,
    fb: Firebase,
    db: firestore.Client,
    project_id: str,
    standin: RtdbStandin,
    browser: Browser,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    issuer = LocalIssuer(project_id)
    certs_url = issuer.serve(demo_users=["bea", "cal"], origins=[base])
    ns = f"db-{project_id}"
    settings = dataclasses.replace(
        settings,
        instance_id="browser-test-1",
        service=dataclasses.replace(settings.service, demo_token_url=issuer.token_url),
        websocket=WebSocketSettings(certs_url=certs_url, admin_token=Secret(ADMIN_TOKEN)),
        firebase=dataclasses.replace(
            settings.firebase,
            database_url=f"https://{ns}.firebaseio.com",
            database_emulator_host=f"127.0.0.1:{standin.port}",
        ),
    )
    ARTIFACTS.mkdir(exist_ok=True)
    await fb.notification("bea", "n-old", timestamp="2025-01-01T09:00:00", status="completed")
    async with (
        serving(settings, port),
        httpx.AsyncClient(base_url=standin.url, params={"ns": ns}, timeout=10) as rtdb,
    ):
        await fb.online("bea")
        page = await browser.new_page(viewport={"width": 1280, "height": 860})
        errors = page_errors(page)
        await page.goto(f"{base}/demo")
        await page.click('#users button[data-uid="bea"]')
        await page.locator("#connection", has_text="live").wait_for(timeout=WAIT_MS)
        await page.locator('#notifications article[data-doc-id="n-old"]').wait_for(timeout=WAIT_MS)

        # A notification written to Firestore appears, newest first; a direct message too.
        await fb.notification("bea", "n-new", file_name="invoice-2031.pdf", status="running")
        fresh = page.locator('#notifications article[data-doc-id="n-new"]')
        await fresh.wait_for(timeout=WAIT_MS)
        assert "invoice-2031.pdf" in await fresh.inner_text()
        assert await doc_ids(page, "#notifications article") == ["n-new", "n-old"]
        message = {
            "file_name": "contract-7.pdf",
            "status": "to_review",
            "job_id": "job-7",
            "sender_id": "demo-writer",
            "message": "Please review this contract",
            "timestamp": "2025-01-01T10:00:00",
        }
        (await rtdb.post("/clients/bea/direct_message_notif.json", json=message)).raise_for_status()
        await page.locator("#messages article", has_text="Please review this contract").wait_for(
            timeout=WAIT_MS
        )
        await animations_done(page)  # the highlight of the last change has faded out
        await page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)

        # "Mark read" writes read: true in Firestore, and the notif.remove takes it away.
        await fresh.locator("button.mark-read").click()
        await fresh.wait_for(state="detached", timeout=WAIT_MS)
        snapshot = await asyncio.to_thread(db.document("clients/bea/notifications/n-new").get)
        assert snapshot.get("read") is True
        assert await doc_ids(page, "#notifications article") == ["n-old"]
        assert await page.locator("#notif-count").inner_text() == "1"
        assert errors == []

        # The operations page: refused without the right token, then live with it.
        ops = await browser.new_page(viewport={"width": 1280, "height": 900})
        ops_errors = page_errors(ops)
        await ops.goto(f"{base}/ops")
        await ops.fill("#token", "not-the-admin-token-at-all")
        await ops.press("#token", "Enter")
        await ops.locator("#signin-error", has_text="refused").wait_for(timeout=WAIT_MS)
        await ops.fill("#token", ADMIN_TOKEN)
        await ops.press("#token", "Enter")
        await ops.locator("#instance", has_text="browser-test-1").wait_for(timeout=WAIT_MS)
        removed = ops.locator("#recent tr", has_text="notif.remove").filter(has_text="n-new")
        await removed.wait_for(timeout=WAIT_MS)
        assert "bea" in await removed.inner_text()
        assert "bea" in await ops.locator("#uids").inner_text()
        assert await ops.locator("#sockets").inner_text() == "1"
        # a rate needs a second poll
        await expect(ops.locator("#rate")).to_have_text(re.compile(r"^\d+\.\d$"), timeout=WAIT_MS)
        await ops.screenshot(path=str(ARTIFACTS / "ops.png"), full_page=True)
        assert [e for e in ops_errors if "401 (Unauthorized)" not in e] == []  # only the wrong token's
        # The token stays in the tab's session storage, never in the address.
        assert ADMIN_TOKEN not in ops.url
        assert await ops.evaluate("sessionStorage.getItem('listeners.adminToken')") == ADMIN_TOKEN

        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            assert (await http.get("/ops/state")).status_code == 401
            wrong = {"Authorization": "Bearer " + ADMIN_TOKEN[:-1] + "x"}
            assert (await http.get("/ops/state", headers=wrong)).status_code == 401
            auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            state: dict[str, Any] = (await http.get("/ops/state", headers=auth)).json()
            # Identifiers only: no payload, no file name, no token anywhere in the answer.
            assert all(set(e) == {"at", "uid", "type", "doc_id"} for e in state["recent"])
            text = (await http.get("/ops/state", headers=auth)).text
            assert "invoice-2031" not in text and ADMIN_TOKEN not in text
            token = await http.get(issuer.token_url, params={"uid": "mallory"}, headers={"Origin": base})
            assert token.status_code == 403  # the issuer mints for the demo users only
            foreign = await http.get(
                issuer.token_url, params={"uid": "bea"}, headers={"Origin": "http://evil"}
            )
            assert foreign.status_code == 403
    issuer.close()


async def test_pages_are_off_unless_configured(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not settings.service.demo_token_url  # LISTENERS_DEMO_TOKEN_URL unset: /demo is off
    on = dataclasses.replace(settings, websocket=WebSocketSettings(admin_token=Secret(ADMIN_TOKEN)))
    for configured, expected in ((settings, 404), (on, 200)):
        transport = httpx.ASGITransport(app=create_app(configured))  # no lifespan: routing only
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for path in ("/ops", "/assets/ops.js", "/assets/pages.css"):
                assert (await client.get(path)).status_code == expected, path
            for path in (
                "/demo",
                "/demo/config",
                "/assets/demo.js",
                "/assets/ops.html",
                "/assets/..%2Fpages.py",
            ):
                assert (await client.get(path)).status_code == 404, path
            assert (await client.get("/ops/state")).status_code == (404 if expected == 404 else 401)
            module = await client.get("/assets/listeners-client.js")  # Direct mode's client: always
            assert module.status_code == 200 and "export class ListenersClient" in module.text
            assert module.headers["access-control-allow-origin"] == "*"
