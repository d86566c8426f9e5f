"""The generic envelope every event travels in, on Redis and (later) WebSocket."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from listeners.inputs import encode_json
from listeners.normalise.timestamps import format_utc


@dataclass(frozen=True, slots=True)
class Envelope:
    type: str
    uid: str
    payload: Mapping[str, Any]
    timestamp: str
    event_id: str

    @classmethod
    def create(cls, type: str, uid: str, payload: Mapping[str, Any]) -> Envelope:
        # event_id is unique per event so consumers can de-duplicate re-deliveries;
        # doc_id inside the payload identifies the document (specification §5).
        return cls(
            type=type,
            uid=uid,
            payload=payload,
            timestamp=format_utc(datetime.now(UTC)),
            event_id=uuid.uuid4().hex,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "uid": self.uid,
            "timestamp": self.timestamp,
            "event_id": self.event_id,
            "payload": self.payload,
        }

    def to_json(self) -> bytes:
        # Never raises: a lone surrogate or a NaN in a document must not stop the publisher.
        return encode_json(self.to_dict())
