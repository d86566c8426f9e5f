"""The fault lab's second consumer: the browser client module, run for real.

`bench/browser_clients.mjs` runs one `ListenersClient` of listeners-client.js (the file the
service serves at /assets/listeners-client.js) per user in one Node process, connected to the
services' `/ws` with tokens from a `LocalIssuer` (the services verify them against its
certificate, `LISTENERS_TOKEN_CERTS_URL`). Here: start it, ask it for its state every
`interval` seconds, and hold the last answer in the shape of `Consumer.state()`, so a scenario
compares it with the database truth as it does the bridge's reducers.

What it compares: unread notifications and direct messages (the lists a page shows); chat
threads are not subscribed (a `chat.subscribe` over a socket writes the registry, which the
lab writes itself). Duplicates: an event the client applied twice (its order rules drop a
re-delivery with the same event id; one that passes them would show twice in a page).
Tail positions (`*.position`): counted, with those the client's order rules found ahead of
what it held (a gap), never as a change or a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.cluster import Instance
from listeners_testkit.auth import LocalIssuer
from listeners_testkit.processes import PROJECT_ROOT

CLIENT_MODULE = PROJECT_ROOT / "src" / "listeners" / "deliver" / "static" / "listeners-client.js"
SCRIPT = PROJECT_ROOT / "bench" / "browser_clients.mjs"
# Module detection of the client file (an ES module with a .js name outside a "type": "module"
# package) warns once on stderr.
NODE = ["node", "--no-warnings"]


def node_missing() -> str:
    """Why the browser consumer cannot run here ("" when it can)."""
    if not shutil.which("node"):
        return "node is not installed"
    if not (PROJECT_ROOT / "node_modules" / "ws").is_dir():
        return "the ws package is not installed (npm ci)"
    return ""


def token_env(certs_url: str) -> dict[str, str]:
    """What a service needs to accept the issuer's tokens on /ws."""
    return {"LISTENERS_TOKEN_CERTS_URL": certs_url}


class Browsers:
    """`uids` each with a ListenersClient, through `urls` in turn (one per service instance)."""

    def __init__(self, project: str, uids: Iterable[str], log_path: Path, interval: float = 1.0) -> None:
        self.uids = list(uids)
        self.issuer = LocalIssuer(project)
        self.certs_url = self.issuer.serve(demo_users=self.uids)
        self.log_path = log_path
        self.interval = interval
        self.process: asyncio.subprocess.Process | None = None
        self.views: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, float] = {}  # "uid/doc_id" -> first sighting, time.monotonic()
        self.duplicates = 0
        self.reapplied = 0  # applied again after a sync that replaced the state (not duplicates)
        self.duplicate_examples: list[str] = []
        self.wire_duplicates = 0  # re-deliveries the client's order rules dropped
        self.connects = 0
        self.events = 0
        self.positions = 0  # tail positions received
        self.position_gaps = 0  # ... ahead of what the client held: it asked for a resync
        self.position_gap_examples: list[str] = []
        self.positions_applied = 0  # handed on as a change: must stay 0
        self.position_delays: list[float] = []  # seconds from a stream's last event to its position
        self.error = ""
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.instances: list[Instance] = []

    def env(self) -> dict[str, str]:
        return token_env(self.certs_url)

    async def start(self, instances: list[Instance]) -> None:
        """Clients connect to `instances` in turn, to the live ones only (as a load balancer
        with health checks would send them: the list is updated at every poll)."""
        self.instances = instances
        config = {
            "module": str(CLIENT_MODULE),
            "urls": self.urls(),
            "token_url": self.issuer.token_url,
            "uids": self.uids,
        }
        with open(self.log_path, "ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *NODE,
                str(SCRIPT),
                json.dumps(config),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                limit=64 * 2**20,  # one line holds every user's lists
            )
        self._task = asyncio.create_task(self._poll())

    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{i.service.port}/ws" for i in self.instances if i.alive]

    async def ask(self, command: str) -> dict[str, Any]:
        process = self.process
        if process is None or process.stdin is None or process.stdout is None:
            raise RuntimeError("the browser clients are not running")
        message = {"cmd": command, "urls": self.urls()}
        async with self._lock:
            process.stdin.write(json.dumps(message).encode() + b"\n")
            await process.stdin.drain()
            line = await process.stdout.readline()
        if not line:
            ended = process.returncode
            raise RuntimeError(f"the browser clients' process ended ({ended}); see {self.log_path}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def refresh(self) -> None:
        answer = await self.ask("state")
        now_wall, now = time.time(), time.monotonic()
        for key, ms in answer["seen"].items():
            self.seen.setdefault(key, now - max(0.0, now_wall - ms / 1000))
        self.views = answer["users"]
        self.duplicates = int(answer["duplicates"])
        self.reapplied = int(answer["reapplied"])
        self.duplicate_examples = list(answer["duplicate_examples"])
        self.wire_duplicates = int(answer["wire_duplicates"])
        self.connects, self.events = int(answer["connects"]), int(answer["events"])
        self.positions, self.position_gaps = int(answer["positions"]), int(answer["position_gaps"])
        self.position_gap_examples = list(answer["position_gap_examples"])
        self.positions_applied = int(answer["positions_applied"])
        self.position_delays += [float(x) for x in answer["position_delays"]]

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except (RuntimeError, OSError, ValueError) as exc:
                self.error = str(exc)
                return
            await asyncio.sleep(self.interval)

    def ready(self) -> int:
        return sum(1 for v in self.views.values() if {"notif", "msg"} <= set(v["synced"]))

    def state(self) -> dict[str, dict[str, str]]:
        """As `Consumer.state()`: per user, notification doc id -> status, and DM key -> "dm"."""
        out: dict[str, dict[str, str]] = {}
        for uid in self.uids:
            view = self.views.get(uid, {"notif": {}, "msg": []})
            items = {f"n:{doc_id}": status for doc_id, status in view["notif"].items()}
            items.update({f"m:{key}": "dm" for key in view["msg"]})
            out[uid] = items
        return out

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(RuntimeError, OSError, ValueError, TimeoutError):
                async with asyncio.timeout(10.0):
                    await self.ask("stop")
            with contextlib.suppress(ProcessLookupError):
                if process.returncode is None:
                    process.kill()
            await process.wait()
        self.issuer.close()
