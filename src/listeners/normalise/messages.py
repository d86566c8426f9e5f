"""Realtime Database `clients/{uid}/direct_message_notif/{pushId}` nodes to UI items.

The item is the notification item without `read` and `info_message` (reading a direct
message deletes its node), plus the fields only messages have. A node's own `message`
text, when it has one, is kept instead of the built `"{file_name} - {status}"`.
"""

from __future__ import annotations

from typing import Any

from listeners.normalise.notifications import normalise_notification
from listeners.normalise.values import text
from listeners_bridge.timestamps import to_utc_iso

_EXTRA_TEXT = ("sender_id", "chat_mode", "thread_key")


def normalise_message(push_id: str, node: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = dict(normalise_notification(push_id, node))
    del item["read"], item["info_message"]
    own = text(node.get("message"), "")
    if own:
        item["message"] = own
    for name in _EXTRA_TEXT:
        value = text(node.get(name), "")
        if value:
            item[name] = value
    if "expires_at" in node:
        item["expires_at"] = to_utc_iso(node["expires_at"])
    return item
