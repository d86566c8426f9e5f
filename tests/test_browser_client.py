"""The browser client module (`/assets/listeners-client.js`) in a real headless Chromium,
through the /demo page that uses it: an event dropped on purpose is noticed and healed by a
resync, a socket killed mid-stream reconnects and catches up, and a token is refreshed.

Playwright's WebSocket routing sits between the page and the service: it forwards every
frame both ways, records what the page sends, and drops one event when told to. The app
runs under uvicorn in this process with real Redis and the Firestore emulator.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from typing import Any

import pytest
from playwright.async_api import Browser, WebSocketRoute

from listeners.config import Settings, WebSocketSettings
from listeners_testkit.auth import LocalIssuer
from listeners_testkit.processes import free_port
from tests.conftest import Firebase
from tests.test_browser import WAIT_MS, browser, doc_ids, page_errors, serving  # noqa: F401

pytestmark = pytest.mark.asyncio


class Wire:
    """Between the page and the service: forwards, records, and drops on request."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []  # what the page sent
        self.received: list[dict[str, Any]] = []  # what reached the page
        self.dropped: list[dict[str, Any]] = []
        self.drop_add_of: str | None = None
        self.connections = 0

    def route(self, ws: WebSocketRoute) -> None:
        self.connections += 1
        server = ws.connect_to_server()

        def to_server(message: str | bytes) -> None:
            self.sent.append(json.loads(message))
            server.send(message)

        def to_page(message: str | bytes) -> None:
            event = json.loads(message)
            if event.get("type") == "notif.add" and event["payload"].get("doc_id") == self.drop_add_of:
                self.drop_add_of = None
                self.dropped.append(event)
                return
            self.received.append(event)
            ws.send(message)

        ws.on_message(to_server)
        server.on_message(to_page)

    def sent_types(self) -> list[str]:
        return [m.get("type", "") for m in self.sent]


async def shown(page: Any, doc_id: str) -> None:
    await page.locator(f'#notifications article[data-doc-id="{doc_id}"]').wait_for(timeout=WAIT_MS)


async def until(predicate: Any) -> None:
    async with asyncio.timeout(WAIT_MS / 1000):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_the_client_module_heals_gaps_reconnects_and_refreshes(
    settings: Settings,
    fb: Firebase,
    project_id: str,
    browser: Browser,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    issuer = LocalIssuer(project_id)
    certs_url = issuer.serve(demo_users=["kim"], origins=[base])
    settings = dataclasses.replace(
        settings,
        websocket=WebSocketSettings(certs_url=certs_url),
        service=dataclasses.replace(settings.service, demo_token_url=issuer.token_url),
    )
    await fb.notification("kim", "n-first", timestamp="2025-01-01T09:00:00")
    wire = Wire()
    try:
        async with serving(settings, port) as app:
            await fb.online("kim")
            page = await browser.new_page()
            errors = page_errors(page)
            await page.route_web_socket(re.compile(r"/ws$"), wire.route)
            await page.goto(f"{base}/demo")
            await page.click('#users button[data-uid="kim"]')
            await page.locator("#connection", has_text="live").wait_for(timeout=WAIT_MS)
            await shown(page, "n-first")

            # An event dropped on purpose: the next one's seq shows the gap, the module asks
            # for a resync, and the sync brings the lost notification.
            wire.drop_add_of = "n-lost"
            await fb.notification("kim", "n-lost", timestamp="2025-01-01T10:00:00")
            await until(lambda: bool(wire.dropped))
            assert "resync" not in wire.sent_types()
            await fb.notification("kim", "n-next", timestamp="2025-01-01T11:00:00")
            await shown(page, "n-lost")
            await shown(page, "n-next")
            assert wire.sent_types().count("resync") == 1
            assert await doc_ids(page, "#notifications article") == ["n-next", "n-lost", "n-first"]

            # The socket killed mid-stream (a non-final close code): the module reconnects with
            # a fresh token, and what was written meanwhile comes with the new syncs.
            gateway = app.state.gateway
            (connection,) = gateway.sockets["kim"]
            await connection.close(4014, "killed by the test")
            await until(lambda: "kim" not in gateway.sockets)
            await fb.notification("kim", "n-while-away", timestamp="2025-01-01T12:00:00")
            await shown(page, "n-while-away")
            assert wire.connections == 2
            await page.locator("#connection", has_text="live").wait_for(timeout=WAIT_MS)

            # A token refreshed: auth.refresh goes out with a new token, auth.ok comes back.
            oks = sum(1 for m in wire.received if m.get("type") == "auth.ok")
            await page.click("#refresh")
            await until(lambda: "auth.refresh" in wire.sent_types())
            await until(lambda: sum(1 for m in wire.received if m.get("type") == "auth.ok") == oks + 1)
            refresh = next(m for m in wire.sent if m.get("type") == "auth.refresh")
            assert isinstance(refresh.get("token"), str) and refresh["token"].count(".") == 2
            await page.locator("#connection", has_text="live").wait_for(timeout=WAIT_MS)
            assert errors == []
    finally:
        issuer.close()
