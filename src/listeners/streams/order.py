"""The order of one user's stream: `epoch` and `seq` on every envelope it publishes.

`seq` rises by exactly one per envelope of the stream (syncs included), so a consumer that
sees seq n+2 after n knows it missed one. `epoch` names one run of the stream on one
instance: `{instance_id}:{n}`, n counting the stream runs this process started. A stream
gets a new epoch when it starts, restarts (a new watch, a reconnect's full read) and when
its instance takes the user back during a handover; each new epoch begins with a sync.

Two instances serve a user for a moment during a handover: each publishes under its own
epoch, never the other's, so their sequences never interleave into one that looks whole.
A consumer follows the epoch of its last sync and treats an unknown epoch without a sync as
a gap (docs/events.md, "Order and gaps").
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from listeners.envelope import Envelope

_runs = itertools.count(1)  # per process; instance ids are unique per process (issue 12)


class StreamOrder:
    def __init__(self, instance_id: str = "local") -> None:
        self._instance_id = instance_id
        self.epoch = ""
        self.seq = 0
        self.new_epoch()

    def new_epoch(self) -> None:
        self.epoch = f"{self._instance_id}:{next(_runs)}"
        self.seq = 0

    def stamp(self, type: str, uid: str, payload: Mapping[str, Any], identity: str | None = None) -> Envelope:
        """The next envelope of this stream. Its seq is taken even if the publisher drops it:
        the hole is how consumers learn that they missed something."""
        self.seq += 1
        return Envelope.create(type, uid, payload, identity=identity, epoch=self.epoch, seq=self.seq)
