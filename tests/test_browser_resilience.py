"""The browser module (`/assets/listeners-client.js`, the npm package's module) in a real
headless Chromium, through what a browser's connection goes through: the network off and back
on, a tab hidden past an idle close and shown again, a socket that died without closing (no
pong), and a server restart. Each ends with nothing lost: the page's lists equal what the
database holds for the user (its unread notifications and direct messages of its companies,
normalised and ordered as the service does).

The page is a bare harness served on the service's own origin (Playwright answers its URL),
which imports the module from /assets/ as any app would, with the timings each case needs:
where the case is about an event (`online`, `visibilitychange`), the backoff is ten minutes,
so that only that event can bring the socket back within the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from google.cloud import firestore
from playwright.async_api import Browser, BrowserContext, Page, WebSocketRoute

from listeners.config import Settings, WebSocketSettings
from listeners.normalise.messages import normalise_message
from listeners.normalise.notifications import normalise_notification
from listeners_bridge.timestamps import newest_first
from listeners_testkit.auth import LocalIssuer
from listeners_testkit.processes import free_port
from listeners_testkit.rtdb_server import RtdbStandin
from tests.conftest import Firebase
from tests.test_browser import WAIT_MS, browser, page_errors, serving, standin  # noqa: F401

pytestmark = pytest.mark.asyncio

UID = "dana"
COMPANY = "c1"  # dana's only company: items of others exist and must stay hidden
NEVER = {"initial": 600_000, "max": 600_000}  # a backoff that cannot fire within the wait

HARNESS = """<!doctype html>
<meta charset="utf-8"><title>listeners-client harness</title>
<script type="module">
import { ListenersClient } from "/assets/listeners-client.js";
const params = new URLSearchParams(location.search);
// The tab's visibility, as the test sets it (headless Chromium's own never changes).
let visibility = "visible";
Object.defineProperty(document, "visibilityState", { configurable: true, get: () => visibility });
Object.defineProperty(document, "hidden", { configurable: true, get: () => visibility === "hidden" });
const harness = window.harness = { statuses: [], live: 0, state: null };
harness.show = (state) => {
  visibility = state;
  document.dispatchEvent(new Event("visibilitychange"));
};
harness.client = new ListenersClient({
  url: `ws://${location.host}/ws`,
  token: () => window.mintToken(), // the local issuer's, handed over by the test
  onStatus: (status, detail) => {
    harness.statuses.push([status, detail]);
    if (status === "live") harness.live += 1;
  },
  onChange: (state) => { harness.state = state; },
  ...JSON.parse(params.get("options")),
});
harness.client.start();
</script>
"""


@dataclass
class Setup:
    settings: Settings
    port: int
    issuer: LocalIssuer
    fb: Firebase
    db: firestore.Client
    rtdb: httpx.AsyncClient
    context: BrowserContext
    sockets: list[Any] = field(default_factory=list)  # every WebSocket the page opened
    read_later: dict[str, str] = field(default_factory=dict)  # tag -> a message to read while away

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def open(self, **options: Any) -> tuple[Page, list[str]]:
        page = await self.context.new_page()
        errors = page_errors(page)
        page.on("websocket", lambda ws: self.sockets.append(ws))
        # The test hands the issuer's tokens over: the page needs no origin but the service's.
        await page.expose_function("mintToken", lambda: self.issuer.mint(UID))
        await page.route(
            f"{self.base}/harness*",
            lambda route: route.fulfill(status=200, content_type="text/html", body=HARNESS),
        )
        query = urlencode({"options": json.dumps(options)})
        await page.goto(f"{self.base}/harness?{query}")
        try:
            await lives(page, 1)
        except Exception as exc:
            statuses = await page.evaluate("JSON.stringify(window.harness?.statuses)")
            raise AssertionError(f"never live: {statuses}; {errors}") from exc
        return page, errors

    async def notification(self, doc_id: str, **fields: Any) -> None:
        await self.fb.notification(UID, doc_id, collection_id=COMPANY, **fields)

    async def message(self, text: str, company: str = COMPANY) -> str:
        item = {"file_name": f"{text}.pdf", "status": "to_review", "collection_id": company, "message": text}
        answer = await self.rtdb.post(f"/clients/{UID}/direct_message_notif.json", json=item)
        answer.raise_for_status()
        key: str = answer.json()["name"]
        return key

    async def changes_while_away(self, tag: str) -> None:
        """An add, an update and a read of notifications, a direct message added and one read."""
        await self.notification(f"n-{tag}-added", status="running")
        await self.fb.update(f"clients/{UID}/notifications/n-kept", {"status": f"error-{tag}"})
        await self.fb.update(f"clients/{UID}/notifications/n-read-{tag}", {"read": True})
        await self.message(f"m-{tag}")
        (
            await self.rtdb.delete(f"/clients/{UID}/direct_message_notif/{self.read_later[tag]}.json")
        ).raise_for_status()

    async def seed(self, *tags: str) -> None:
        await self.notification("n-kept", timestamp="2025-01-01T09:00:00")
        await self.fb.notification(UID, "n-other-company", collection_id="c2")
        for tag in tags:
            await self.notification(f"n-read-{tag}", timestamp="2025-01-01T08:00:00")
            self.read_later[tag] = await self.message(f"m-read-{tag}")
        await self.message("m-other-company", company="c2")

    async def truth(self) -> dict[str, Any]:
        """What the database holds for the user, as the service would show it."""
        query = self.db.collection(f"clients/{UID}/notifications").where(
            filter=firestore.FieldFilter("read", "==", False)
        )
        docs = await asyncio.to_thread(lambda: list(query.stream()))
        notifications = [normalise_notification(d.id, d.to_dict() or {}) for d in docs]
        stored = (await self.rtdb.get(f"/clients/{UID}/direct_message_notif.json")).json() or {}
        messages = [normalise_message(key, value) for key, value in stored.items()]
        return {  # the company filter, then the service's order, as JSON
            "notifications": json.loads(
                json.dumps(newest_first(n for n in notifications if n["collection_id"] == COMPANY))
            ),
            "messages": json.loads(
                json.dumps(newest_first(m for m in messages if m["collection_id"] == COMPANY))
            ),
        }

    async def nothing_lost(self, page: Page, tag: str) -> None:
        """A last change after the disruption; once the page shows it (and the last message),
        its lists must equal the database's, the changes made while away included."""
        sentinel = f"n-after-{tag}"
        await self.notification(sentinel, timestamp="2030-01-01T00:00:00")
        marker = await self.message(f"{sentinel}-message")
        await shows(page, "notifications", sentinel)
        await shows(page, "messages", marker)
        state = await page.evaluate("window.harness.state")
        truth = await self.truth()
        assert [n["doc_id"] for n in state["notifications"]] == [n["doc_id"] for n in truth["notifications"]]
        assert state["notifications"] == truth["notifications"]
        assert state["messages"] == truth["messages"]
        assert state["count"] == len(truth["messages"])
        assert "n-other-company" not in json.dumps(state)
        kept = next(n for n in state["notifications"] if n["doc_id"] == "n-kept")
        assert kept["status"] == f"error-{tag}" and f"n-{tag}-added" in json.dumps(state)
        assert f"n-read-{tag}" not in json.dumps(state) and f"m-read-{tag}" not in json.dumps(state)


