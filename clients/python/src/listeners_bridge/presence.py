"""The registry document of an online user, as the Reflex backend keeps it (specification §4);
the writes are source.stores.RegistryStore's, and Direct mode's presence is this one too.

Reference-counted per user: every tab or session enters `online(uid)`; the first writes
`status: "online"` and starts a heartbeat every 30 s, the last to leave writes `offline`
(best effort). Writes never raise into the page: failures are logged and retried.

With several backend processes, each counts its own sessions. The `offline` write carries
a precondition on the document's last update time, so a process never marks offline a
user whom another process heartbeated since.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from listeners_bridge.backoff import Backoff
from listeners_bridge.registry import ChatThread, RegistryStore

log = logging.getLogger(__name__)


@dataclass
class _User:
    companies: list[str] | None  # None: not ours to write (the web app keeps it)
    threads: list[ChatThread] | None
    sessions: int = 0
    heartbeat: asyncio.Task[None] | None = None
    last_write: Any = None  # update time of our last write, for the offline precondition
    written: asyncio.Event = field(default_factory=asyncio.Event)


class Presence:
    def __init__(
        self,
        db: Any,  # google.cloud.firestore.AsyncClient
        *,
        ttl_seconds: int = 90,
        heartbeat_seconds: float = 30.0,
        instance_id: str | None = None,
    ) -> None:
        self._store = RegistryStore(db)
        self._ttl = ttl_seconds
        self._every = heartbeat_seconds
        self._instance_id = instance_id or socket.gethostname()
        self._users: dict[str, _User] = {}
        self._backoff = Backoff(base=1.0, cap=15.0)

    def sessions(self, uid: str) -> int:
        user = self._users.get(uid)
        return user.sessions if user else 0

    @contextlib.asynccontextmanager
    async def online(
        self,
        uid: str,
        companies: Iterable[str] | None = None,
        threads: Sequence[ChatThread] | None = None,
    ) -> AsyncIterator[None]:
        """Keeps the user online while at least one `online(uid)` block is open.

        `companies` and `threads`, when given, are written too; left as None, those fields
        of the document are left as they are (written is a merge, never a replacement)."""
        user = self._users.get(uid)
        if user is None:
            user = self._users[uid] = _User(
                None if companies is None else list(companies), None if threads is None else list(threads)
            )
            user.heartbeat = asyncio.create_task(self._heartbeat(uid, user), name=f"presence-{uid}")
        user.sessions += 1
        try:
            yield
        finally:
            user.sessions -= 1
            if user.sessions == 0:
                del self._users[uid]
                await self._leave(uid, user)

    async def wait_written(self, uid: str) -> None:
        """Until the first online write of this user has landed (for tests and start-up)."""
        user = self._users.get(uid)
        if user is not None:
            await user.written.wait()

    async def set_threads(self, uid: str, threads: Sequence[ChatThread]) -> None:
        """The chat threads the user has open; the service subscribes to exactly these."""
        user = self._users.get(uid)
        if user is None:
            return
        user.threads = list(threads)
        await self._write(uid, user)

    async def _write(self, uid: str, user: _User) -> bool:
        try:
            update_time = await self._store.write_online(
                uid,
                ttl_seconds=self._ttl,
                instance_id=self._instance_id,
                companies=user.companies,
                threads=user.threads,
            )
        except Exception as exc:  # never into the page: the heartbeat loop retries
            log.warning("presence write failed", extra={"uid": uid, "reason": f"{type(exc).__name__}: {exc}"})
            return False
        user.last_write = update_time
        user.written.set()
        return True

    async def _heartbeat(self, uid: str, user: _User) -> None:
        failures = 0
        while True:
            if await self._write(uid, user):
                failures = 0
                await asyncio.sleep(self._every)
            else:
                await asyncio.sleep(min(self._every, self._backoff.delay(failures)))
                failures += 1

    async def _leave(self, uid: str, user: _User) -> None:
        if user.heartbeat is not None:
            user.heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await user.heartbeat
        if user.last_write is None:
            return
        try:
            await self._store.write_offline(uid, unchanged_since=user.last_write)
        except Exception as exc:  # best effort: expiry catches what this misses
            log.info("presence offline write skipped", extra={"uid": uid, "reason": type(exc).__name__})
