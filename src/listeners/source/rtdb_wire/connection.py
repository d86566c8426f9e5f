"""One WebSocket to the database and the listens it carries, reconnected for as long as it has any.

A session: connect to `/.ws?v=5&ns=...`, wait for the server's hello (`h`: the host to use
from now on, the session id), authenticate (`gauth` with the access token; `auth` for a
Firebase ID token), send every listen (at most `max_pending_listens` awaiting their answer at
once), then read pushes and answers until the connection ends. When it ends every listen is
lost, and all of them are sent again on the next session, each one's full read replacing its
mirror (the streams count a reconnect, the consumers publish a fresh sync).

Liveness: after `keepalive` seconds with nothing received the connection sends a ping (`p`,
answered `o`); after `idle_timeout` with nothing received it starts again. The access token
is asked of the provider every `token_check_interval`; a different one (the provider refreshes
before expiry) is sent on the open connection. A refused token, a credential the server
revokes (`ac`), a token provider that fails and a server shutdown (`s`) make the connection
degraded with a reason until it is authenticated again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import websockets
from websockets.asyncio.client import ClientConnection

from listeners.source.rtdb import Json, RtdbError
from listeners.source.rtdb_wire.listen import IDLE, LIVE, QUEUED, SENT, Listen
from listeners.source.rtdb_wire.protocol import (
    FrameReader,
    WireProtocolError,
    auth_action,
    describe,
    encode_frames,
    path_keys,
    query_key,
    relative_writes,
)
from listeners_bridge.backoff import Backoff, reraise_if_cancelled


class ClientSide(Protocol):
    """What a connection needs from its client (`WireClient`): stated here, so that this
    module does not import the client back."""

    max_pending_listens: int
    max_message_chars: int
    keepalive: float
    idle_timeout: float
    token_check_interval: float
    connect_timeout: float
    user_agent: str
    backoff: Backoff
    on_reconnect: Callable[[str], None]

    def ws_url(self, last_session: str | None = None) -> str: ...

    def failed(self, listen: Listen, reason: str, *, unlisten: bool = True) -> None: ...

    def remember_host(self, host: Json) -> bool: ...

    async def token(self, *, refresh: bool = False) -> str | None: ...


log = logging.getLogger("listeners.source.rtdb_wire")

Callback = Callable[[Json, Json], None]  # (status, data) of an answer
DISCONNECTED = "disconnected"  # the status of a request whose connection ended first
MAX_OUTGOING = 20_000  # messages waiting to be sent: above every listen of a connection, and its unlistens
SHORT = 200  # characters of an error or a server's string kept in logs and /healthz


def _short(value: object) -> str:
    """An error (its class and message) or a server's value, cut for a log line or /healthz."""
    text = f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else repr(value)
    return text[:SHORT]


class _Restart(Exception):
    """End this session and start another."""

    def __init__(self, reason: str, *, now: bool = False, refresh_token: bool = False) -> None:
        super().__init__(reason)
        self.now = now  # no backoff: the server sent us elsewhere
        self.refresh_token = refresh_token


