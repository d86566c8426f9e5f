"""The committed JSON Schemas are current, and events the service makes validate against them."""

from __future__ import annotations

from pathlib import Path

from listeners.envelope import Envelope
from listeners.events import EVENT_MODELS
from listeners.normalise.notifications import normalise_notification
from listeners.schemas import render, validate

DOCS = Path(__file__).resolve().parents[1] / "docs" / "schemas"


def test_committed_schemas_are_current() -> None:
    for event_type in EVENT_MODELS:
        path = DOCS / f"{event_type}.json"
        assert path.exists(), f"run: python -m listeners.schemas  ({path} missing)"
        assert path.read_text() == render(event_type), f"run: python -m listeners.schemas ({path} is stale)"


def test_events_validate() -> None:
    item = normalise_notification("d1", {"file_name": "x", "batch_id": "b"})
    for envelope in (
        Envelope.create(
            "notif.sync", "u", {"notifications": [item], "count": 1, "timestamp": "2025-01-01T00:00:00Z"}
        ),
        Envelope.create("notif.add", "u", dict(item)),
        Envelope.create("notif.update", "u", dict(item)),
        Envelope.create("notif.remove", "u", {"doc_id": "d1"}),
    ):
        validate(envelope.to_dict())