async def lives(page: Page, count: int) -> None:
    """Until the page has been `live` `count` times (each reconnection is one more)."""
    await page.wait_for_function("n => window.harness.live >= n", arg=count, timeout=WAIT_MS)


async def status(page: Page, wanted: str) -> None:
    """Until the page has reported `wanted` since it was last live."""
    await page.wait_for_function(
        """wanted => {
          const seen = window.harness.statuses.map(([s]) => s);
          return seen.slice(seen.lastIndexOf("live") + 1).includes(wanted);
        }""",
        arg=wanted,
        timeout=WAIT_MS,
    )


async def shows(page: Page, kind: str, doc_id: str) -> None:
    await page.wait_for_function(
        "([kind, id]) => (window.harness.state?.[kind] || []).some((i) => i.doc_id === id)",
        arg=[kind, doc_id],
        timeout=WAIT_MS,
    )


# Chromium logs a refused connection as an error: expected while the service is away.
AWAY = re.compile(r"WebSocket connection to .* failed|ERR_INTERNET_DISCONNECTED|ERR_CONNECTION_REFUSED")


def unexpected(errors: list[str]) -> list[str]:
    return [e for e in errors if not AWAY.search(e)]


@pytest.fixture
async def setup(
    settings: Settings,
    fb: Firebase,
    db: firestore.Client,
    project_id: str,
    standin: RtdbStandin,  # noqa: F811
    browser: Browser,  # noqa: F811
) -> AsyncIterator[Setup]:
    port = free_port()
    issuer = LocalIssuer(project_id)
    certs_url = issuer.serve()
    ns = f"db-{project_id}"
    settings = dataclasses.replace(
        settings,
        instance_id="resilience-1",
        websocket=WebSocketSettings(certs_url=certs_url),
        firebase=dataclasses.replace(
            settings.firebase,
            database_url=f"https://{ns}.firebaseio.com",
            database_emulator_host=f"127.0.0.1:{standin.port}",
        ),
    )
    # Chromium's Local Network Access checks count a page that Playwright serves as public, so
    # its WebSocket to a loopback address needs this permission (the real /demo does not).
    context = await browser.new_context(permissions=["local-network-access"])
    try:
        async with httpx.AsyncClient(base_url=standin.url, params={"ns": ns}, timeout=10) as rtdb:
            yield Setup(settings, port, issuer, fb, db, rtdb, context)
    finally:
        await context.close()
        issuer.close()


