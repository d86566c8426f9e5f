"""WebSocket Direct mode: a browser receives exactly its user's events (docs/websocket.md).

Lifecycle of a socket: the `Origin` is checked before the upgrade; the Firebase ID token
comes in `?token=`, in `Sec-WebSocket-Protocol: bearer, <token>`, or as a first
`{"type": "auth", "token": ...}` message; once verified, the socket follows the user's
channels through the hub and asks for a resync, so it starts with fresh syncs. Every
limit is explicit: frame size, client messages per second, sockets per user and per
instance, sockets still authenticating and their deadline, chat threads per user and
`chat.subscribe` per second, and the outbound queue (a slow consumer is closed, reconnects
and resyncs). Chat fails closed: a thread is served only to a user whose registry entry
names the thread's company (docs/websocket.md, "Chat threads").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from listeners.config import WebSocketSettings
from listeners.deliver.admission import TICKET_EXTENSION, Admission, Refusal, Ticket, carries_token
from listeners.deliver.hub import Hub
from listeners.deliver.ports import Entries, Notifications, Presence, RegistryWrites, Resync
from listeners.deliver.revocation import TOKEN_REVOKED, RevocationCheck
from listeners.deliver.threads import RegistryThreads
from listeners.deliver.tokens import TokenRejected, TokenVerifier, VerifiedToken
from listeners.metrics import Metrics
from listeners_bridge.channels import Channels
from listeners_bridge.inputs import InvalidInput, encode_json, parse_json, valid_uid
from listeners_bridge.registry import ChatThread, InvalidThread

log = logging.getLogger(__name__)

# Close codes (docs/websocket.md); token refusals are 4002-4010 (deliver.tokens).
ORIGIN_REFUSED = 1008  # before the upgrade: the client sees HTTP 403
TOO_BIG = 1009
INSTANCE_FULL = 1013
GOING_AWAY = 1001
INTERNAL_ERROR = 1011
NO_TOKEN = 4001
TOKEN_EXPIRED = 4011
UID_REFUSED = 4012  # the token's uid cannot stand in a channel name or a database path
TOO_MANY_SOCKETS = 4013
SLOW_CONSUMER = 4014
RATE_LIMITED = 4015
UID_CHANGED = 4017

HUB_CONFIRM_SECONDS = 5.0  # Redis answers a SUBSCRIBE in well under a second when it is up
OPEN_THREAD_SECONDS = 15.0  # the registry write (a read and a conditional write, retried)
CLOSE_SECONDS = 10.0  # for our close frame to be written (deliver.wsprotocol: at once)
RESYNCS_PER_SECOND = 0.5  # `resync` messages: a burst of 5, then one every 2 s
# Where deliver.wsprotocol puts itself in the scope (its SEND_EXTENSION; not imported: that
# module reads its settings at import, and other ASGI servers do without it).
SEND_EXTENSION = "listeners.send"


class DirectSend(Protocol):
    """deliver.wsprotocol's way past the ASGI `send` (docs: `wsprotocol.SEND_EXTENSION`)."""

    def send_text_now(self, data: bytes) -> bool: ...

    async def until_writable(self) -> None: ...


@dataclass
class Services:
    """What the gateway needs: its own parts (the hub, the token verifier, channel names) and
    the rest of the instance, through deliver.ports."""

    hub: Hub
    verifier: TokenVerifier
    channels: Channels
    metrics: Metrics
    entries: Entries
    resync: Resync
    notifications: Notifications
    registry: RegistryWrites
    presence: Presence | None = None
    revocation: RevocationCheck | None = None  # LISTENERS_TOKEN_CHECK_REVOKED
    chat: bool = True  # False without a Realtime Database: no thread could ever be served


