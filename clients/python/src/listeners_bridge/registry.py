"""The online registry, Firestore `listeners_registry/{uid}` (specification §4): the
document's shape, read (`parse_entry`) and written (`online_fields`, `offline_fields`,
`ChatThread.to_fields`). The writes themselves are `source.stores.RegistryStore`'s.

A user is online while `status == "online"` and `now - heartbeat_at <= ttl_seconds`.
Expiry is logical: nothing changes in Firestore when it happens, so the node sweeps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from listeners_bridge.inputs import valid_key
from listeners_bridge.timestamps import parse_timestamp

REGISTRY_COLLECTION = "listeners_registry"
DEFAULT_TTL_SECONDS = 90
# Registry values are clamped to sane ranges: a TTL of 1e20 s or a heartbeat in the year 9999
# would otherwise overflow the date arithmetic of every sweep.
MAX_TTL_SECONDS = 86_400
MAX_HEARTBEAT_AHEAD = timedelta(minutes=5)  # clock skew between writers; later counts as this
_STATUSES = ("online", "offline")

log = logging.getLogger(__name__)


CHAT_MODES = frozenset({"job_chats", "chats", "active_chats"})
CHAT_THREADS = "chat_threads"  # the optional field the chat threads are listed in
_THREAD_FIELDS = ("space_code", "thread_key", "mode")


class InvalidThread(ValueError):
    """Not a chat thread: `bad_mode` when only the mode is not one of `CHAT_MODES`."""

    def __init__(self, bad_mode: bool) -> None:
        super().__init__("mode" if bad_mode else "keys")
        self.bad_mode = bad_mode


@dataclass(frozen=True, slots=True)
class ChatThread:
    """A chat thread the user has open: `{space_code}/{mode}/{thread_key}/messages`."""

    space_code: str
    thread_key: str
    mode: str

    @classmethod
    def from_fields(cls, item: object) -> ChatThread:
        """From `{space_code, thread_key, mode}` (a registry entry's, a WebSocket message's), or
        InvalidThread. The parts are Realtime Database keys and parts of a channel name."""
        values = [item.get(k) if isinstance(item, Mapping) else None for k in _THREAD_FIELDS]
        if not all(valid_key(v) for v in values):
            raise InvalidThread(bad_mode=False)
        if values[2] not in CHAT_MODES:
            raise InvalidThread(bad_mode=True)
        return cls(str(values[0]), str(values[1]), str(values[2]))

    def to_fields(self) -> dict[str, str]:
        """`{space_code, thread_key, mode}`: as the registry lists it and the WebSocket names it."""
        return {"space_code": self.space_code, "thread_key": self.thread_key, "mode": self.mode}


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    uid: str
    status: str
    heartbeat_at: datetime
    ttl_seconds: int
    authorized_companies_ids: frozenset[str]
    instance_id: str
    chat_threads: frozenset[ChatThread] = frozenset()

    def expires_at(self) -> datetime:
        return self.heartbeat_at + timedelta(seconds=self.ttl_seconds)

    def is_online(self, now: datetime) -> bool:
        return self.status == "online" and now <= self.expires_at()


class MalformedEntry(ValueError):
    """A registry document that cannot be read; the message names every bad field."""


def parse_entry(uid: str, data: Mapping[str, Any], default_ttl: int) -> RegistryEntry:
    problems: list[str] = []

    status = data.get("status")
    if status not in _STATUSES:
        problems.append(f"status must be 'online' or 'offline' (got {_describe(status)})")

    heartbeat = parse_timestamp(data.get("heartbeat_at"))
    if heartbeat is None or isinstance(data.get("heartbeat_at"), int | float):
        problems.append(
            f"heartbeat_at must be a timestamp or ISO string (got {_describe(data.get('heartbeat_at'))})"
        )

    ttl: Any = data.get("ttl_seconds", default_ttl)
    if isinstance(ttl, float) and math.isfinite(ttl) and ttl.is_integer():
        ttl = int(ttl)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
        problems.append(f"ttl_seconds must be a positive integer (got {_describe(ttl)})")
    else:
        ttl = min(ttl, MAX_TTL_SECONDS)

    companies: Any = data.get("authorized_companies_ids") or []
    if not isinstance(companies, list) or not all(isinstance(c, str) for c in companies):
        problems.append("authorized_companies_ids must be an array of strings")

    instance_id = data.get("instance_id", "")
    if not isinstance(instance_id, str):
        problems.append(f"instance_id must be a string (got {_describe(instance_id)})")

    threads = _chat_threads(data.get(CHAT_THREADS) or [], problems)

    if problems:
        raise MalformedEntry("; ".join(problems))
    assert heartbeat is not None
    heartbeat = min(heartbeat, datetime.now(UTC) + MAX_HEARTBEAT_AHEAD)
    return RegistryEntry(
        uid=uid,
        status=str(status),
        heartbeat_at=heartbeat,
        ttl_seconds=int(ttl),
        authorized_companies_ids=frozenset(companies),
        instance_id=str(instance_id),
        chat_threads=threads,
    )


def _chat_threads(value: Any, problems: list[str]) -> frozenset[ChatThread]:
    """`chat_threads`: [{space_code, thread_key, mode}] (optional; added to the §4 contract)."""
    if not isinstance(value, list):
        problems.append("chat_threads must be an array of {space_code, thread_key, mode}")
        return frozenset()
    threads = set()
    for n, item in enumerate(value):
        try:
            threads.add(ChatThread.from_fields(item))
        except InvalidThread as exc:
            if exc.bad_mode:
                problems.append(f"chat_threads[{n}].mode must be one of {', '.join(sorted(CHAT_MODES))}")
            else:
                problems.append(f"chat_threads[{n}] needs space_code, thread_key and mode as database keys")
    return frozenset(threads)


def listed_threads(data: Mapping[str, Any] | None) -> list[Any]:
    """The `chat_threads` of a document as they are written, none dropped (a read-modify-write
    must keep the entries it cannot read)."""
    return list((data or {}).get(CHAT_THREADS) or [])


def online_fields(
    heartbeat_at: object,
    ttl_seconds: int,
    instance_id: str,
    companies: Iterable[str] | None = None,
    threads: Iterable[ChatThread] | None = None,
) -> dict[str, Any]:
    """An online user's fields, merged into the document by presence. `heartbeat_at` is the
    writer's (Firestore's SERVER_TIMESTAMP); fields given as None are left as they are."""
    fields: dict[str, Any] = {
        "status": "online",
        "heartbeat_at": heartbeat_at,
        "ttl_seconds": ttl_seconds,
        "instance_id": instance_id,
    }
    if companies is not None:
        fields["authorized_companies_ids"] = list(companies)
    if threads is not None:
        fields[CHAT_THREADS] = [t.to_fields() for t in threads]
    return fields


def offline_fields() -> dict[str, Any]:
    return {"status": "offline"}


def _describe(value: Any) -> str:
    """The type of a bad value, never the value itself (it may be anything)."""
    return "nothing" if value is None else type(value).__name__


THREAD_WRITE_ATTEMPTS = 3  # a conditional write lost to another writer is tried again


class RegistryStore:
    def __init__(self, db: Any) -> None:
        self._db = db

    def _document(self, uid: str) -> Any:
        return self._db.collection(REGISTRY_COLLECTION).document(uid)

    async def write_online(
        self,
        uid: str,
        *,
        ttl_seconds: int,
        instance_id: str,
        companies: Iterable[str] | None = None,
        threads: Iterable[ChatThread] | None = None,
    ) -> Any:
        """Merges the online fields (a heartbeat) and returns the write's update time; fields
        given as None are left as they are. Raises what Firestore raises."""
        from google.cloud import firestore

        fields = online_fields(firestore.SERVER_TIMESTAMP, ttl_seconds, instance_id, companies, threads)
        result = await self._document(uid).set(fields, merge=True)
        return result.update_time

    async def write_offline(self, uid: str, *, unchanged_since: Any) -> None:
        """`status: offline`, on the condition that nobody wrote since `unchanged_since` (the
        update time of our own last write): another process's heartbeat keeps the user online.
        Raises what Firestore raises, a failed precondition included."""
        option = self._db.write_option(last_update_time=unchanged_since)
        await self._document(uid).update(offline_fields(), option=option)

    async def has_thread(self, uid: str, thread: ChatThread) -> bool:
        """Whether the entry lists the thread; False (logged) when it cannot be read."""
        try:
            snapshot = await self._document(uid).get()
        except Exception as exc:
            log.warning("chat thread not confirmed", extra={"uid": uid, "reason": type(exc).__name__})
            return False
        return thread.to_fields() in listed_threads(snapshot.to_dict())

    async def add_thread(self, uid: str, thread: ChatThread) -> bool:
        """True once the entry lists the thread; False (logged) when it could not be written."""
        return await self._change_threads(uid, thread, add=True)

    async def remove_thread(self, uid: str, thread: ChatThread) -> bool:
        """True once the entry no longer lists the thread; False (logged) otherwise."""
        return await self._change_threads(uid, thread, add=False)

    async def _change_threads(self, uid: str, thread: ChatThread, *, add: bool) -> bool:
        # Read, change, write on the condition that nobody wrote in between (and again if so):
        # the field may not exist yet, and other writers (the bridge) may change it too.
        fields = thread.to_fields()
        document = self._document(uid)
        reason = ""
        for _ in range(THREAD_WRITE_ATTEMPTS):
            try:
                snapshot = await document.get()
                if not snapshot.exists:
                    log.warning("chat thread not written: user not in the registry", extra={"uid": uid})
                    return False
                current = [t for t in listed_threads(snapshot.to_dict()) if t != fields]
                option = self._db.write_option(last_update_time=snapshot.update_time)
                await document.update({CHAT_THREADS: [*current, fields] if add else current}, option=option)
                return True
            except Exception as exc:  # a concurrent write, or Firestore unreachable: try again
                reason = type(exc).__name__
        log.warning("chat thread not written to the registry", extra={"uid": uid, "reason": reason})
        return False