class Connection:
    def __init__(self, client: ClientSide, index: int) -> None:
        self.client = client
        self.index = index
        self.listens: dict[tuple[tuple[str, ...], str], Listen] = {}
        self._at: dict[tuple[str, ...], Listen] = {}  # the default (query-less) listens by path
        self._below: dict[tuple[str, ...], set[Listen]] = {}  # default listens under a prefix
        self._tags: dict[int, Listen] = {}
        self._next_tag = 0
        self._requests: dict[int, Callback] = {}
        self._next_request = 0
        self._queue: deque[Listen] = deque()
        self._awaiting = 0  # listens sent, not answered yet
        self._out: asyncio.Queue[list[str]] | None = None
        self._ws: ClientConnection | None = None
        self.ready = asyncio.Event()
        self.session_id: str | None = None
        self._token: str | None = None  # the token this session authenticated with
        self._refresh_token = False
        self._last_received = 0.0
        self._pinged = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self.degraded_reason: str | None = None
        self.down_since: float | None = time.monotonic()
        self.last_error: str | None = None
        self.sessions = 0  # sessions that reached ready
        self._generation = 0  # one more at each session's end: answers of older ones are stale
        self._abort_reason: str | None = None
        self.auths = 0  # credentials accepted, first ones and refreshes
        self.skipped = 0  # messages from the server this client could not apply

    # --- listens -------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"rtdb-wire connection {self.index}"
            )

    def add(self, listen: Listen) -> None:
        listen.connection = self
        self.listens[listen.ident] = listen
        if listen.query is None:
            self._at[listen.keys] = listen
            for depth in range(len(listen.keys)):
                self._below.setdefault(listen.keys[:depth], set()).add(listen)
        if self.ready.is_set():
            self._enqueue(listen)
        self.start()

    def remove(self, listen: Listen, *, unlisten: bool = True) -> None:
        if self.listens.pop(listen.ident, None) is None:
            return
        if listen.query is None:
            self._at.pop(listen.keys, None)
            for depth in range(len(listen.keys)):
                below = self._below.get(listen.keys[:depth])
                if below is not None:
                    below.discard(listen)
                    if not below:
                        del self._below[listen.keys[:depth]]
        if listen.tag is not None:
            self._tags.pop(listen.tag, None)
        if unlisten and listen.state in (SENT, LIVE) and self.ready.is_set():
            body: dict[str, Json] = {"p": listen.path}
            if listen.query is not None:
                body["q"], body["t"] = listen.query, listen.tag
            self._request("n", body, None)
        listen.state = IDLE

    @property
    def load(self) -> int:
        return len(self.listens)

    def _enqueue(self, listen: Listen) -> None:
        if listen.state == IDLE:
            listen.state = QUEUED
            self._queue.append(listen)
        self._pump()

    def _pump(self) -> None:
        limit = self.client.max_pending_listens
        while self._queue and self._awaiting < limit and self.ready.is_set():
            listen = self._queue.popleft()
            if self.listens.get(listen.ident) is not listen or listen.state != QUEUED:
                continue
            body: dict[str, Json] = {"p": listen.path, "h": ""}  # no hash: always the full read
            if listen.query is not None:
                self._next_tag += 1
                listen.tag = self._next_tag
                self._tags[listen.tag] = listen
                body["q"], body["t"] = listen.query, listen.tag
            listen.sent()
            self._awaiting += 1
            self._request("q", body, self._answer_of(listen))

    def _answer_of(self, listen: Listen) -> Callback:
        generation = self._generation
        return lambda status, data: self._answered(generation, listen, status, data)

    def _answered(self, generation: int, listen: Listen, status: Json, data: Json) -> None:
        if generation != self._generation:
            return  # an answer of a session that ended (DISCONNECTED)
        self._awaiting -= 1
        if self.listens.get(listen.ident) is listen and listen.state == SENT:
            if status == "ok":
                warnings = data.get("w") if isinstance(data, dict) else None
                if isinstance(warnings, list) and "no_index" in warnings:
                    log.warning("rtdb listen %s: no index on the server for %s", listen.path, listen.query)
                listen.answered()
            else:
                self.client.failed(listen, f"listen refused: {describe(status, data)}")
        self._pump()

    # --- requests ------------------------------------------------------------------------

    def _request(self, action: str, body: Json, callback: Callback | None) -> int:
        self._next_request += 1
        if callback is not None:
            self._requests[self._next_request] = callback
        self._send({"t": "d", "d": {"r": self._next_request, "a": action, "b": body}})
        return self._next_request

    def _send(self, message: Json) -> None:
        if self._out is None:
            return
        try:
            self._out.put_nowait(encode_frames(message))
        except asyncio.QueueFull:  # the server reads nothing of what we send: start again
            self._abort(f"more than {MAX_OUTGOING} messages waiting to be sent")

    async def call(self, action: str, body: Json, timeout: float) -> Json:
        """A request answered by the server (a write, a read): its data, or RtdbError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.start()
        try:
            async with asyncio.timeout_at(deadline):
                await self.ready.wait()
        except TimeoutError:
            raise RtdbError(503, f"no connection to the database within {timeout:g}s") from None
        answer: asyncio.Future[tuple[Json, Json]] = loop.create_future()

        def done(status: Json, data: Json) -> None:
            if not answer.done():
                answer.set_result((status, data))

        request = self._request(action, body, done)
        try:
            async with asyncio.timeout_at(deadline):
                status, data = await answer
        except TimeoutError:
            self._requests.pop(request, None)
            raise RtdbError(504, f"no answer to {action!r} within {timeout:g}s") from None
        if status == "ok":
            return data
        if status == DISCONNECTED:
            raise RtdbError(503, "the connection ended before the answer")
        raise RtdbError(403 if status == "permission_denied" else 400, describe(status, data))

    # --- the session loop -----------------------------------------------------------------

    async def aclose(self) -> None:
        self._closed = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=5.0)

    async def _run(self) -> None:
        attempt = 0
        try:
            while not self._closed:
                now = False
                try:
                    await self._session()
                    why = "the server closed the connection"
                except _Restart as exc:
                    why, now = str(exc), exc.now
                    self._refresh_token = self._refresh_token or exc.refresh_token
                except (OSError, TimeoutError, websockets.WebSocketException, WireProtocolError) as exc:
                    reraise_if_cancelled()
                    why = _short(exc)
                except Exception as exc:  # a bug, or something unforeseen: a new session all the same
                    reraise_if_cancelled()
                    log.exception("rtdb wire connection %d: session ended on an internal error", self.index)
                    why = f"internal error: {_short(exc)}"
                finally:
                    was_ready = self.ready.is_set()
                    self._lost()
                if was_ready:
                    attempt = 0
                self.last_error = why
                if self._closed:
                    return
                delay = 0.0 if now else self.client.backoff.delay(attempt)
                attempt += 0 if now else 1
                log.info("rtdb wire connection %d: reconnecting in %.2fs (%s)", self.index, delay, why)
                self.client.on_reconnect(why.partition(":")[0][:40])  # the cause's class: a bounded label
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not look like a healthy connection
            log.exception("rtdb wire connection %d: internal error", self.index)
            self.degraded_reason = f"internal error: {_short(exc)}"
            for listen in list(self.listens.values()):
                self.client.failed(listen, self.degraded_reason)
            self._task = None  # the next listen or call starts it again

    async def _session(self) -> None:
        client = self.client
        try:
            token = await client.token(refresh=self._refresh_token)
        except Exception as exc:
            self.degraded_reason = f"the token provider failed: {_short(exc)}"
            raise _Restart(self.degraded_reason) from exc
        self._refresh_token = False
        url = client.ws_url(self.session_id)
        ws = await websockets.connect(
            url,
            additional_headers={"User-Agent": client.user_agent},
            user_agent_header=None,
            compression=None,  # what the SDK asks for too; saves CPU on the loop
            ping_interval=None,  # liveness is the protocol's own ping, below
            max_size=client.max_message_chars * 4 + 1024,  # frames are 16 KiB; bounded again below
            open_timeout=client.connect_timeout,
            close_timeout=2.0,
            proxy=None,
        )
        reader = FrameReader(client.max_message_chars)
        out: asyncio.Queue[list[str]] = asyncio.Queue(maxsize=MAX_OUTGOING)
        writer = asyncio.create_task(self._write(ws, out), name=f"rtdb-wire writer {self.index}")
        ticker: asyncio.Task[None] | None = None
        try:
            async with asyncio.timeout(client.connect_timeout):
                hello = await self._next_message(ws, reader)
            self._hello(hello)
            self._ws, self._out = ws, out
            self._last_received = asyncio.get_running_loop().time()
            self._pinged = False
            ticker = asyncio.create_task(self._tick(ws), name=f"rtdb-wire ticker {self.index}")
            if token is not None:
                self._authenticate(token)
            else:
                self._ready()
            while True:
                message = await self._next_message(ws, reader)
                try:
                    self._dispatch(message)
                except _Restart:
                    raise
                except Exception as exc:  # one message: logged, counted, skipped; the others go on
                    self.skipped += 1
                    log.warning("rtdb wire connection %d: a message skipped (%s)", self.index, _short(exc))
        except websockets.ConnectionClosed as exc:
            if writer.done() and not writer.cancelled() and writer.exception() is not None:
                raise _Restart(f"sending failed: {writer.exception()!r}") from exc
            raise _Restart(self._abort_reason or f"the connection closed ({exc})") from None
        finally:
            self._abort_reason = None
            for task in (writer, ticker):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(t for t in (writer, ticker) if t is not None), return_exceptions=True)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3.0):
                    await ws.close()

    async def _next_message(self, ws: ClientConnection, reader: FrameReader) -> Json:
        while True:
            frame = await ws.recv()
            self._last_received = asyncio.get_running_loop().time()
            self._pinged = False
            try:
                text = reader.feed(frame.decode("utf-8") if isinstance(frame, bytes) else frame)
                if text is None:
                    continue
                message = json.loads(text)
            except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
                raise WireProtocolError("a message is not JSON in UTF-8, or is nested too deep") from None
            if not isinstance(message, dict):
                raise WireProtocolError("a message is not an object")
            return message

    @staticmethod
    async def _write(ws: ClientConnection, out: asyncio.Queue[list[str]]) -> None:
        while True:
            frames = await out.get()
            for frame in frames:
                await ws.send(frame)

    def _hello(self, message: Json) -> None:
        data = message.get("d") if message.get("t") == "c" else None
        if not isinstance(data, dict):
            raise WireProtocolError("the first message is not a control message")
        if data.get("t") == "r":
            self._reset(data.get("d"))
        if data.get("t") != "h" or not isinstance(data.get("d"), dict):
            raise WireProtocolError(f"expected the server's hello, got {_short(data.get('t'))}")
        hello = data["d"]
        if hello.get("v") != "5":
            log.warning("rtdb wire: the server speaks protocol version %s", _short(hello.get("v")))
        self.client.remember_host(hello.get("h"))
        session = hello.get("s")
        self.session_id = session if isinstance(session, str) else None

    def _reset(self, host: Json) -> None:
        if not self.client.remember_host(host):
            raise _Restart(f"the server sent us to a host not allowed: {_short(host)}")
        raise _Restart(f"the server sent us to {_short(host)}", now=True)

    def _authenticate(self, token: str) -> None:
        def answered(status: Json, data: Json) -> None:
            self._authenticated(token, status, data)

        self._request(auth_action(token), {"cred": token}, answered)

    def _authenticated(self, token: str, status: Json, data: Json) -> None:
        if status == DISCONNECTED:
            return
        if status == "ok":
            self._token = token
            self.auths += 1
            self.degraded_reason = None
            if not self.ready.is_set():
                self._ready()
            return
        self.degraded_reason = f"the server refused the credential: {describe(status, data)}"
        self._abort(self.degraded_reason, refresh_token=True)

    def _ready(self) -> None:
        self.sessions += 1
        self.down_since = None
        self.degraded_reason = None  # connected and, with a provider, authenticated
        self._awaiting = 0
        self.ready.set()
        for listen in self.listens.values():
            self._enqueue(listen)

    def _lost(self) -> None:
        self.ready.clear()
        self._ws, self._out = None, None
        self._token = None
        if self.down_since is None:
            self.down_since = time.monotonic()
        self._generation += 1  # first: the listens' answers below are then stale, not refusals
        requests, self._requests = self._requests, {}
        for callback in requests.values():
            with contextlib.suppress(Exception):
                callback(DISCONNECTED, None)
        self._tags.clear()
        self._queue.clear()
        self._awaiting = 0
        for listen in self.listens.values():
            listen.lost()
        if self._refreshing is not None:
            self._refreshing.cancel()
            self._refreshing = None

    def _abort(self, reason: str, *, refresh_token: bool = False) -> None:
        """End the session from a callback: the reader sees the close and restarts."""
        self._abort_reason = reason
        self._refresh_token = self._refresh_token or refresh_token
        ws = self._ws
        if ws is not None:
            ws.transport.abort()

    async def _tick(self, ws: ClientConnection) -> None:
        client = self.client
        loop = asyncio.get_running_loop()
        next_token_check = loop.time() + client.token_check_interval
        while True:
            await asyncio.sleep(min(1.0, client.keepalive / 2))
            now = loop.time()
            silent = now - self._last_received
            if silent > client.idle_timeout:
                self._abort(f"nothing received for {client.idle_timeout:g}s")
                return
            if silent > client.keepalive and not self._pinged:
                self._pinged = True
                self._send({"t": "c", "d": {"t": "p", "d": {}}})
            if now >= next_token_check and self.ready.is_set() and self._refreshing is None:
                next_token_check = now + client.token_check_interval
                self._refreshing = asyncio.create_task(self._check_token())

    async def _check_token(self) -> None:
        """The provider's token now (it refreshes before expiry); a new one goes on this connection."""
        try:
            try:
                token = await self.client.token()
            except Exception as exc:
                self.degraded_reason = f"the token refresh failed: {_short(exc)}"
                log.warning("rtdb wire connection %d: %s", self.index, self.degraded_reason)
                return
            if token is None or token == self._token:
                if self.degraded_reason and self.degraded_reason.startswith("the token refresh failed"):
                    self.degraded_reason = None
                return
            self._authenticate(token)
        finally:
            self._refreshing = None

    # --- what the server sends --------------------------------------------------------------

    def _dispatch(self, message: Json) -> None:
        layer, data = message.get("t"), message.get("d")
        if not isinstance(data, dict):
            raise WireProtocolError(f"a message of layer {_short(layer)} has no object")
        if layer == "c":
            self._control(data)
        elif layer == "d":
            if "r" in data:
                body = data.get("b")
                body = body if isinstance(body, dict) else {}
                callback = self._requests.pop(data["r"], None) if isinstance(data["r"], int) else None
                if callback is not None:
                    callback(body.get("s"), body.get("d"))
            elif "a" in data:
                body = data.get("b")
                self._push(data["a"], body if isinstance(body, dict) else {})
            elif "error" in data:
                log.warning("rtdb wire connection %d: server error %s", self.index, str(data["error"])[:200])
        else:
            raise WireProtocolError(f"unknown protocol layer {_short(layer)}")

    def _control(self, data: dict[str, Json]) -> None:
        kind, payload = data.get("t"), data.get("d")
        if kind == "r":
            self._reset(payload)
        elif kind == "s":
            self.degraded_reason = f"the server shut the connection down: {str(payload)[:200]}"
            raise _Restart(self.degraded_reason)
        elif kind == "e":
            log.warning("rtdb wire connection %d: server error %s", self.index, str(payload)[:200])
        # "o" (pong) and anything else: liveness only, counted when received

    def _push(self, action: Json, body: dict[str, Json]) -> None:
        if action in ("d", "m"):
            keys = path_keys(body.get("p"))
            merge, data, tag = action == "m", body.get("d"), body.get("t")
            if tag is not None:
                listen = self._tags.get(tag) if isinstance(tag, int) else None
                if listen is not None:
                    self._apply(listen, keys, merge, data)
                return
            for listen in self._defaults(keys):
                if listen.state in (SENT, LIVE):
                    self._apply(listen, keys, merge, data)
        elif action == "c":
            keys = path_keys(body.get("p"))
            query = body.get("q")
            if isinstance(query, list):
                query = query[0] if len(query) == 1 else None
            listen = self.listens.get((keys, query_key(query)))
            if listen is not None:
                reason = f"cancelled by the server: reading {listen.path} is no longer permitted"
                self.client.failed(listen, reason, unlisten=False)
        elif action == "ac":
            reason = describe(body.get("s"), body.get("d"))
            self.degraded_reason = f"the server revoked the credential: {reason}"
            raise _Restart(self.degraded_reason, refresh_token=True)
        elif action in ("apc", "sd"):
            pass  # App Check revoked (not used here), security debug
        else:
            log.debug("rtdb wire connection %d: ignoring push %s", self.index, _short(action))

    def _apply(self, listen: Listen, keys: tuple[str, ...], merge: bool, data: Json) -> None:
        try:
            listen.push(relative_writes(listen.keys, keys, merge, data))
        except Exception as exc:  # its mirror would go wrong: it fails, and its stream reads again
            self.skipped += 1
            self.client.failed(listen, f"a push it cannot apply ({_short(exc)})")

    def _defaults(self, keys: tuple[str, ...]) -> list[Listen]:
        """The default listens a push at `keys` touches: at it, above it, and below it."""
        found = [listen for depth in range(len(keys) + 1) if (listen := self._at.get(keys[:depth]))]
        found.extend(self._below.get(keys, ()))
        return found

    def stats(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "connected": self.ready.is_set(),
            "listens": len(self.listens),
            "sessions": self.sessions,
            "degraded": self.degraded_reason,
            "last_error": self.last_error,
        }