@dataclass
class Gateway:
    settings: WebSocketSettings
    allowed_origins: tuple[str, ...]
    services: Services
    sockets: dict[str, set[Connection]] = field(default_factory=lambda: defaultdict(set))
    closing: bool = False
    count: int = 0  # every socket past the Origin check, authenticated or not yet
    unauthenticated: int = 0  # accepted, token not verified yet (their own, smaller cap)
    authenticated: int = 0  # verified; `max_sockets` caps these
    path: str = "/ws"  # where deliver.wsprotocol applies `admission` before the handshake
    registry_threads: RegistryThreads = field(init=False)
    admission: Admission = field(init=False)  # the refusals before the upgrade (deliver.admission)

    def __post_init__(self) -> None:
        self.registry_threads = RegistryThreads(
            self.services.registry, self.services.presence, self.threads_of
        )
        refusals = self.services.metrics.ws_refusals
        self.admission = Admission(
            self.settings, self, lambda reason: refusals.labels(reason=reason).inc(), self.path
        )

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
        ticket = websocket.scope.get("extensions", {}).get(TICKET_EXTENSION)
        try:
            if not self.origin_allowed(websocket):
                log.warning(
                    "websocket refused: origin", extra={"origin": websocket.headers.get("origin", "")[:100]}
                )
                self.services.metrics.ws_handshakes.labels(outcome=str(ORIGIN_REFUSED)).inc()
                await websocket.close(code=ORIGIN_REFUSED)
                return
            if ticket is None:  # not admitted by deliver.wsprotocol (another server): here
                ticket = await self._admit(websocket)
                if ticket is None:
                    return
            self.count += 1
            try:
                await Connection(self, websocket, ticket).serve()
            finally:
                self.count -= 1
        finally:
            if ticket is not None:
                ticket.release()

    async def _admit(self, websocket: WebSocket) -> Ticket | None:
        """deliver.admission before `websocket.accept`: a refusal is an HTTP status where the
        server offers the ASGI `websocket.http.response` extension, else a close (HTTP 403)."""
        headers = websocket.headers
        client = websocket.client
        verdict = self.admission.admit(
            client.host if client else "",
            ",".join(headers.getlist("x-forwarded-for")) or None,
            headers.get("origin"),
            carries_token(
                websocket.scope.get("query_string", b"").decode("latin-1"),
                ",".join(headers.getlist("sec-websocket-protocol")),
            ),
        )
        if isinstance(verdict, Refusal):
            if "websocket.http.response" in websocket.scope.get("extensions", {}):
                response = PlainTextResponse(verdict.text, verdict.status, dict(verdict.headers()))
                await websocket.send_denial_response(response)
            else:
                await websocket.close(code=INSTANCE_FULL if verdict.status == 503 else RATE_LIMITED)
            return None
        return verdict

    async def close_all(self) -> None:
        self.closing = True
        sockets = [c for group in self.sockets.values() for c in group]
        await asyncio.gather(*(c.close(GOING_AWAY, "server shutting down") for c in sockets))


