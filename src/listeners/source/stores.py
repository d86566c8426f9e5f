"""A notification's read mark, as the service writes it (`NotificationStore`). The registry
entry's writes are listeners_bridge.registry's `RegistryStore`, shared with the bridge.

`db` is a `google.cloud.firestore.AsyncClient`, or anything with its `collection` and
`document` (tests stand in for it).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


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
