"""The committed JSON Schemas are current, and events the service makes validate against them."""

from __future__ import annotations

from pathlib import Path

from listeners.normalise.messages import normalise_message
from listeners.normalise.notifications import normalise_notification
from listeners.schemas import render, validate
from listeners.streams.order import StreamOrder
from listeners_bridge.events import EVENT_MODELS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "schemas"


def test_committed_schemas_are_current() -> None:
    for event_type in EVENT_MODELS:
        path = DOCS / f"{event_type}.json"
        assert path.exists(), f"run: python -m listeners.schemas  ({path} missing)"
        assert path.read_text() == render(event_type), f"run: python -m listeners.schemas ({path} is stale)"


def test_events_validate() -> None:
    order = StreamOrder("test")
    item = normalise_notification("d1", {"file_name": "x", "batch_id": "b"})
    message = normalise_message(
        "m1", {"file_name": "x", "sender_id": "s", "expires_at": "2025-01-01 00:00:00"}
    )
    for envelope in (
        order.stamp(
            "notif.sync", "u", {"notifications": [item], "count": 1, "timestamp": "2025-01-01T00:00:00Z"}
        ),
        order.stamp("notif.add", "u", dict(item)),
        order.stamp("notif.update", "u", dict(item)),
        order.stamp("notif.remove", "u", {"doc_id": "d1"}),
        order.stamp(
            "msg.sync",
            "u",
            {
                "messages": [message],
                "count": 1,
                "timestamp": "",
                "new_message": message,
                "has_new_messages": True,
            },
        ),
        order.stamp("msg.add", "u", message),
        order.stamp("msg.remove", "u", {"doc_id": "m1"}),
        order.stamp(
            "chat.message", "u", {"space_code": "s", "thread_key": "t", "raw_messages": [{"id": "-a"}]}
        ),
        order.stamp("chat.sync", "u", {"space_code": "s", "thread_key": "t", "raw_messages": []}),
    ):
        validate(envelope.to_dict())