class Connection:
    def __init__(self, gateway: Gateway, websocket: WebSocket, ticket: Ticket | None = None) -> None:
        self.gateway = gateway
        self.websocket = websocket
        self._ticket = ticket  # deliver.admission's, released once the token is settled
        self.settings = gateway.settings
        self.services = gateway.services
        self.uid = ""
        self.expires_at = 0.0
        self.threads: set[ChatThread] = set()
        self._thread_sinks: dict[ChatThread, Callable[[str], None]] = {}  # what the hub calls
        # Events of a thread being opened, held until `chat.subscribed` is out: a client sees
        # the answer first, then the thread's `chat.sync`, whatever the timing.
        self._held: dict[ChatThread, list[str]] = {}
        # What the transport could not take at once, in order; a writer task only while it is
        # not empty (an asyncio.Queue and a task per socket cost ~2.4 KiB and more a socket).
        self._outbound: deque[tuple[str, float]] = deque()  # (text, when the hub handed it)
        self._writer: asyncio.Task[None] | None = None
        self._writing = False  # from `_run` on: earlier messages wait in the queue
        self._direct: DirectSend | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._queued_bytes = 0  # characters, as queued: what a slow consumer makes us hold
        self._slow = False  # closed as a slow consumer: nothing more is queued
        self._messages = TokenBucket(self.settings.messages_per_second, burst_seconds=2)
        # Each chat.subscribe is a registry write that every instance reads: its own budget.
        self._subscribes = TokenBucket(self.settings.chat_subscribes_per_second, burst_seconds=5)
        self._resyncs = TokenBucket(RESYNCS_PER_SECOND, burst_seconds=10)
        self._closed = False
        self._accepted = False  # authenticated and counted: later closes are no refusals
        self._close_sent = False  # by us (else the client or the network ended it)
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
        gateway = self.gateway
        # Sockets still authenticating cost a client nothing but a connection: they have their
        # own, smaller cap, so that a flood of them cannot take the places of signed-in users.
        if (
            gateway.closing
            or gateway.unauthenticated >= self.settings.max_unauthenticated_sockets
            or gateway.authenticated >= self.settings.max_sockets
        ):
            await self.close(INSTANCE_FULL, "instance full")
            return
        gateway.unauthenticated += 1
        try:
            verified = await self._authenticate(token)
        finally:
            gateway.unauthenticated -= 1
            if self._ticket is not None:
                self._ticket.release()
        if verified is None:
            return
        if not valid_uid(verified.uid):
            # `chat:{uid}:{space}:{thread}` and `clients/{uid}/…` must mean one thing only
            self.services.metrics.rejected_inputs.labels(source="websocket").inc()
            log.warning("websocket refused: uid", extra={"reason": "the uid is not a valid key"})
            await self.close(UID_REFUSED, "uid not usable")
            return
        if gateway.authenticated >= self.settings.max_sockets or gateway.closing:
            await self.close(INSTANCE_FULL, "instance full")
            return
        self.uid, self.expires_at = verified.uid, verified.expires_at
        # The claims and the token stay out of this frame, which lives as long as the socket.
        del verified, token, subprotocols
        mine = gateway.sockets[self.uid]
        if len(mine) >= self.settings.max_sockets_per_user:
            await self.close(TOO_MANY_SOCKETS, "too many sockets for this user")
            return
        metrics = self.services.metrics
        metrics.ws_handshakes.labels(outcome="accepted").inc()
        self._accepted = True
        if not mine:
            metrics.ws_users.inc()
        mine.add(self)
        gateway.authenticated += 1
        metrics.ws_sockets.inc()
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self.services.presence is not None:
                    await stack.enter_async_context(self.services.presence.online(self.uid))
                await self._run()
        finally:
            gateway.authenticated -= 1
            metrics.ws_sockets.dec()
            if not self._close_sent:
                metrics.ws_closes.labels(code="client").inc()
            mine.discard(self)
            if not mine:
                gateway.sockets.pop(self.uid, None)
                metrics.ws_users.dec()
            await self._leave()
            self._drop_queue()  # what was never written (the gauge of queued text)

    async def _authenticate(self, token: str | None) -> VerifiedToken | None:
        """The verified token, or None once the socket is closed. The whole of it, waiting for
        an `auth` message included, fits in `unauthenticated_timeout_seconds`."""
        try:
            async with asyncio.timeout(self.settings.unauthenticated_timeout_seconds):
                return await self._verify(token)
        except TimeoutError:
            await self.close(NO_TOKEN, "not authenticated in time")
            return None

    async def _verify(self, token: str | None) -> VerifiedToken | None:
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
                return await self._verified(token)
        except TimeoutError:
            await self.close(NO_TOKEN, "token could not be verified in time")
            return None
        except TokenRejected as exc:
            log.warning("websocket refused: token", extra={"reason": exc.reason, "code": exc.code})
            await self.close(exc.code, exc.reason)
            return None

    async def _verified(self, token: str) -> VerifiedToken:
        """The token verified, and not revoked when that is checked (TokenRejected otherwise)."""
        verified = await self.services.verifier.verify(token)
        if self.services.revocation is not None:
            await self.services.revocation.check(verified.uid, float(verified.claims["iat"]))
        return verified

    async def _run(self) -> None:
        user_channel = self.services.channels.user(self.uid)
        if not await self.services.hub.subscribe(user_channel, self.uid, self._deliver):
            await self.close(INTERNAL_ERROR, "no delivery for this uid")  # a valid uid never gets here
            return
        forget = self.services.hub.on_reconnect(user_channel, self._after_reconnect)
        self._direct = self.websocket.scope.get("extensions", {}).get(SEND_EXTENSION)
        self._writing = True
        if self._outbound:
            self._start_writer()
        self._check_expiry()
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
            if self._expiry is not None:
                self._expiry.cancel()
            self._writing = False
            if self._writer is not None:
                self._writer.cancel()
                await asyncio.gather(self._writer, return_exceptions=True)
            await self.services.hub.unsubscribe(user_channel, self._deliver)
            log.info("websocket closed", extra={"uid": self.uid})

    async def _leave(self) -> None:
        for thread in list(self.threads):
            await self._unsubscribe_thread(thread)

    async def close(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_sent = True
        metrics = self.services.metrics
        metrics.ws_closes.labels(code=str(code)).inc()
        if not self._accepted:
            metrics.ws_handshakes.labels(outcome=str(code)).inc()
        if code == SLOW_CONSUMER:
            metrics.ws_slow_consumers.inc()
        if self.websocket.application_state != WebSocketState.DISCONNECTED:
            # A server whose `send` waits for the client to read (uvicorn's own protocol, not
            # deliver.wsprotocol) would keep a slow consumer's close waiting for ever.
            with contextlib.suppress(RuntimeError, OSError, TimeoutError):
                async with asyncio.timeout(CLOSE_SECONDS):
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
            if not self._messages.take():
                log.warning("websocket closed: rate limited", extra={"uid": self.uid})
                await self.close(RATE_LIMITED, "too many messages")
                return None
            try:
                message = parse_json(data, max_bytes=self.settings.max_frame_bytes)
            except InvalidInput:
                message = None
            if isinstance(message, dict):
                return message
            await self._send({"type": "error", "reason": "messages are JSON objects"})
        return None

    async def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "ping":
            await self._send({"type": "pong"})
        elif kind == "resync":
            # A client that saw a gap (a missing seq, an epoch without its sync) asks for fresh
            # syncs of its streams. Each is a whole list: a budget of its own, below messages'.
            if self._resyncs.take():
                await self.services.resync(self.uid, tuple(self.threads))
            else:
                await self._send({"type": "error", "reason": "too many resync messages; retry later"})
        elif kind == "auth.refresh":
            await self._refresh(message.get("token"))
        elif kind == "notif.read":
            doc_id = message.get("doc_id")
            if not isinstance(doc_id, str) or not doc_id or "/" in doc_id or len(doc_id) > 200:
                await self._send({"type": "error", "reason": "notif.read needs a doc_id"})
                return
            written = await self.services.notifications.mark_read(self.uid, doc_id)
            await self._send({"type": "notif.read.ok" if written else "notif.read.failed", "doc_id": doc_id})
        elif kind in ("chat.subscribe", "chat.unsubscribe"):
            thread = _thread(message)
            if thread is None:
                self.services.metrics.rejected_inputs.labels(source="websocket").inc()
                await self._send(
                    {"type": "error", "reason": "space_code, thread_key and mode needed, as database keys"}
                )
            elif kind == "chat.subscribe":
                await self._subscribe_thread(thread)
            else:
                await self._unsubscribe_thread(thread)
                await self._send({"type": "chat.unsubscribed", **thread.to_fields()})
        else:
            await self._send({"type": "error", "reason": "unknown message type"})

    async def _refresh(self, token: Any) -> None:
        if not isinstance(token, str):
            await self._send({"type": "error", "reason": "auth.refresh needs a token"})
            return
        try:
            verified = await self._verified(token)
        except TokenRejected as exc:
            if exc.code == TOKEN_REVOKED:  # the user's session is revoked: the old token too
                log.warning("websocket closed: token revoked", extra={"uid": self.uid})
                await self.close(TOKEN_REVOKED, exc.reason)
                return
            await self._send({"type": "auth.refused", "reason": exc.reason, "code": exc.code})
            return
        if verified.uid != self.uid:
            await self.close(UID_CHANGED, "token for another user")
            return
        self.expires_at = verified.expires_at
        await self._send({"type": "auth.ok", "uid": self.uid, "expires_at": self.expires_at})

    async def _subscribe_thread(self, thread: ChatThread) -> None:
        refusal = self._chat_refusal(thread)
        if refusal:
            log.warning(
                "chat thread refused",
                extra={"uid": self.uid, "space_code": thread.space_code, "reason": refusal},
            )
            # One meaning for clients: after `chat.refused` the socket does not have the thread
            # (it may have had it before the user lost the company).
            await self._unsubscribe_thread(thread)
            await self._send({"type": "chat.refused", "reason": refusal, **thread.to_fields()})
            return
        if thread not in self.threads:
            failure = await self._open(thread)
            if failure:
                log.warning(
                    "chat thread not opened",
                    extra={"uid": self.uid, "space_code": thread.space_code, "reason": failure},
                )
                await self._send({"type": "chat.refused", "reason": failure, **thread.to_fields()})
                return
        await self._send({"type": "chat.subscribed", **thread.to_fields()})
        for text in self._held.pop(thread, []):
            self._deliver(text)
        await self.services.resync(self.uid, (thread,))

    def _chat_refusal(self, thread: ChatThread) -> str:
        """Why this socket may not have the thread, or "". Fails closed: no registry entry, or
        an entry without companies, serves no thread at all."""
        if not self._subscribes.take():
            return "too many chat.subscribe messages; retry later"
        if not self.services.chat:
            return "chat is not available (no Realtime Database)"
        entry = self.services.entries.entry(self.uid)
        if entry is None or thread.space_code not in entry.authorized_companies_ids:
            return "not an authorised company"
        mine = self.gateway.threads_of(self.uid)
        if thread not in mine and len(mine) >= self.settings.max_threads_per_user:
            return f"too many threads (at most {self.settings.max_threads_per_user} per user)"
        return ""

    async def _open(self, thread: ChatThread) -> str:
        """Sets the thread up: the hub's subscription confirmed by Redis, then the thread
        written to the registry (which makes the serving instance open its stream). Returns
        "" once both are done; otherwise undoes what was done and says what failed."""
        # Claimed before any await: the per-user cap counts it for the user's other sockets.
        self.threads.add(thread)
        self._held[thread] = []
        sink = self._thread_sinks[thread] = self._thread_sink(thread)
        channel = self.services.channels.chat(self.uid, thread)
        hub = self.services.hub
        subscribed = await hub.subscribe(channel, self.uid, sink) and await hub.confirmed(
            channel, HUB_CONFIRM_SECONDS
        )
        if subscribed and await self._written(thread):
            return ""
        self.threads.discard(thread)
        del self._held[thread], self._thread_sinks[thread]
        await hub.unsubscribe(channel, sink)
        if not subscribed:
            return "delivery unavailable (Redis); retry later"
        if thread not in self.gateway.threads_of(self.uid):
            # A write that landed late is undone, and presence forgets the thread instead of
            # writing it at its next heartbeat.
            await self.gateway.registry_threads.close(self.uid, thread)
        return "the thread could not be written to the registry; retry later"

    def _thread_sink(self, thread: ChatThread) -> Callable[[str], None]:
        def sink(text: str) -> None:
            held = self._held.get(thread)
            if held is None:
                self._deliver(text)
            elif len(held) < self.settings.queue_length:
                held.append(text)
            elif not self._closed:
                log.warning("websocket closed: slow consumer", extra={"uid": self.uid})
                self._spawn(self.close(SLOW_CONSUMER, "slow consumer"))

        return sink

    async def _written(self, thread: ChatThread) -> bool:
        try:
            async with asyncio.timeout(OPEN_THREAD_SECONDS):
                return await self.gateway.registry_threads.open(self.uid, thread)
        except TimeoutError:
            return False

    async def _unsubscribe_thread(self, thread: ChatThread) -> None:
        if thread not in self.threads:
            return
        self.threads.discard(thread)
        self._held.pop(thread, None)
        sink = self._thread_sinks.pop(thread)
        await self.services.hub.unsubscribe(self.services.channels.chat(self.uid, thread), sink)
        if thread not in self.gateway.threads_of(self.uid):
            await self.gateway.registry_threads.close(self.uid, thread)

    # -- outbound ----------------------------------------------------------------

    def _deliver(self, text: str) -> None:
        """From the hub, on the loop, never waiting: written to the transport at once while it
        takes more (deliver.wsprotocol), else queued, or the consumer that cannot keep up is
        closed (its queue full by count or by bytes). What was queued is then dropped."""
        if self._closed or self._slow:
            return
        now = time.monotonic()
        if not self._outbound and self._direct is not None:
            try:
                if self._direct.send_text_now(text.encode()):
                    self._sent(text, now)
                    return
            except OSError:  # the connection is going: its disconnect ends `_run`
                self._closed = True
                return
        over = self._queued_bytes and self._queued_bytes + len(text) > self.settings.queue_bytes
        if not over and len(self._outbound) < self.settings.queue_length:
            self._outbound.append((text, now))
            self._queued_bytes += len(text)
            self.services.metrics.ws_queue_bytes.inc(len(text))
            if self._writer is None and self._writing:
                self._start_writer()
            return
        log.warning("websocket closed: slow consumer", extra={"uid": self.uid})
        self._slow = True
        self._drop_queue()
        if self._writer is not None:
            self._writer.cancel()  # it waits for a client that does not read
        self._spawn(self.close(SLOW_CONSUMER, "slow consumer"))

    def _start_writer(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write(), name=f"ws-write {self.uid}")

    def _drop_queue(self) -> None:
        self._outbound.clear()
        self.services.metrics.ws_queue_bytes.dec(self._queued_bytes)
        self._queued_bytes = 0

    def _sent(self, text: str, handed_at: float) -> None:
        metrics = self.services.metrics
        metrics.ws_messages.inc()
        metrics.ws_bytes.inc(len(text))
        metrics.ws_delivery.observe(time.monotonic() - handed_at)

    def _after_reconnect(self) -> None:
        self._spawn(self.services.resync(self.uid, tuple(self.threads)))

    async def _send(self, message: dict[str, Any]) -> None:
        self._deliver(encode_json(message).decode())

    async def _write(self) -> None:
        """Empties the queue as the client reads, then ends: new messages go straight to the
        transport again."""
        direct = self._direct
        try:
            while self._outbound and not self._closed:
                text, handed_at = self._outbound[0]
                if direct is not None and not direct.send_text_now(text.encode()):
                    await direct.until_writable()
                    continue
                self._outbound.popleft()
                self._queued_bytes -= len(text)
                self.services.metrics.ws_queue_bytes.dec(len(text))
                if direct is None:  # another ASGI server: its own `send`, which may wait
                    await self.websocket.send_text(text)
                self._sent(text, handed_at)
        except (WebSocketDisconnect, RuntimeError, OSError):
            self._closed = True
        finally:
            self._writer = None

    def _check_expiry(self) -> None:
        """Closes the socket once its token has expired; until then looks again when it would
        (a timer, not a task per socket: `auth.refresh` only moves `expires_at` later)."""
        self._expiry = None
        remaining = self.expires_at + self.settings.clock_skew_seconds - time.time()
        if remaining <= 0:
            log.info("websocket closed: token expired", extra={"uid": self.uid})
            self._spawn(self.close(TOKEN_EXPIRED, "token expired"))
            return
        self._expiry = asyncio.get_running_loop().call_later(min(remaining, 60.0), self._check_expiry)


class TokenBucket:
    """`rate` per second on average, with bursts of `burst_seconds` worth (at least one)."""

    __slots__ = ("_burst", "_rate", "_refilled", "_tokens")

    def __init__(self, rate: float, burst_seconds: float) -> None:
        self._rate = rate
        self._burst = max(1.0, rate * burst_seconds)
        self._tokens = self._burst
        self._refilled = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def _thread(message: dict[str, Any]) -> ChatThread | None:
    try:
        return ChatThread.from_fields(message)
    except InvalidThread:
        return None