async def test_network_off_and_back_on(setup: Setup) -> None:
    """Offline, the socket goes (closed, or found dead by its ping); the changes made meanwhile
    come with the syncs of the socket opened when the browser's `online` fires — not by the
    backoff, which is ten minutes here."""
    await setup.seed("offline")
    async with serving(setup.settings, setup.port):
        await setup.fb.online(UID, [COMPANY])
        page, errors = await setup.open(backoff=NEVER, pingInterval=1000, pongTimeout=1000)
        await shows(page, "notifications", "n-kept")

        await setup.context.set_offline(True)
        await status(page, "retrying")
        await setup.changes_while_away("offline")
        assert await page.evaluate("window.harness.live") == 1
        await setup.context.set_offline(False)
        await lives(page, 2)
        await setup.nothing_lost(page, "offline")
        assert unexpected(errors) == []


async def test_a_tab_hidden_past_an_idle_close_reconnects_when_shown(setup: Setup) -> None:
    """The server closes the socket of a hidden tab; the tab stays away (its backoff is ten
    minutes) until it is shown, and then reconnects at once and catches up."""
    await setup.seed("hidden")
    async with serving(setup.settings, setup.port) as app:
        await setup.fb.online(UID, [COMPANY])
        page, errors = await setup.open(backoff=NEVER)
        await shows(page, "notifications", "n-kept")

        await page.evaluate("window.harness.show('hidden')")
        gateway = app.state.gateway
        (connection,) = gateway.sockets[UID]
        await connection.close(1001, "idle")
        await status(page, "retrying")
        await setup.changes_while_away("hidden")
        await page.evaluate("window.harness.show('hidden')")  # hidden again: still nothing
        assert len(setup.sockets) == 1 and await page.evaluate("window.harness.live") == 1
        await page.evaluate("window.harness.show('visible')")
        await lives(page, 2)
        assert len(setup.sockets) == 2
        await setup.nothing_lost(page, "hidden")
        assert unexpected(errors) == []


class Hole:
    """Between the page and the service: forwards both ways, until told to swallow everything
    on the first socket (a connection that died without closing: no frame, no close)."""

    def __init__(self) -> None:
        self.connections = 0
        self.swallowing = False
        self.pongs = 0
        self.sent: list[str] = []  # the types the page sent, on any socket
        self.closed_by_page: list[tuple[int | None, str | None]] = []
        self._closing: set[asyncio.Task[None]] = set()

    def route(self, ws: WebSocketRoute) -> None:
        self.connections += 1
        first = self.connections == 1
        server = ws.connect_to_server()

        def to_server(message: str | bytes) -> None:
            self.sent.append(json.loads(message).get("type", ""))
            if not (first and self.swallowing):
                server.send(message)

        def to_page(message: str | bytes) -> None:
            if first and self.swallowing:
                return
            if json.loads(message).get("type") == "pong":
                self.pongs += 1
            ws.send(message)

        def closed(code: int | None, reason: str | None) -> None:
            # With a close handler Playwright forwards no close: this one ends the server side.
            self.closed_by_page.append((code, reason))
            task = asyncio.ensure_future(server.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

        ws.on_message(to_server)
        server.on_message(to_page)
        ws.on_close(closed)


async def until(predicate: Any) -> None:
    async with asyncio.timeout(WAIT_MS / 1000):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_a_dead_socket_is_found_by_its_ping_and_replaced(setup: Setup) -> None:
    """Frames stop both ways, with no close: the unanswered ping makes the page close that
    socket (4000) and open another, whose syncs bring what the dead one swallowed."""
    await setup.seed("dead")
    hole = Hole()
    async with serving(setup.settings, setup.port):
        await setup.fb.online(UID, [COMPANY])
        await setup.context.route_web_socket(re.compile(r"/ws$"), hole.route)
        page, errors = await setup.open(pingInterval=500, pongTimeout=1500)
        await shows(page, "notifications", "n-kept")
        await until(lambda: hole.pongs >= 1)  # pings are answered while the link is good
        assert "ping" in hole.sent

        hole.swallowing = True
        await setup.changes_while_away("dead")
        await until(lambda: hole.connections == 2)
        assert hole.closed_by_page[0][0] == 4000 and "no pong" in (hole.closed_by_page[0][1] or "")
        await lives(page, 2)
        await setup.nothing_lost(page, "dead")
        assert unexpected(errors) == []


async def test_a_server_restart(setup: Setup) -> None:
    """The service stops (its sockets closed with 1001) and a new process takes the port
    (another instance id); the page retries with its backoff until it is back, and catches up
    on what was written while no service ran."""
    await setup.seed("restart")
    async with contextlib.AsyncExitStack() as first:
        await first.enter_async_context(serving(setup.settings, setup.port))
        await setup.fb.online(UID, [COMPANY])
        page, errors = await setup.open(backoff={"initial": 250, "max": 1000})
        await shows(page, "notifications", "n-kept")
    await status(page, "retrying")
    await setup.changes_while_away("restart")
    restarted = dataclasses.replace(setup.settings, instance_id="resilience-2")
    async with serving(restarted, setup.port):
        await lives(page, 2)
        await setup.nothing_lost(page, "restart")
        assert unexpected(errors) == []
