"""The generic envelope every event travels in, on Redis and WebSocket (docs/events.md).

Beside the specification's `{type, uid, timestamp, payload}` each envelope carries:
- `v`: the version of the contract it follows (events.CONTRACT_VERSION), so that a consumer
  meeting a version it does not know can say so instead of misapplying the event.
- `event_id`: the identity of the change. A delta's id is derived from its source (document
  id and version), so the same change published by two instances during a handover has the
  same id; a sync's id is unique.
- `epoch` and `seq`: the position of the event in its stream (streams.order): `seq` rises by
  one per event of one user's stream; `epoch` names one run of that stream on one instance.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from listeners_bridge.events import CONTRACT_VERSION
from listeners_bridge.inputs import encode_json
from listeners_bridge.timestamps import format_utc


def identity_id(type: str, uid: str, identity: str) -> str:
    """A stable event id for one change: the same on every instance that sees it."""
    return hashlib.sha256(f"{type}\x00{uid}\x00{identity}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Envelope:
    type: str
    uid: str
    payload: Mapping[str, Any]
    timestamp: str
    event_id: str
    epoch: str = ""  # "" for an event outside any ordered stream (tests, benches)
    seq: int = 0

    @classmethod
    def create(
        cls,
        type: str,
        uid: str,
        payload: Mapping[str, Any],
        *,
        identity: str | None = None,
        epoch: str = "",
        seq: int = 0,
    ) -> Envelope:
        # Without an identity (a sync) the id is random: two syncs are never the same event.
        event_id = identity_id(type, uid, identity) if identity is not None else uuid.uuid4().hex
        return cls(
            type=type,
            uid=uid,
            payload=payload,
            timestamp=format_utc(datetime.now(UTC)),
            event_id=event_id,
            epoch=epoch,
            seq=seq,
        )

    def to_dict(self) -> dict[str, Any]:
        event: dict[str, Any] = {
            "v": CONTRACT_VERSION,
            "type": self.type,
            "uid": self.uid,
            "timestamp": self.timestamp,
            "event_id": self.event_id,
        }
        if self.epoch:
            event["epoch"] = self.epoch
            event["seq"] = self.seq
        event["payload"] = self.payload
        return event

    def to_json(self) -> bytes:
        # Never raises: a lone surrogate or a NaN in a document must not stop the publisher.
        return encode_json(self.to_dict())
