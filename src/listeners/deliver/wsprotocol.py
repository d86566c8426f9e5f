"""uvicorn's WebSocket protocol with two changes that 10,000 sockets per process need.

The container selects it without changing the start command: `UVICORN_WS=
listeners.deliver.wsprotocol:DirectWebSocketProtocol` (Dockerfile, task definition). uvicorn
reads `--ws` as an import path when it is not one of its own names.

1. permessage-deflate costs what a socket's zlib state costs, for as long as the socket is
   open. Each socket keeps a compressor and a decompressor between messages (context
   takeover) unless told otherwise. `LISTENERS_WS_DEFLATE` chooses:
   - `no-context` (default): both sides start every message afresh, so an idle socket holds
     no zlib state at all (measured in docs/benchmarks-websocket.md, bytes sent included);
   - `context`: uvicorn's own setting (12-bit windows, memLevel 5, context kept);
   - `off`: no compression even when the browser offers it.
2. A socket whose client stopped reading has a full transport: uvicorn's `send` waits until
   the client reads before it writes anything, the close frame included, so a slow consumer
   could never be closed; and after a close, `transport.close()` waits for a buffer that never
   drains, keeping the file descriptor for ever. Here a close is written at once, behind the
   data already queued, and the transport is aborted `LISTENERS_WS_CLOSE_TIMEOUT_SECONDS` (5)
   later if the client has not completed the closing handshake by then.
3. Per-socket objects are kept small (10,000 of them per process): the receive queue and the
   "writable" flag are a deque and futures made only while someone waits (an asyncio.Queue
   and an asyncio.Event cost ~3 KiB a socket), and the handshake's response goes once sent.
4. The kernel's send buffer of each socket is capped (`SEND_BUFFER_BYTES`): Linux grows it to
   4 MiB for a client that does not read, memory the task pays for (cgroup socket memory) and
   that hides a slow consumer from its queue for megabytes.
5. The application may write a text message straight to the transport, past the ASGI `send`
   (a coroutine, a dict and Starlette's checks per message, and a task to await it): the
   protocol is in the scope's extensions under `SEND_EXTENSION`, with `send_text_now(data)`
   (True once written, False while the transport is full: the caller queues and waits with
   `until_writable()`; ClientDisconnected once the socket is closing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Mapping
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.exceptions import InvalidState
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.server import ServerProtocol

from listeners.config import ConfigError, WebSocketSettings, read_env
from listeners.deliver.admission import (
    ADMISSION_STATE,
    TICKET_EXTENSION,
    Admission,
    Refusal,
    Ticket,
    carries_token,
)

WINDOW_BITS = 12  # uvicorn's own choice; 9 is zlib's least for raw deflate
MEM_LEVEL = 5
SEND_BUFFER_BYTES = 65_536  # the kernel doubles it; 128 KiB drains at 100 MB/s over a 1 ms path
CLOSE_SECONDS: float = WebSocketSettings.close_timeout_seconds  # the default (configuration's table)
SEND_EXTENSION = "listeners.send"


def deflate_mode(env: Mapping[str, str] | None = None) -> str:
    mode: str = _read(env)["LISTENERS_WS_DEFLATE"]
    return mode


def deflate_factory(mode: str) -> ServerPerMessageDeflateFactory | None:
    if mode == "off":
        return None
    fresh = mode == "no-context"
    return ServerPerMessageDeflateFactory(
        server_no_context_takeover=fresh,
        client_no_context_takeover=fresh,
        server_max_window_bits=WINDOW_BITS,
        client_max_window_bits=WINDOW_BITS,
        compress_settings={"memLevel": MEM_LEVEL},
    )


def close_seconds(env: Mapping[str, str] | None = None) -> float:
    seconds: float = _read(env)["LISTENERS_WS_CLOSE_TIMEOUT_SECONDS"]
    return seconds


def _read(env: Mapping[str, str] | None) -> dict[str, Any]:
    """The two keys, through the configuration's table (its names, defaults and ranges); the
    worker's `load_settings` has checked them before it listened, with every other key."""
    try:
        return read_env(("LISTENERS_WS_DEFLATE", "LISTENERS_WS_CLOSE_TIMEOUT_SECONDS"), env)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


_options_set: list[tuple[str, float]] = []  # the process's values, set once


def configure(deflate: str, close_timeout_seconds: float) -> None:
    """The values of `Settings.websocket`, handed over when the application is made."""
    _options_set[:] = [(deflate, close_timeout_seconds)]


