"""WebSocket Direct mode: a browser receives exactly its user's events (docs/websocket.md).

Lifecycle of a socket: the `Origin` is checked before the upgrade; the Firebase ID token
comes in `?token=`, in `Sec-WebSocket-Protocol: bearer, <token>`, or as a first
`{"type": "auth", "token": ...}` message; once verified, the socket follows the user's
channels through the hub and asks for a resync, so it starts with fresh syncs. Every
limit is explicit: frame size, client messages per second, sockets per user and per
instance, and the outbound queue (a slow consumer is closed, reconnects and resyncs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from listeners.config import WebSocketSettings
from listeners.deliver.hub import Hub
from listeners.deliver.tokens import TokenRejected, TokenVerifier, VerifiedToken
from listeners.session import Channels
from listeners.source.registry import CHAT_MODES, ChatThread, RegistryEntry, valid_thread_part

log = logging.getLogger(__name__)

# Close codes (docs/websocket.md); token refusals are 4002-4010 (deliver.tokens).
ORIGIN_REFUSED = 1008  # before the upgrade: the client sees HTTP 403
TOO_BIG = 1009
INSTANCE_FULL = 1013
GOING_AWAY = 1001
NO_TOKEN = 4001
TOKEN_EXPIRED = 4011
TOO_MANY_SOCKETS = 4013
SLOW_CONSUMER = 4014
RATE_LIMITED = 4015
UID_CHANGED = 4017


@dataclass
class Services:
    """What the gateway needs from the rest of the instance."""

    hub: Hub
    verifier: TokenVerifier
    channels: Channels
    entry: Callable[[str], RegistryEntry | None]  # the user's registry entry, if known
    resync: Callable[[str, tuple[ChatThread, ...]], Coroutine[Any, Any, None]]
    mark_read: Callable[[str, str], Awaitable[bool]]  # (uid, doc_id) -> written
    open_thread: Callable[[str, ChatThread], Awaitable[None]]
    close_thread: Callable[[str, ChatThread], Awaitable[None]]
    presence: Callable[[str], contextlib.AbstractAsyncContextManager[None]] | None = None


@dataclass
class Gateway:
    settings: WebSocketSettings
    allowed_origins: tuple[str, ...]
    services: Services
    sockets: dict[str, set[Connection]] = field(default_factory=lambda: defaultdict(set))
    closing: bool = False
    count: int = 0  # every socket past the Origin check, authenticated or not yet

    def origin_allowed(self, websocket: WebSocket) -> bool:
        """No Origin (not a browser), a listed origin, or the page's own origin."""
        origin = websocket.headers.get("origin")
        if origin is None or origin in self.allowed_origins:
            return True
        host = websocket.headers.get("host", "")
        return origin in (f"http://{host}", f"https://{host}")

    def threads_of(self, uid: str) -> set[ChatThread]:
        return {t for c in self.sockets.get(uid, ()) for t in c.threads}

    async def endpoint(self, websocket: WebSocket) -> None:
        if not self.origin_allowed(websocket):
            log.warning(
                "websocket refused: origin", extra={"origin": websocket.headers.get("origin", "")[:100]}
            )
            await websocket.close(code=ORIGIN_REFUSED)
            return
        self.count += 1
        try:
            await Connection(self, websocket).serve()
        finally:
            self.count -= 1

    async def close_all(self) -> None:
        self.closing = True
        sockets = [c for group in self.sockets.values() for c in group]
        await asyncio.gather(*(c.close(GOING_AWAY, "server shutting down") for c in sockets))


