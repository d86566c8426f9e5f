"""The official Firebase JS SDK as a child process the tests drive (`tests/rtdb_sdk_driver.mjs`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("rtdb_sdk_driver.mjs")


def sdk_available() -> bool:
    return shutil.which("node") is not None and (ROOT / "node_modules/@firebase/database").is_dir()


needs_sdk = pytest.mark.skipif(not sdk_available(), reason="node or node_modules/@firebase/database missing")


class Sdk:
    """One SDK app: `call` sends a command and waits for its ack; `events` holds what it saw."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url
        self.token = token
        self.events: list[dict[str, Any]] = []
        self._acks: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._n = 0
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Sdk:
        args = [str(DRIVER), self.url, *([self.token] if self.token else [])]
        self._process = await asyncio.create_subprocess_exec(
            "node",
            *args,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ},
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        async for line in self._process.stdout:
            message = json.loads(line)
            if "ack" in message:
                future = self._acks.pop(message["ack"], None)
                if future is not None and not future.done():
                    future.set_result(message)
            else:
                self.events.append(message)

    async def call(self, op: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        assert self._process is not None and self._process.stdin is not None
        self._n += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._acks[self._n] = future
        self._process.stdin.write(json.dumps({"n": self._n, "op": op, **args}).encode() + b"\n")
        await self._process.stdin.drain()
        async with asyncio.timeout(timeout):
            result = await future
        if "error" in result:
            raise RuntimeError(f"SDK {op}: {result['error']}")
        return result

    def of(self, ev: str, listen_id: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events if e["ev"] == ev and (listen_id is None or e.get("id") == listen_id)]

    def value(self, listen_id: str) -> Any:
        values = self.of("value", listen_id)
        return values[-1]["value"] if values else None

    def connected(self) -> bool:
        states = self.of("connected")
        return bool(states) and states[-1]["value"] is True

    async def wait(self, predicate: Callable[[], object], timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)

    async def stop(self) -> None:
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(Exception):
                await self.call("exit", timeout=5.0)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
