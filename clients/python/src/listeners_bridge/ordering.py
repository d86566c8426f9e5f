"""Which events a consumer applies: the order rules of docs/events.md ("Order and gaps").

Pure logic, no I/O, shared by the bridge and the property test of convergence. Per stream
(`notif`, `msg`, each chat thread) a consumer follows one epoch, the one of its last sync:

- a sync of another epoch, or of this epoch and a higher seq, is applied: it is the state;
- a sync that is not newer than the state it has (seq at most its own) is dropped;
- a delta of its epoch with seq = its seq + 1 is applied; at most its seq, dropped (a
  duplicate, or older than the last sync); higher, a gap: dropped, and the stream waits for a
  sync (every delta until then is dropped) while the consumer asks for a resync;
- a delta of another epoch is the same change seen by another instance (during a handover,
  both publish it, with the same event id) when its id was applied already: dropped. Otherwise
  the consumer may have missed the other instance's sync: a gap (it asks for a resync, and
  keeps applying its own epoch meanwhile);
- before a stream's first sync, its deltas are dropped and a sync is asked for;
- a tail position (`*.position`, sent once a stream is quiet after its last event) is never
  applied: of its epoch and at most its seq, dropped; ahead of it, a gap (the stream's last
  events were missed); of another epoch, a gap as for a delta of another epoch. Before the
  first sync it is dropped (a sync is being asked for already).

Events without `epoch` and `seq` come from a service older than issue 14: applied unless
their `event_id` was seen, as consumers did before.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from listeners_bridge.events import POSITION_TYPES, SYNC_TYPES, stream_of


class Verdict(enum.Enum):
    APPLY = "apply"
    DROP = "drop"
    GAP = "gap"  # dropped, and the consumer must ask for a resync


class RecentIds:
    """The last `size` ids, to recognise re-deliveries without growing forever."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> bool:
        """False when it was there already."""
        if event_id in self._ids:
            self._ids.move_to_end(event_id)
            return False
        self._ids[event_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)
        return True


@dataclass
class _Position:
    epoch: str
    seq: int
    broken: bool = False  # a gap was seen: nothing but a sync is applied until one comes


class Ordering:
    """One consumer's position in each stream it reads."""

    def __init__(self, recent_ids: int = 4096) -> None:
        self._positions: dict[str, _Position] = {}
        self._applied = RecentIds(recent_ids)
        self._waiting: set[str] = set()  # streams with a gap, or deltas before their first sync

    @property
    def waiting(self) -> bool:
        """True while some stream needs a sync to go on."""
        return bool(self._waiting)

    def position(self, stream: str) -> tuple[str, int] | None:
        found = self._positions.get(stream)
        return (found.epoch, found.seq) if found is not None else None

    def admit(self, event: Mapping[str, Any]) -> Verdict:
        epoch, seq = event.get("epoch"), event.get("seq")
        event_id = str(event.get("event_id", ""))
        if not isinstance(epoch, str) or not epoch or not isinstance(seq, int) or isinstance(seq, bool):
            return Verdict.APPLY if self._applied.add(event_id) else Verdict.DROP
        stream = stream_of(event)
        position = self._positions.get(stream)
        if event.get("type") in SYNC_TYPES:
            if position is not None and position.epoch == epoch and seq <= position.seq:
                return Verdict.DROP  # not newer than the state applied
            self._positions[stream] = _Position(epoch, seq)
            self._waiting.discard(stream)
            return Verdict.APPLY
        if event.get("type") in POSITION_TYPES:
            return self._tail(stream, position, epoch, seq)
        if position is None:
            self._waiting.add(stream)
            return Verdict.GAP
        if position.epoch != epoch:
            if event_id in self._applied:
                return Verdict.DROP  # the same change, applied from the epoch followed
            return Verdict.GAP
        if seq <= position.seq or position.broken:
            return Verdict.DROP
        if seq != position.seq + 1:
            position.broken = True
            self._waiting.add(stream)
            return Verdict.GAP
        position.seq = seq
        self._applied.add(event_id)
        return Verdict.APPLY

    def _tail(self, stream: str, position: _Position | None, epoch: str, seq: int) -> Verdict:
        if position is None or position.broken:
            return Verdict.DROP  # waiting for a sync already
        if position.epoch != epoch:
            self._waiting.add(stream)
            return Verdict.GAP
        if seq <= position.seq:
            return Verdict.DROP
        position.broken = True
        self._waiting.add(stream)
        return Verdict.GAP


class Follower:
    """One consumer's side of convergence: the order rules, and whether it must ask the
    service for a resync (never synced, a loss, or a gap not yet healed by a sync). The
    bridge asks again every few seconds while `needs_resync` holds."""

    def __init__(self, recent_ids: int = 4096) -> None:
        self.ordering = Ordering(recent_ids)
        self.synced = False  # a sync was applied since the last loss

    @property
    def needs_resync(self) -> bool:
        return not self.synced or self.ordering.waiting

    def lost(self) -> None:
        """Events were missed (a reconnection, an overflow): the next sync brings it back."""
        self.synced = False

    def admit(self, event: Mapping[str, Any]) -> bool:
        """Whether to apply this event; a gap makes the consumer need a resync."""
        verdict = self.ordering.admit(event)
        if verdict is Verdict.GAP:
            self.synced = False
            return False
        if verdict is Verdict.DROP:
            return False
        if event.get("type") in SYNC_TYPES:
            self.synced = True
        return True
