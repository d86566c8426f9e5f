"""Resync requests from consumers, on the Redis control channel (exact SUBSCRIBE).

Pub/Sub keeps nothing: a consumer that (re)subscribes has missed whatever was published
while it was away, so it asks the service for the current state of its user, and the
service answers on the user's own channel with fresh syncs.

Requests are signed with HMAC-SHA256 under the control token that the service and its
consumers share (`control_token` in the Redis secret, or LISTENERS_CONTROL_TOKEN), and
carry a time and a nonce: a request more than `MAX_SKEW` seconds off is refused, and a
signed request is served once: its signature is remembered until its time leaves the
window, so a replay inside the window is refused too (`SeenRequests`, bounded).

Anything that can publish on the channel can send anything, so each message is read as
outside input (inputs.parse_json: bounded size and depth, UTF-8, no lone surrogates) and
refused on its own, with one log line that gives the reason and never the message.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import hmac
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from listeners.config import RedisSettings
from listeners_bridge.broker import Broker
from listeners_bridge.inputs import InvalidInput, parse_json, valid_key, valid_uid
from listeners_bridge.registry import ChatThread
from listeners_bridge.resync import request_signature

if TYPE_CHECKING:  # the bridge imports this module where prometheus_client is not installed
    from listeners.metrics import Metrics

log = logging.getLogger(__name__)

MAX_SKEW = 60.0
MAX_REQUEST_BYTES = 4096
MAX_DEPTH = 4  # a request nests 3 deep: {threads: [[space_code, thread_key, mode]]}
MAX_NONCE_LENGTH = 64
# Requests remembered at once (each for about a minute). Consumers send one per (re)subscribe
# and one every 5 s until a sync arrives; Direct mode sends at most 400 a second per worker
# (deliver.batch), coalesced per user. 150,000 holds the storms of a few instances at once,
# and costs about 32 MB when full (tracemalloc: ~210 bytes an entry, 16-byte keys).
MAX_SEEN = 150_000


@dataclass(frozen=True, slots=True)
class ResyncRequest:
    uid: str
    threads: tuple[ChatThread, ...] = ()


class InvalidRequest(ValueError):
    pass


class SeenRequests:
    """Signatures of the requests served, each kept until its `ts` leaves the window.

    Keyed by the signature: it covers every field (nonce included), so a replay has the same
    one however its JSON is spelt. Bounded: when full of live entries a new request is refused
    rather than an entry forgotten early (which would let that one be replayed); consumers ask
    again after 5 s, by which time entries have expired.
    """

    def __init__(self, capacity: int = MAX_SEEN) -> None:
        self._capacity = capacity
        self._expiry: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []  # (expires_at, key), soonest first

    def __len__(self) -> int:
        return len(self._expiry)

    def first_use(self, signature: str, expires_at: float, now: float) -> None:
        """Record a request; raise `InvalidRequest` if it was already served, or no room."""
        while self._heap and self._heap[0][0] < now:
            _, old = heapq.heappop(self._heap)
            self._expiry.pop(old, None)
        # 128 bits of the HMAC are as unique as the 256, in a quarter of a hex string's memory.
        key = hashlib.blake2b(signature.encode(), digest_size=16).digest()
        if key in self._expiry:
            raise InvalidRequest("replayed request")
        if len(self._expiry) >= self._capacity:
            raise InvalidRequest("too many requests to remember; try again later")
        self._expiry[key] = expires_at
        heapq.heappush(self._heap, (expires_at, key))


def _seconds(value: object) -> float | None:
    """A finite time in seconds, or None. NaN would pass an `abs(...) > MAX_SKEW` test and
    never expire; an integer of a thousand digits overflows a float; True is an int."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


def _valid_thread(thread: object) -> bool:
    # Valid keys, as in channel names; a mode that is not a chat mode matches no open thread.
    return isinstance(thread, list) and len(thread) == 3 and all(valid_key(part) for part in thread)


