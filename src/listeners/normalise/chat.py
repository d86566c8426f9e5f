"""Chat messages, `{space_code}/{mode}/{thread_key}/messages/{pushId}`, as the old client saw them.

A message is shown when it is unread, its type (`message_type`, or `type`) is one of the
display types, and it is not a card response (an `action` field), SPEEDDIAL excepted: its
`action` is what it shows. Messages are ordered by time, then by push id (push ids sort
in creation order). Raw fields are kept, made JSON-safe, with the key as `id`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from listeners.normalise.values import to_json_value
from listeners_bridge.timestamps import parse_timestamp

DISPLAY_TYPES = frozenset(
    {
        "MESSAGE", "MESSAGE_PINNOKIO", "CARD", "CARD_CLICKED_PINNOKIO", "TOOL", "CMMD",
        "FOLLOW_MESSAGE", "WAITING_MESSAGE", "WORKFLOW", "CLOSE_INTERMEDIATION", "SPEEDDIAL",
    }
)  # fmt: skip
_OLDEST = datetime.min.replace(tzinfo=UTC)


def message_type(node: Mapping[str, Any]) -> str:
    value = node.get("message_type", node.get("type"))
    return value if isinstance(value, str) else ""


def displayable(node: Any) -> bool:
    if not isinstance(node, Mapping) or node.get("read") is True:
        return False
    kind = message_type(node)
    return kind in DISPLAY_TYPES and ("action" not in node or kind == "SPEEDDIAL")


def raw_message(push_id: str, node: Mapping[str, Any]) -> dict[str, Any]:
    fields = to_json_value(node)
    return {**fields, "id": push_id}


def in_order(messages: Mapping[str, Any]) -> list[str]:
    """Push ids of these message nodes, oldest first."""

    def key(push_id: str) -> tuple[datetime, str]:
        node = messages[push_id]
        moment = parse_timestamp(node.get("timestamp")) if isinstance(node, Mapping) else None
        return (moment or _OLDEST, push_id)

    return sorted(messages, key=key)
