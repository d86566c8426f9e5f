"""The Firestore documents the service and its consumers write, one store each: the registry
entry (`RegistryStore`: presence's heartbeats and offline marks, chat threads added and
removed) and a notification's read mark (`NotificationStore`). Their shape is
source.registry's; here is only how they are written.

`db` is a `google.cloud.firestore.AsyncClient`, or anything with its `collection`,
`document` and `write_option` (tests stand in for it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from listeners.source.registry import (
    CHAT_THREADS,
    REGISTRY_COLLECTION,
    ChatThread,
    listed_threads,
    offline_fields,
    online_fields,
)

log = logging.getLogger(__name__)

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


class NotificationStore:
    def __init__(self, db: Any) -> None:
        self._db = db

    async def mark_read(self, uid: str, doc_id: str) -> bool:
        """The user's own notification, marked read: True once written. An update, so a
        document that does not exist is not created (False, logged)."""
        document = self._db.collection(f"clients/{uid}/notifications").document(doc_id)
        try:
            await document.update({"read": True})
        except Exception as exc:
            log.warning(
                "notification not marked read",
                extra={"uid": uid, "doc_id": doc_id, "reason": type(exc).__name__},
            )
            return False
        return True