def _options() -> tuple[str, float]:
    """As configured; a protocol used without the application reads the table once."""
    if not _options_set:
        values = _read(None)
        configure(values["LISTENERS_WS_DEFLATE"], values["LISTENERS_WS_CLOSE_TIMEOUT_SECONDS"])
    return _options_set[0]


class Inbox:
    """What uvicorn asks of its receive queue (`put_nowait`, `get`, `empty`), for one reader."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)


class Flag:
    """What uvicorn asks of its `writable` event: set, clear, is_set, wait."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = True
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        while not self._set:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)


class DirectWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: Any = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        mode, self.close_timeout = _options()
        factory = deflate_factory(mode) if config.ws_per_message_deflate else None
        self.conn = ServerProtocol(
            extensions=[factory] if factory is not None else [],
            max_size=config.ws_max_size,
            logger=logging.getLogger("uvicorn.error"),
        )
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]
        self.ticket: Ticket | None = None  # deliver.admission's, for an admitted upgrade

    def handle_connect(self, event: Any) -> None:
        admission: Admission | None = self.app_state.get(ADMISSION_STATE)
        if self.ticket is None and admission is not None and admission.guards(event.path):
            # Before `accept` (which negotiates deflate) and before any application task;
            # deliver.httpprotocol has admitted it already where it runs (the ticket is set).
            headers = event.headers
            verdict = admission.admit(
                self.client[0] if self.client else "",
                ",".join(headers.get_all("X-Forwarded-For")) or None,
                next(iter(headers.get_all("Origin")), None),
                carries_token(
                    event.path.partition("?")[2], ",".join(headers.get_all("Sec-WebSocket-Protocol"))
                ),
            )
            if isinstance(verdict, Refusal):
                self._refuse(verdict)
                return
            self.ticket = verdict
        super().handle_connect(event)
        scope = self.__dict__.get("scope")  # set only for an upgrade that goes to the app
        if scope is not None:
            scope["extensions"][SEND_EXTENSION] = self
            if self.ticket is not None:
                scope["extensions"][TICKET_EXTENSION] = self.ticket
        elif self.ticket is not None:  # refused by the handshake itself
            self.ticket.release()

    def _refuse(self, refusal: Refusal) -> None:
        """A plain HTTP answer, then the connection closed: as uvicorn refuses a bad handshake."""
        response = self.conn.reject(refusal.status, refusal.text + "\n")
        for name, value in refusal.headers():
            response.headers[name] = value
        self.handshake_initiated = self.handshake_complete = self.close_sent = True
        self.conn.send_response(response)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ticket is not None:
            self.ticket.release()
        super().connection_lost(exc)

    def send_text_now(self, data: bytes) -> bool:
        """Writes a text message (UTF-8) if the transport takes more; False while it is full."""
        if self.close_sent or self.disconnected or self.transport.is_closing():
            raise ClientDisconnected()
        if not self.writable.is_set():
            return False
        try:
            self.conn.send_text(data)
        except InvalidState:
            raise ClientDisconnected() from None
        self.transport.write(b"".join(self.conn.data_to_send()))
        return True

    async def until_writable(self) -> None:
        await self.writable.wait()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Not a socket this option applies to: the kernel's own size then.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        super().connection_made(transport)

    async def send(self, message: Any) -> None:
        if message["type"] != "websocket.close" or not self.handshake_complete:
            await super().send(message)
            if message["type"] == "websocket.accept" and self.handshake_complete:
                # Sent: only the handshake reads them, and the request holds the token.
                self.response = self.request = None  # type: ignore[assignment]
            return
        if self.close_sent or self.disconnected or self.initial_response is not None:
            await super().send(message)  # uvicorn's own errors for these
            return
        if self.writable.is_set():
            await super().send(message)
        else:  # the client is not reading: do not wait for it
            code = message.get("code", 1000)
            reason = message.get("reason", "") or ""
            try:
                self.conn.send_close(code, reason)
            except InvalidState:  # the connection failed meanwhile (a ping timeout): as uvicorn does
                raise ClientDisconnected() from None
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.close_timer = self.loop.call_later(self.close_timeout, self._cut)

    def _cut(self) -> None:
        """`transport.close()` would wait for the client to read what is buffered; abort drops it."""
        self.close_timer = None
        if not self.transport.is_closing() or self.transport.get_write_buffer_size():
            self.transport.abort()
