"""The hub: this instance's WebSocket connections, fed from Redis through one connection.

Every socket subscribes to its user's channels; the hub holds one Pub/Sub connection for
the whole instance (a `Subscriber` of the broker, which notices a dead connection and makes
it again), subscribes each channel once (reference-counted), and hands every
message to the sinks of that channel. Delivery goes through Redis, so a socket can land
on any instance, whichever instance serves its user. When Redis comes back after a loss
the hub subscribes everything again and tells its sockets, which ask for a resync. Until a
sync arrives on a socket's channel, the hub tells it again every `RESYNC_RETRY_SECONDS`: the
request, or its answer, may have gone while the instance that serves the user was itself
reconnecting (its control listener, or its own view of Redis), and Pub/Sub keeps nothing.

Whatever arrives on a channel is outside input: each message is read once, and only an
envelope `{type, uid, event_id, payload, …}` of the channel's own user is handed on, as the
text it came in (never re-serialised per socket). Anything else is dropped, logged in one
line without its content, and counted in `listeners_rejected_inputs{source="hub"}`: no
single message, and no single channel name, can stop the hub.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from listeners.metrics import Metrics
from listeners_bridge.broker import Broker
from listeners_bridge.inputs import InvalidInput, parse_json

log = logging.getLogger(__name__)

Sink = Callable[[str], None]  # called on the loop with each message's text; must not block

DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# Envelopes nest 3 deep around chat messages whose own nesting is cut at 32 (inputs.json_safe).
MAX_DEPTH = 64
MAX_CHANNEL_BYTES = 1024  # `chat:{uid}:{space}:{thread}` of valid keys stays far below
RESYNC_RETRY_SECONDS = 5.0  # as the bridge and the browser client ask again


class Hub:
    def __init__(
        self,
        broker: Broker,
        instance_id: str,
        metrics: Metrics,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        resync_retry_seconds: float = RESYNC_RETRY_SECONDS,
    ) -> None:
        self._metrics = metrics
        self._max_bytes = max_message_bytes
        self._resync_retry = resync_retry_seconds
        self._sinks: dict[str, set[Sink]] = {}
        self._owners: dict[str, str] = {}  # channel -> the uid whose envelopes it may carry
        self._on_reconnect: dict[str, set[Callable[[], None]]] = {}  # by the channel a sync answers
        self._unsynced: dict[str, float] = {}  # channel -> when its resync was last asked for
        self._subscriber = broker.subscriber("hub", self._on_message)
        self._subscriber.on_connect(self._connected)
        self._home = f"listeners:hub:{instance_id}"  # keeps the connection open with no socket
        self.parsed = 0  # messages read (decoded and parsed): one per message, whatever the sockets

    @property
    def connected(self) -> bool:
        return self._subscriber.connected

    @property
    def channels(self) -> int:
        return len(self._sinks)

    @property
    def unsynced(self) -> int:
        """Channels whose sockets asked for a resync after a reconnection and have no sync yet."""
        return len(self._unsynced)

    def on_reconnect(self, channel: str, callback: Callable[[], None]) -> Callable[[], None]:
        """`callback` asks for a resync of `channel`'s user: called after every reconnection,
        and again every `resync_retry_seconds` until a sync arrives on `channel`."""
        self._on_reconnect.setdefault(channel, set()).add(callback)

        def forget() -> None:
            callbacks = self._on_reconnect.get(channel, set())
            callbacks.discard(callback)
            if not callbacks:
                self._on_reconnect.pop(channel, None)
                self._unsynced.pop(channel, None)

        return forget

    def _connected(self, reconnected: bool) -> None:
        if reconnected:  # sockets missed what was published meanwhile: they ask for a resync
            now = asyncio.get_running_loop().time()
            for channel in list(self._on_reconnect):
                self._unsynced[channel] = now
                self._ask(channel)

    def _ask(self, channel: str) -> None:
        for callback in list(self._on_reconnect.get(channel, ())):
            try:
                callback()
            except Exception as exc:  # one socket's trouble is not the others'
                log.warning("hub resync request failed", extra={"reason": type(exc).__name__})

    async def _ask_again(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._resync_retry / 2)
            if not self.connected:
                continue  # the next connection asks anyway
            now = loop.time()
            for channel, asked in list(self._unsynced.items()):
                if now - asked >= self._resync_retry:
                    self._unsynced[channel] = now
                    self._ask(channel)

    async def subscribe(self, channel: str, uid: str, sink: Sink) -> bool:
        """Hands the channel's envelopes of `uid` to `sink`. False, and nothing subscribed, for a
        name Redis cannot carry or a channel already held for another uid. The subscription
        itself may still be in flight: `confirmed` says when Redis has it."""
        if not _encodable(channel) or self._owners.get(channel, uid) != uid:
            self._reject("hub channel refused", "not a channel name Redis can carry, or another uid's", uid)
            return False
        sinks = self._sinks.setdefault(channel, set())
        first = not sinks
        sinks.add(sink)
        self._owners[channel] = uid
        if first:
            await self._subscriber.subscribe(channel)
        return True

    async def unsubscribe(self, channel: str, sink: Sink) -> None:
        sinks = self._sinks.get(channel)
        if sinks is None:
            return
        sinks.discard(sink)
        if not sinks:
            del self._sinks[channel]
            del self._owners[channel]
            await self._subscriber.unsubscribe(channel)

    def is_confirmed(self, channel: str) -> bool:
        return self._subscriber.is_confirmed(channel)

    async def confirmed(self, channel: str, timeout: float) -> bool:
        """Whether Redis confirms the channel's subscription within `timeout`; False at once
        while the hub has no Redis (a subscription then would only be a promise)."""
        return await self._subscriber.confirmed(channel, timeout)

    async def run(self) -> None:
        await self._subscriber.subscribe(self._home)
        again = asyncio.create_task(self._ask_again(), name="hub-resyncs")
        try:
            await self._subscriber.run()
        finally:
            again.cancel()
            await asyncio.gather(again, return_exceptions=True)

    def _on_message(self, channel: str, data: bytes) -> None:
        sinks = self._sinks.get(channel)
        if not sinks:
            return  # e.g. a message that was in flight when its last socket left
        envelope = self._envelope(channel, data)
        if envelope is None:
            return
        text, kind = envelope
        if channel in self._unsynced and kind.endswith(".sync"):
            del self._unsynced[channel]  # the state again: no more asking
        for sink in list(sinks):
            try:
                sink(text)
            except Exception as exc:  # one socket's trouble is not the others'
                log.warning("hub sink failed", extra={"reason": type(exc).__name__})

    def _envelope(self, channel: str, data: object) -> tuple[str, str] | None:
        """The message's text and type if it is an envelope for the channel's user, else None
        (logged and counted). Parsed once here, for every socket of the channel."""
        owner = self._owners.get(channel, "")
        self.parsed += 1
        try:
            if not isinstance(data, bytes):
                raise InvalidInput("not bytes")
            if len(data) > self._max_bytes:
                raise InvalidInput(f"larger than {self._max_bytes} bytes")
            # From bytes: UTF-8 checked by the decoder, which also rules out raw surrogates.
            value = parse_json(data, max_bytes=self._max_bytes, max_depth=MAX_DEPTH)
            problem = _envelope_problem(value, owner)
            if problem:
                raise InvalidInput(problem)
        except InvalidInput as exc:
            self._reject("hub message dropped", str(exc), owner)
            return None
        return data.decode("utf-8"), value["type"]  # valid: parse_json decoded it

    def _reject(self, what: str, reason: str, uid: str) -> None:
        self._metrics.rejected_inputs.labels(source="hub").inc()
        log.warning(what, extra={"uid": uid, "reason": reason})  # never the message itself


def _envelope_problem(value: Any, owner: str) -> str:
    """What makes `value` no envelope of `owner`'s, or "" when it is one."""
    if not isinstance(value, dict):
        return "not a JSON object"
    for key in ("type", "event_id"):
        if not isinstance(value.get(key), str) or not value[key]:
            return f"no {key}"
    if not isinstance(value.get("payload"), dict):
        return "no payload object"
    if value.get("uid") != owner:
        return "not the channel's user"
    return ""


def _encodable(channel: str) -> bool:
    try:
        return 0 < len(channel.encode("utf-8")) <= MAX_CHANNEL_BYTES
    except UnicodeEncodeError:  # a lone surrogate: Redis's encoder would raise on every resubscribe
        return False
