"""The hub: this instance's WebSocket connections, fed from Redis through one connection.

Every socket subscribes to its user's channels; the hub holds one Pub/Sub connection for
the whole instance, subscribes each channel once (reference-counted), and hands every
message to the sinks of that channel. Delivery goes through Redis, so a socket can land
on any instance, whichever instance serves its user. When Redis comes back after a loss
the hub subscribes everything again and tells its sockets, which ask for a resync.

Whatever arrives on a channel is outside input: each message is read once, and only an
envelope `{type, uid, event_id, payload, …}` of the channel's own user is handed on, as the
text it came in (never re-serialised per socket). Anything else is dropped, logged in one
line without its content, and counted in `listeners_rejected_inputs{source="hub"}`: no
single message, and no single channel name, can stop the hub.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from redis.exceptions import RedisError

from listeners.backoff import Backoff, reraise_if_cancelled
from listeners.config import RedisSettings
from listeners.inputs import InvalidInput, parse_json
from listeners.metrics import Metrics
from listeners.publish.redis import close_quietly, redis_client

log = logging.getLogger(__name__)

Sink = Callable[[str], None]  # called on the loop with each message's text; must not block

DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# Envelopes nest 3 deep around chat messages whose own nesting is cut at 32 (inputs.json_safe).
MAX_DEPTH = 64
MAX_CHANNEL_BYTES = 1024  # `chat:{uid}:{space}:{thread}` of valid keys stays far below


class Hub:
    def __init__(
        self,
        settings: RedisSettings,
        instance_id: str,
        metrics: Metrics,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._max_bytes = max_message_bytes
        self._sinks: dict[str, set[Sink]] = {}
        self._owners: dict[str, str] = {}  # channel -> the uid whose envelopes it may carry
        self._confirmed: set[str] = set()  # channels Redis has confirmed on this connection
        self._changed = asyncio.Event()  # pulsed on every confirmation, and on connect/loss
        self._on_reconnect: set[Callable[[], None]] = set()
        self._pubsub: Any = None
        self._ready = asyncio.Event()
        self._home = f"listeners:hub:{instance_id}"  # keeps the connection open with no socket
        self._backoff = Backoff()

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    @property
    def channels(self) -> int:
        return len(self._sinks)

    def on_reconnect(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._on_reconnect.add(callback)
        return lambda: self._on_reconnect.discard(callback)

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
        if first and self._ready.is_set():
            await self._command("subscribe", channel)
        return True

    async def unsubscribe(self, channel: str, sink: Sink) -> None:
        sinks = self._sinks.get(channel)
        if sinks is None:
            return
        sinks.discard(sink)
        if not sinks:
            del self._sinks[channel]
            del self._owners[channel]
            self._confirmed.discard(channel)
            if self._ready.is_set():
                await self._command("unsubscribe", channel)

    def is_confirmed(self, channel: str) -> bool:
        return self._ready.is_set() and channel in self._confirmed

    async def confirmed(self, channel: str, timeout: float) -> bool:
        """Whether Redis confirms the channel's subscription within `timeout`; False at once
        while the hub has no Redis (a subscription then would only be a promise)."""
        try:
            async with asyncio.timeout(timeout):
                while self._ready.is_set() and channel not in self._confirmed:
                    await self._changed.wait()
        except TimeoutError:
            return False
        return self.is_confirmed(channel)

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _command(self, name: str, channel: str) -> None:
        try:
            await getattr(self._pubsub, name)(channel)
        except (RedisError, OSError) as exc:  # the reader notices too, and resubscribes all
            log.warning("hub subscription failed", extra={"reason": type(exc).__name__})

    async def run(self) -> None:
        attempt, first = 0, True
        while True:
            client = redis_client(self._settings, timeout=10.0)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self._home, *self._sinks)
                # Sockets may have added channels while that subscribe was in flight.
                while missing := [c for c in self._sinks if c.encode() not in pubsub.channels]:
                    await pubsub.subscribe(*missing)
                self._pubsub = pubsub
                self._ready.set()
                self._pulse()
                attempt = 0
                if not first:
                    for callback in list(self._on_reconnect):
                        callback()
                first = False
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=5.0)
                    if message is not None:
                        self._on_message(message)
            except (RedisError, OSError) as exc:
                reraise_if_cancelled()
                log.warning("hub lost redis; resubscribing", extra={"reason": type(exc).__name__})
            except Exception as exc:  # a bug must not leave the instance without delivery
                reraise_if_cancelled()
                log.error("hub failed; reconnecting", extra={"reason": type(exc).__name__})
            finally:
                self._ready.clear()
                self._confirmed.clear()
                self._pulse()
                await asyncio.shield(close_quietly(pubsub, client))
            await asyncio.sleep(self._backoff.delay(attempt))
            attempt += 1

    def _on_message(self, message: Mapping[str, Any]) -> None:
        raw = message.get("channel")
        # Only channels the hub encoded itself are subscribed: their names decode.
        channel = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        kind = message.get("type")
        if kind in ("subscribe", "unsubscribe"):
            (self._confirmed.add if kind == "subscribe" else self._confirmed.discard)(channel)
            self._pulse()
            return
        sinks = self._sinks.get(channel)
        if kind != "message" or not sinks:
            return  # e.g. a message that was in flight when its last socket left
        text = self._envelope_text(channel, message.get("data"))
        if text is None:
            return
        for sink in list(sinks):
            try:
                sink(text)
            except Exception as exc:  # one socket's trouble is not the others'
                log.warning("hub sink failed", extra={"reason": type(exc).__name__})

    def _envelope_text(self, channel: str, data: object) -> str | None:
        """The message's text if it is an envelope for the channel's user, else None (logged
        and counted). Parsed once here, for every socket of the channel."""
        owner = self._owners.get(channel, "")
        try:
            if not isinstance(data, bytes):
                raise InvalidInput("not bytes")
            if len(data) > self._max_bytes:
                raise InvalidInput(f"larger than {self._max_bytes} bytes")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput("not UTF-8") from None
            problem = _envelope_problem(
                parse_json(text, max_bytes=self._max_bytes, max_depth=MAX_DEPTH), owner
            )
            if problem:
                raise InvalidInput(problem)
        except InvalidInput as exc:
            self._reject("hub message dropped", str(exc), owner)
            return None
        return text

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
