"""uvicorn's HTTP protocol (httptools) with the guards hostile traffic needs (issue 28).

The container selects it as it selects deliver.wsprotocol, without changing the start command:
`UVICORN_HTTP=listeners.deliver.httpprotocol:GuardedHttpProtocol` (Dockerfile, task definition).

1. A request's head must be in within `LISTENERS_HTTP_HEADER_TIMEOUT_SECONDS`, counted from
   the connection (its first request) or from a later request's first byte (keep-alive),
   or the connection is closed, without an answer, and counted in
   `listeners_http_header_timeouts_total`. uvicorn alone keeps a connection that sends half a
   request for ever: its keep-alive timer only runs between requests.
2. A WebSocket upgrade to the gateway's path is put to deliver.admission as soon as its head
   is parsed, before uvicorn hands the connection to the WebSocket protocol. A refusal is a
   response of a few bytes: no WebSocket protocol object, no second parse of the request by
   websockets, no handshake response or deflate set-up. Under flood this is most of what the
   service does (docs/benchmarks.md, "Hostile traffic"). An admitted upgrade goes to
   deliver.wsprotocol with its ticket; with another WebSocket protocol the gateway admits
   it, as before.
3. The answer to a caller over its handshake rate is held back
   (`LISTENERS_WS_RATE_REFUSAL_DELAY_SECONDS`, at random around it; at most
   `LISTENERS_WS_MAX_DELAYED_REFUSALS` at once, then at once: `Admission.hold`). A client
   that reconnects as soon as it is answered otherwise makes as many attempts as the service
   can answer, and they come back together, in waves that hold the event loop for as long
   as the wave takes, while signed-in users' events wait behind them.

All read what they need from the lifespan state (`HEADER_DEADLINE_STATE`, deliver.admission's
`ADMISSION_STATE`); without it (another application) the deadline is the table's default.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from listeners.config import ServiceSettings
from listeners.deliver.admission import ADMISSION_STATE, Admission, Refusal, SampledLog, carries_token
from listeners.deliver.wsprotocol import DirectWebSocketProtocol

HEADER_DEADLINE_STATE = "listeners.header_deadline"
log = logging.getLogger(__name__)
_lapses = SampledLog(log, "connection closed: its request's head did not arrive in time")


@dataclass(frozen=True)
class HeaderDeadline:
    """How long a request's head may take, and what to do when one did not make it."""

    seconds: float = ServiceSettings.http_header_timeout_seconds
    count: Callable[[], None] = lambda: None  # listeners_http_header_timeouts_total


def refusal_bytes(refusal: Refusal) -> bytes:
    """The whole answer to a refused upgrade; the connection is closed after it."""
    body = (refusal.text + "\n").encode()
    lines = [
        f"HTTP/1.1 {refusal.status} {http.HTTPStatus(refusal.status).phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in refusal.headers()),
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class GuardedHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: HeaderDeadline = self.app_state.get(HEADER_DEADLINE_STATE) or HeaderDeadline()
        self._head_timer: asyncio.TimerHandle | None = None
        self._held: tuple[Admission, asyncio.TimerHandle] | None = None  # a refusal's answer, held back

    # -- 1. the deadline of a request's head

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # a later request on a kept-alive connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._unhold()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._held is None:  # a held refusal's connection gets its answer, nothing else
            super().data_received(data)

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self._deadline.seconds, self._head_too_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._deadline.count()
            _lapses(
                "header_timeout",
                seconds=self._deadline.seconds,
                address=self.client[0] if self.client else "",
            )
            self.transport.abort()  # nothing to flush: nothing was answered

    # -- 2. refusals before the WebSocket protocol

    def handle_websocket_upgrade(self) -> None:
        admission: Admission | None = self.app_state.get(ADMISSION_STATE)
        target = self.url.decode("latin-1")
        ws_class = self.ws_protocol_class
        if (
            admission is None
            or not isinstance(ws_class, type)
            or not issubclass(ws_class, DirectWebSocketProtocol)
            or not admission.guards(target)
        ):
            super().handle_websocket_upgrade()
            return
        headers: dict[bytes, list[bytes]] = {}
        for name, value in self.headers:  # names are lower case (uvicorn's on_header)
            headers.setdefault(name, []).append(value)

        def field(name: bytes) -> str:
            return b",".join(headers.get(name, ())).decode("latin-1")

        verdict = admission.admit(
            self.client[0] if self.client else "",
            field(b"x-forwarded-for") or None,
            headers[b"origin"][0].decode("latin-1") if b"origin" in headers else None,
            carries_token(target.partition("?")[2], field(b"sec-websocket-protocol")),
        )
        if isinstance(verdict, Refusal):
            delay = admission.hold(verdict)
            if delay:
                self._held = (admission, self.loop.call_later(delay, self._answer, refusal_bytes(verdict)))
            else:
                self._answer(refusal_bytes(verdict))
            return
        # As uvicorn's own hand-over, with the ticket given to the WebSocket protocol first.
        self.connections.discard(self)
        request = [self.scope["method"].encode(), b" ", self.url, b" HTTP/1.1\r\n"]
        for name, value in self.headers:
            request += [name, b": ", value, b"\r\n"]
        request.append(b"\r\n")
        protocol = ws_class(config=self.config, server_state=self.server_state, app_state=self.app_state)
        protocol.ticket = verdict
        protocol.connection_made(self.transport)
        protocol.data_received(b"".join(request))
        self.transport.set_protocol(protocol)

    def _answer(self, refusal: bytes) -> None:
        self._unhold()
        self.transport.write(refusal)
        self.transport.close()

    def _unhold(self) -> None:
        if self._held is not None:
            admission, timer = self._held
            self._held = None
            timer.cancel()
            admission.unhold()