class Connection:
    def __init__(self, gateway: Gateway, websocket: WebSocket) -> None:
        self.gateway = gateway
        self.websocket = websocket
        self.settings = gateway.settings
        self.services = gateway.services
        self.uid = ""
        self.expires_at = 0.0
        self.threads: set[ChatThread] = set()
        self._outbound: asyncio.Queue[str] = asyncio.Queue(self.settings.queue_length)
        self._tokens = 2 * self.settings.messages_per_second  # token bucket, burst of two seconds
        self._refilled = time.monotonic()
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()  # fire-and-forget work, kept until done

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- lifecycle ---------------------------------------------------------------

    async def serve(self) -> None:
        subprotocols = [
            p.strip() for p in self.websocket.headers.get("sec-websocket-protocol", "").split(",")
        ]
        token = self.websocket.query_params.get("token")
        if len(subprotocols) == 2 and subprotocols[0] == "bearer":
            token = subprotocols[1]
        await self.websocket.accept(subprotocol="bearer" if token and subprotocols[0] == "bearer" else None)
        if self.gateway.count > self.settings.max_sockets or self.gateway.closing:
            await self.close(INSTANCE_FULL, "instance full")
            return
        verified = await self._authenticate(token)
        if verified is None:
            return
        self.uid, self.expires_at = verified.uid, verified.expires_at
        mine = self.gateway.sockets[self.uid]
        if len(mine) >= self.settings.max_sockets_per_user:
            await self.close(TOO_MANY_SOCKETS, "too many sockets for this user")
            return
        mine.add(self)
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self.services.presence is not None:
                    await stack.enter_async_context(self.services.presence(self.uid))
                await self._run()
        finally:
            mine.discard(self)
            if not mine:
                self.gateway.sockets.pop(self.uid, None)
            await self._leave()

    async def _authenticate(self, token: str | None) -> VerifiedToken | None:
        if token is None:
            try:
                async with asyncio.timeout(self.settings.auth_timeout_seconds):
                    first = await self._receive()
            except TimeoutError:
                await self.close(NO_TOKEN, "no token")
                return None
            if first is None:
                return None
            token = first.get("token") if first.get("type") == "auth" else None
            if not isinstance(token, str):
                await self.close(NO_TOKEN, "no token")
                return None
        try:
            async with asyncio.timeout(self.settings.auth_timeout_seconds):
                return await self.services.verifier.verify(token)
        except TimeoutError:
            await self.close(NO_TOKEN, "token could not be verified in time")
            return None
        except TokenRejected as exc:
            log.warning("websocket refused: token", extra={"reason": exc.reason, "code": exc.code})
            await self.close(exc.code, exc.reason)
            return None

    async def _run(self) -> None:
        user_channel = self.services.channels.user(self.uid)
        await self.services.hub.subscribe(user_channel, self._deliver)
        forget = self.services.hub.on_reconnect(self._after_reconnect)
        writer = asyncio.create_task(self._write(), name=f"ws-write {self.uid}")
        watchdog = asyncio.create_task(self._expire(), name=f"ws-expiry {self.uid}")
        log.info("websocket open", extra={"uid": self.uid})
        try:
            await self._send({"type": "auth.ok", "uid": self.uid, "expires_at": self.expires_at})
            await self.services.resync(self.uid, ())
            while not self._closed:
                message = await self._receive()
                if message is None:
                    break
                await self._handle(message)
        finally:
            forget()
            for task in (writer, watchdog):
                task.cancel()
            await asyncio.gather(writer, watchdog, return_exceptions=True)
            await self.services.hub.unsubscribe(user_channel, self._deliver)
            log.info("websocket closed", extra={"uid": self.uid})

    async def _leave(self) -> None:
        for thread in list(self.threads):
            await self._unsubscribe_thread(thread)

    async def close(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        if self.websocket.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(RuntimeError, OSError):
                await self.websocket.close(code=code, reason=reason)

    # -- inbound -----------------------------------------------------------------

    async def _receive(self) -> dict[str, Any] | None:
        """The next client message as an object; None once the socket is closed."""
        while not self._closed:
            try:
                frame = await self.websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                self._closed = True
                return None
            if frame["type"] == "websocket.disconnect":
                self._closed = True
                return None
            data = frame.get("text") or frame.get("bytes") or ""
            if len(data) > self.settings.max_frame_bytes:
                await self.close(TOO_BIG, "frame too large")
                return None
            if not self._allow():
                log.warning("websocket closed: rate limited", extra={"uid": self.uid})
                await self.close(RATE_LIMITED, "too many messages")
                return None
            try:
                message = json.loads(data)
            except ValueError:
                message = None
            if isinstance(message, dict):
                return message
            await self._send({"type": "error", "reason": "messages are JSON objects"})
        return None

    def _allow(self) -> bool:
        now = time.monotonic()
        rate = self.settings.messages_per_second
        self._tokens = min(2 * rate, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    async def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "ping":
            await self._send({"type": "pong"})
        elif kind == "auth.refresh":
            await self._refresh(message.get("token"))
        elif kind == "notif.read":
            doc_id = message.get("doc_id")
            if not isinstance(doc_id, str) or not doc_id or "/" in doc_id or len(doc_id) > 200:
                await self._send({"type": "error", "reason": "notif.read needs a doc_id"})
                return
            written = await self.services.mark_read(self.uid, doc_id)
            await self._send({"type": "notif.read.ok" if written else "notif.read.failed", "doc_id": doc_id})
        elif kind in ("chat.subscribe", "chat.unsubscribe"):
            thread = _thread(message)
            if thread is None:
                await self._send(
                    {"type": "error", "reason": "space_code, thread_key and mode needed, as database keys"}
                )
            elif kind == "chat.subscribe":
                await self._subscribe_thread(thread)
            else:
                await self._unsubscribe_thread(thread)
                await self._send({"type": "chat.unsubscribed", **_fields(thread)})
        else:
            await self._send({"type": "error", "reason": "unknown message type"})

    async def _refresh(self, token: Any) -> None:
        if not isinstance(token, str):
            await self._send({"type": "error", "reason": "auth.refresh needs a token"})
            return
        try:
            verified = await self.services.verifier.verify(token)
        except TokenRejected as exc:
            await self._send({"type": "auth.refused", "reason": exc.reason, "code": exc.code})
            return
        if verified.uid != self.uid:
            await self.close(UID_CHANGED, "token for another user")
            return
        self.expires_at = verified.expires_at
        await self._send({"type": "auth.ok", "uid": self.uid, "expires_at": self.expires_at})

    async def _subscribe_thread(self, thread: ChatThread) -> None:
        entry = self.services.entry(self.uid)
        companies = entry.authorized_companies_ids if entry else frozenset()
        if companies and thread.space_code not in companies:
            log.warning(
                "chat thread refused",
                extra={
                    "uid": self.uid,
                    "space_code": thread.space_code,
                    "reason": "not an authorised company",
                },
            )
            await self._send(
                {"type": "chat.refused", "reason": "not an authorised company", **_fields(thread)}
            )
            return
        if thread not in self.threads:
            self.threads.add(thread)
            await self.services.hub.subscribe(self.services.channels.chat(self.uid, thread), self._deliver)
            await self.services.open_thread(self.uid, thread)
        await self._send({"type": "chat.subscribed", **_fields(thread)})
        await self.services.resync(self.uid, (thread,))

    async def _unsubscribe_thread(self, thread: ChatThread) -> None:
        if thread not in self.threads:
            return
        self.threads.discard(thread)
        await self.services.hub.unsubscribe(self.services.channels.chat(self.uid, thread), self._deliver)
        if thread not in self.gateway.threads_of(self.uid):
            await self.services.close_thread(self.uid, thread)

    # -- outbound ----------------------------------------------------------------

    def _deliver(self, text: str) -> None:
        """From the hub, on the loop: queue, or close a consumer that cannot keep up."""
        try:
            self._outbound.put_nowait(text)
        except asyncio.QueueFull:
            if not self._closed:
                log.warning("websocket closed: slow consumer", extra={"uid": self.uid})
                self._spawn(self.close(SLOW_CONSUMER, "slow consumer"))

    def _after_reconnect(self) -> None:
        self._spawn(self.services.resync(self.uid, tuple(self.threads)))

    async def _send(self, message: dict[str, Any]) -> None:
        self._deliver(json.dumps(message))

    async def _write(self) -> None:
        while True:
            text = await self._outbound.get()
            try:
                await self.websocket.send_text(text)
            except (WebSocketDisconnect, RuntimeError, OSError):
                self._closed = True
                return

    async def _expire(self) -> None:
        while True:
            remaining = self.expires_at + self.settings.clock_skew_seconds - time.time()
            if remaining <= 0:
                log.info("websocket closed: token expired", extra={"uid": self.uid})
                await self.close(TOKEN_EXPIRED, "token expired")
                return
            await asyncio.sleep(min(remaining, 60.0))


def _thread(message: dict[str, Any]) -> ChatThread | None:
    fields = [message.get(k) for k in ("space_code", "thread_key", "mode")]
    if not all(valid_thread_part(f) for f in fields):
        return None
    if fields[2] not in CHAT_MODES:
        return None
    return ChatThread(str(fields[0]), str(fields[1]), str(fields[2]))


def _fields(thread: ChatThread) -> dict[str, str]:
    return {"space_code": thread.space_code, "thread_key": thread.thread_key, "mode": thread.mode}
