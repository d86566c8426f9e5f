"""Tail positions: after a stream's last event, one small event that says where it ended.

Pub/Sub gives no acknowledgement, and a consumer that missed a stream's last event sees no
gap, because nothing comes after it. So once a stream has been quiet for `quiet` seconds
after its last event, the publisher sends `{family}.position` on the same channel, carrying
that event's `epoch` and `seq`. A consumer that holds less asks for a resync
(docs/events.md, "Tail positions").

One position per burst, none for an idle stream. Under load the positions are paced by a
budget earned by the events published (`ratio` per event, at least `floor` per second), so
they never add more than `ratio` to the message rate; past the budget a position waits, oldest
first, and a stream that publishes again meanwhile needs only its newest.

A stream is its channel and its family: `user:{uid}` carries `notif` and `msg`, and each
chat channel carries one thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from listeners.envelope import Envelope, identity_id
from listeners_bridge.events import POSITION_TYPES, position_type
from listeners_bridge.timestamps import format_utc

QUIET_SECONDS = 2.0
RATIO = 0.5  # positions per event published, at most, under load
FLOOR_PER_SECOND = 2.0  # and at least this many per second, so a quiet instance never waits
BURST = 1_000.0  # positions that may go at once after a calm spell
MAX_STREAMS = 200_000  # streams remembered while they wait; past it the oldest is forgotten
FAMILIES = ("notif", "msg", "chat")  # what a type's prefix can be
WINDOW_SECONDS = 1.0  # the budget is the larger of ratio and floor over each such window


@dataclass(slots=True)
class _Tail:
    channel: str
    last: Envelope
    at: float  # loop time of the last event


def position_of(last: Envelope) -> Envelope:
    """The position event that says a stream ended at `last`."""
    kind = position_type(last.type)
    payload: dict[str, Any] = {}
    if kind == "chat.position":  # the thread names the stream, as on every chat event
        payload = {k: last.payload.get(k, "") for k in ("space_code", "thread_key")}
    return Envelope(
        type=kind,
        uid=last.uid,
        payload=payload,
        timestamp=format_utc(datetime.now(UTC)),
        event_id=identity_id(kind, last.uid, f"{last.epoch}:{last.seq}"),
        epoch=last.epoch,
        seq=last.seq,
    )


class TailPositions:
    def __init__(
        self,
        *,
        quiet: float = QUIET_SECONDS,
        ratio: float = RATIO,
        floor: float = FLOOR_PER_SECOND,
        burst: float = BURST,
        max_streams: int = MAX_STREAMS,
    ) -> None:
        self._quiet = quiet
        self._ratio = ratio
        self._floor = floor
        self._burst = burst
        self._max_streams = max_streams
        self._tails: OrderedDict[tuple[str, str], _Tail] = OrderedDict()  # oldest event first
        self._tokens = burst
        self._pending = 0.0  # budget earned by events since the last refill
        self._earned = 0.0  # and in the current window
        self._granted = 0.0  # tokens given in the current window
        self._window: float | None = None  # loop time the current window began
        self._refilled = 0.0  # loop time of the last refill
        self.forgotten = 0  # streams dropped past MAX_STREAMS (their consumers still resync on gaps)

    def __len__(self) -> int:
        return len(self._tails)

    def saw(self, channel: str, envelope: Envelope, now: float) -> None:
        """A stream's event was handed to the publisher (published or not: its seq is taken)."""
        if not envelope.epoch or envelope.type in POSITION_TYPES:
            return
        key = (channel, envelope.type.partition(".")[0])
        tail = self._tails.get(key)
        if tail is None:
            self._tails[key] = _Tail(channel, envelope, now)
            if len(self._tails) > self._max_streams:
                self._tails.popitem(last=False)
                self.forgotten += 1
            return
        tail.last, tail.at = envelope, now
        self._tails.move_to_end(key)

    def forget(self, channels: Iterable[str]) -> None:
        """These channels' streams left this instance: no position for them from here."""
        for channel in channels:
            for family in FAMILIES:
                self._tails.pop((channel, family), None)

    def published(self, events: int) -> None:
        """`events` events (positions excluded) were confirmed published: they earn budget."""
        self._pending += events * self._ratio

    def due_at(self) -> float | None:
        """When the oldest waiting stream will have been quiet long enough (loop time)."""
        for tail in self._tails.values():
            return tail.at + self._quiet
        return None

    def take_due(self, now: float) -> list[tuple[str, Envelope]]:
        """(channel, position) for every stream quiet since `quiet` seconds, within the budget."""
        self._refill(now)
        due: list[tuple[str, Envelope]] = []
        while self._tails and self._tokens >= 1.0:
            key, tail = next(iter(self._tails.items()))
            if tail.at > now - self._quiet:
                break
            del self._tails[key]
            self._tokens -= 1.0
            due.append((tail.channel, position_of(tail.last)))
        return due

    def _refill(self, now: float) -> None:
        # Over each window, the larger of the two budgets, never their sum: taking the larger
        # at every wake would add the floor on the wakes without events (+63 % at 10/s).
        if self._window is None:
            self._window = now
        elif now - self._window >= WINDOW_SECONDS:  # the new one starts at the last refill
            self._window, self._granted, self._earned = self._refilled, 0.0, 0.0
        self._refilled = now
        self._earned += self._pending
        self._pending = 0.0
        target = max(self._floor * (now - self._window), self._earned)
        if target > self._granted:
            self._tokens = min(self._burst, self._tokens + target - self._granted)
            self._granted = target