def verify(
    token: str, raw: bytes | str, now: float | None = None, *, seen: SeenRequests | None = None
) -> ResyncRequest:
    """The request in `raw`, or `InvalidRequest` saying why not (never echoing the input).
    With `seen`, a request is accepted once: it is recorded there after every other check."""
    now = time.time() if now is None else now
    if len(raw) > MAX_REQUEST_BYTES:
        raise InvalidRequest(f"request larger than {MAX_REQUEST_BYTES} bytes")
    try:
        message = parse_json(raw, max_bytes=MAX_REQUEST_BYTES, max_depth=MAX_DEPTH)
    except InvalidInput as exc:
        raise InvalidRequest(str(exc)) from None
    if not isinstance(message, dict):
        raise InvalidRequest("not a JSON object")
    signature = message.pop("sig", None)
    # Bytes, not str: compare_digest raises TypeError on a str that is not ASCII.
    if not isinstance(signature, str) or not hmac.compare_digest(
        signature.encode(), request_signature(token, message).encode()
    ):
        raise InvalidRequest("bad signature")
    ts, uid, threads, nonce = (
        message.get("ts"),
        message.get("uid"),
        message.get("threads", []),
        message.get("nonce"),
    )
    if message.get("type") != "resync" or not valid_uid(uid):
        raise InvalidRequest("not a resync request for a valid uid")
    assert isinstance(uid, str)
    ts = _seconds(ts)
    if ts is None or abs(now - ts) > MAX_SKEW:
        raise InvalidRequest("stale or future request")
    if not isinstance(nonce, str) or not 0 < len(nonce) <= MAX_NONCE_LENGTH:
        raise InvalidRequest("no nonce")
    if not isinstance(threads, list) or not all(_valid_thread(t) for t in threads):
        raise InvalidRequest("threads must be [space_code, thread_key, mode] triples")
    if seen is not None:
        seen.first_use(signature, ts + MAX_SKEW, now)  # past that, the time check refuses it
    return ResyncRequest(uid, tuple(ChatThread(*t) for t in threads))


class ControlListener:
    """Subscribes to the control channel for as long as the service runs, through Redis outages
    (the broker's subscriber reconnects, and notices a dead connection)."""

    def __init__(
        self,
        broker: Broker,
        settings: RedisSettings,
        on_resync: Callable[[ResyncRequest], None],
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._on_resync = on_resync
        self._metrics = metrics
        self._seen = SeenRequests()
        self._subscriber = broker.subscriber("control", self._message)
        self._subscriber.on_connect(lambda reconnected: self.subscribed.set())
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        if self._settings.control_token is None:
            log.warning("no control token (LISTENERS_CONTROL_TOKEN): consumer resync requests are disabled")
            await asyncio.Event().wait()  # nothing to do, but a supervised task does not end
        await self._subscriber.subscribe(self._settings.control_channel)
        try:
            await self._subscriber.run()
        finally:
            self.subscribed.clear()

    def _message(self, channel: str, data: bytes) -> None:
        token = self._settings.control_token
        if token is not None:
            self._handle(token.reveal(), data)

    def _handle(self, token: str, raw: object) -> None:
        """One message: served, or refused with its reason. Never raises, so no message can
        end the listener."""
        try:
            if not isinstance(raw, bytes | str):
                raise InvalidRequest("not a text message")
            request = verify(token, raw, seen=self._seen)
        except InvalidRequest as exc:
            self._refused(str(exc))
            return
        except Exception as exc:  # a case the checks above missed: refuse it, keep listening
            self._refused(f"unexpected {type(exc).__name__}")
            return
        try:
            self._on_resync(request)
        except Exception as exc:  # a bug in serving one request must not stop the others
            log.error("control request failed", extra={"uid": request.uid, "reason": type(exc).__name__})
            self._count("failed")
        else:
            self._count("served")

    def _refused(self, reason: str) -> None:
        log.warning("control request refused", extra={"reason": reason})
        self._count("refused")
        if self._metrics is not None:
            self._metrics.rejected_inputs.labels(source="control").inc()

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.control_requests.labels(outcome).inc()
