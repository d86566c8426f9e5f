"""A local stand-in for the Firebase Realtime Database REST API, streaming included.

Run it as `python -m listeners_testkit.rtdb_app --port N [--keepalive S] [--token T]`, or
from tests through `RtdbStandin`, a child process that can be stopped and started again on
the same port. It implements the REST protocol described in `listeners.source.rtdb`
(the client's package), with the choices noted there, and at `/.ws` the Firebase SDKs'
WebSocket protocol on the same data (`listeners_testkit.rtdb_wire_server`, docs/rtdb.md).

Not implemented: security rules (beyond the test hook that denies a path), ETags, server
values, streaming with `shallow`, `startAfter` / `endBefore`.

Test hooks, HTTP under `/_standin/` (and as methods of `Hub` in process):
  GET  /_standin/streams[?ns=]          -> {"open": n, "unauthorized": k}  streams open now,
                                         and requests refused with 401 since the start
  POST /_standin/drop[?mode=abort|close] drop every stream (abort: reset mid-response)
  POST /_standin/revoke[?token=NEW]      `auth_revoked` to every stream; NEW is required from now
  POST /_standin/cancel?path=P[&ns=]     `cancel` to streams at P or below, and deny reads there
  POST /_standin/redirect?on=1|0         answer each stream request once with a 307 to itself
  POST /_standin/hold?on=1|0             answer new stream requests with 503 (writes still work)
  POST /_standin/reset                   forget all data and denials
  GET  /_standin/wire[?ns=]              the WebSocket side: connections, listens, counters
  POST /_standin/wire_reset?host=H       reset every WebSocket to host H (`r`), and close it
  POST /_standin/wire_shutdown?reason=R  shutdown (`s`) to every WebSocket, and close it
  POST /_standin/wire_host?host=H        the host the handshake names from now (empty: Host)
  POST /_standin/wire_accept?token=T     accept T too on WebSockets (a token rotation)
  The hooks above also act on WebSockets: drop closes them (1011 for abort, 1001 for close),
  revoke sends `ac` and unauthenticates them, cancel sends `c` to the listens at P or below,
  hold refuses new ones.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Self
from urllib.parse import urlencode

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from listeners_testkit.processes import _Child

DEFAULT_NAMESPACE = "default"
_FORBIDDEN_KEY_CHARS = frozenset(".#$[]/")
_PUSH_CHARS = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"  # ASCII order
_METHODS = ("GET", "PUT", "POST", "PATCH", "DELETE")

Json = Any


class WireSide(Protocol):
    """The WebSocket side (listeners_testkit.rtdb_wire_server.WireEndpoint), as the hub and the
    REST app use it: stated here so that this module does not import it back."""

    handshake_host: str | None
    accepted: set[str]

    def publish(
        self, ns: str, keys: tuple[str, ...], old: Json, new: Json, patch: dict[str, Json] | None
    ) -> None: ...

    def drop(self, mode: str) -> int: ...

    def revoke(self) -> int: ...

    def cancel(self, ns: str, keys: tuple[str, ...]) -> int: ...

    def reset(self, host: str) -> int: ...

    def shutdown(self, reason: str) -> int: ...

    def stats(self, ns: str | None = None) -> dict[str, Any]: ...

    async def serve(self, ws: WebSocket) -> None: ...


class _BadRequest(Exception):
    pass


# --- the tree: stored with objects only, rendered with the array heuristic --------------------


def _check_key(key: str) -> None:
    if (
        not key
        or len(key.encode()) > 768
        or any(c in _FORBIDDEN_KEY_CHARS or ord(c) < 32 or ord(c) == 127 for c in key)
    ):
        raise _BadRequest(f"Invalid key {key!r}: keys must be non-empty and not contain . # $ [ ] /")


def _keys(path: str) -> tuple[str, ...]:
    keys = tuple(part for part in path.split("/") if part)
    for key in keys:
        _check_key(key)
    return keys


def _store(value: Json) -> Json:
    """A written value as the database keeps it: arrays become objects, nulls and empties vanish."""
    if isinstance(value, list):
        value = {str(i): v for i, v in enumerate(value)}
    if isinstance(value, dict):
        stored = {}
        for key, child in value.items():
            _check_key(key)
            kept = _store(child)
            if kept is not None:
                stored[key] = kept
        return stored or None
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        raise _BadRequest("Invalid data; numbers must be finite")
    return value


def _render(node: Json) -> Json:
    if not isinstance(node, dict):
        return node
    rendered = {key: _render(child) for key, child in node.items()}
    if all(key.isascii() and key.isdigit() and (key == "0" or key[0] != "0") for key in rendered):
        largest = max(int(key) for key in rendered)
        if 2 * len(rendered) > largest + 1:
            array: list[Json] = [None] * (largest + 1)
            for key, child in rendered.items():
                array[int(key)] = child
            return array
    return rendered


def _at(root: Json, keys: tuple[str, ...]) -> Json:
    node = root
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _write(root: Json, keys: tuple[str, ...], value: Json) -> Json:
    """Write a stored value in place (None deletes, emptied parents vanish); return the new root."""
    if not keys:
        return value
    if not isinstance(root, dict):
        root = {}
    path = [root]
    node = root
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            if value is None:
                return root or None
            child = node[key] = {}
        path.append(child)
        node = child
    if value is None:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    for depth in range(len(path) - 1, 0, -1):  # prune emptied parents, innermost first
        if path[depth]:
            break
        del path[depth - 1][keys[depth - 1]]
    return root or None


class _PushIds:
    """20-character ids: 8 of milliseconds, 12 random, incremented within one millisecond."""

    def __init__(self) -> None:
        self._last_ms = -1
        self._last_random = [0] * 12

    def next(self) -> str:
        now = int(time.time() * 1000)
        if now == self._last_ms:
            for i in range(11, -1, -1):
                if self._last_random[i] != 63:
                    self._last_random[i] += 1
                    break
                self._last_random[i] = 0
        else:
            self._last_ms = now
            self._last_random = [random.randrange(64) for _ in range(12)]
        stamp = []
        for _ in range(8):
            stamp.append(_PUSH_CHARS[now % 64])
            now //= 64
        return "".join(reversed(stamp)) + "".join(_PUSH_CHARS[i] for i in self._last_random)


# --- streams -------------------------------------------------------------------------------


_CLOSE = "close"
_ABORT = "abort"


class _Aborted(Exception):
    """Raised inside a streaming response so the server resets the connection mid-body."""


def _frame(event: str, data: Json) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# --- queries -------------------------------------------------------------------------------


_QUERY_PARAMS = ("orderBy", "limitToFirst", "limitToLast", "startAt", "endAt", "equalTo")


def _key_rank(key: str) -> tuple[int, int, str]:
    """`$key` order: keys that are 32-bit integers first, numerically, then the others as text."""
    if key.lstrip("-").isdigit() and -(2**31) <= int(key) < 2**31 and str(int(key)) == key:
        return (0, int(key), "")
    return (1, 0, key)


def _value_rank(value: Json) -> tuple[Any, ...]:
    """Value order: null, false, true, numbers, strings, objects."""
    if value is None:
        return (0,)
    if value is False:
        return (1,)
    if value is True:
        return (2,)
    if isinstance(value, int | float):
        return (3, value)
    if isinstance(value, str):
        return (4, value)
    return (5,)


@dataclass(frozen=True)
class _Query:
    order_by: str
    first: int | None = None
    last: int | None = None
    start: Json = None
    end: Json = None
    equal: Json = None
    has_start: bool = False
    has_end: bool = False
    has_equal: bool = False

    @classmethod
    def parse(cls, params: Any) -> _Query | None:
        given = {name: params[name] for name in _QUERY_PARAMS if name in params}
        if not given:
            return None
        if "orderBy" not in given:
            raise _BadRequest("orderBy must be defined when other query parameters are defined")
        try:
            values = {name: json.loads(raw) for name, raw in given.items()}
        except ValueError:
            raise _BadRequest("Constraint index field must be a JSON primitive") from None
        order_by = values["orderBy"]
        if not isinstance(order_by, str) or not order_by:
            raise _BadRequest("orderBy must be a valid JSON encoded path")
        limits = {}
        for name in ("limitToFirst", "limitToLast"):
            if name in values:
                limit = values[name]
                if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
                    raise _BadRequest(f"{name} must be a positive integer")
                limits[name] = limit
        if len(limits) == 2:
            raise _BadRequest("limitToFirst and limitToLast cannot both be set")
        return cls(
            order_by,
            limits.get("limitToFirst"),
            limits.get("limitToLast"),
            values.get("startAt"),
            values.get("endAt"),
            values.get("equalTo"),
            "startAt" in values,
            "endAt" in values,
            "equalTo" in values,
        )

    def _rank(self, key: str, value: Json) -> tuple[Any, ...]:
        if self.order_by == "$key":
            return (_key_rank(key),)
        ordered = value if self.order_by == "$value" else _child_value(value, self.order_by)
        return (_value_rank(ordered), _key_rank(key))

    def _bound(self, bound: Json) -> tuple[Any, ...]:
        return (_key_rank(str(bound)),) if self.order_by == "$key" else (_value_rank(bound),)

    def apply(self, node: Json) -> Json:
        """The children of `node` this query selects, as a stored object (None when none)."""
        if not isinstance(node, dict):
            return None
        ranked = sorted(node.items(), key=lambda kv: self._rank(*kv))
        kept = []
        for key, value in ranked:
            rank = self._rank(key, value)[:1]
            if self.has_equal and rank != self._bound(self.equal):
                continue
            if self.has_start and rank < self._bound(self.start):
                continue
            if self.has_end and rank > self._bound(self.end):
                continue
            kept.append((key, value))
        if self.first is not None:
            kept = kept[: self.first]
        if self.last is not None:
            kept = kept[-self.last :]
        return dict(kept) or None


def _child_value(value: Json, path: str) -> Json:
    node = value
    for key in (part for part in path.split("/") if part):
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


@dataclass(eq=False)
class _Stream:
    ns: str
    keys: tuple[str, ...]
    queue: asyncio.Queue[bytes | str] = field(default_factory=asyncio.Queue)
    query: _Query | None = None
    window: Json = None  # with a query: the children last sent

    def send(self, event: str, data: Json) -> None:
        self.queue.put_nowait(_frame(event, data))

    def end(self, how: str = _CLOSE) -> None:
        self.queue.put_nowait(how)


def _under(keys: tuple[str, ...], prefix: tuple[str, ...]) -> bool:
    return keys[: len(prefix)] == prefix


class Hub:
    """The data of every namespace and the open streams; everything runs on one loop."""

    def __init__(self, *, keepalive: float = 30.0, token: str | None = None) -> None:
        self.keepalive = keepalive
        self.token = token
        self.redirect = False
        self.hold = False
        self.unauthorized = 0
        self._data: dict[str, Json] = {}
        self._denied: set[tuple[str, tuple[str, ...]]] = set()
        self._streams: set[_Stream] = set()
        self._push_ids = _PushIds()
        self.wire: WireSide | None = None  # set by the WebSocket endpoint built on this hub

    # reads and writes

    def read(self, ns: str, keys: tuple[str, ...], query: _Query | None = None) -> Json:
        node = _at(self._data.get(ns), keys)
        return _render(query.apply(node) if query is not None else node)

    def denied(self, ns: str, keys: tuple[str, ...]) -> bool:
        return any(n == ns and _under(keys, prefix) for n, prefix in self._denied)

    def put(self, ns: str, keys: tuple[str, ...], value: Json) -> None:
        stored = _store(value)
        old = copy.deepcopy(_at(self._data.get(ns), keys))
        self._data[ns] = _write(self._data.get(ns), keys, stored)
        self._publish(ns, keys, old, None)

    def patch(self, ns: str, keys: tuple[str, ...], children: dict[str, Json]) -> None:
        writes = [(_keys(path), _store(value)) for path, value in children.items()]
        if any(not child for child, _ in writes):
            raise _BadRequest("Invalid data; a child path of a PATCH is empty")
        old = copy.deepcopy(_at(self._data.get(ns), keys))
        root = self._data.get(ns)
        for child, value in writes:
            root = _write(root, keys + child, value)
        self._data[ns] = root
        patch = {"/".join(child): _render(value) for child, value in writes}
        self._publish(ns, keys, old, patch)

    def push(self, ns: str, keys: tuple[str, ...], value: Json) -> str:
        name = self._push_ids.next()
        self.put(ns, (*keys, name), value)
        return name

    def _publish(self, ns: str, keys: tuple[str, ...], old: Json, patch: dict[str, Json] | None) -> None:
        """Events for a write at `keys`, whose value there was `old`, to every stream it touches."""
        new = _at(self._data.get(ns), keys)
        if old == new:
            return  # the database sends nothing for a write that changes nothing
        if self.wire is not None:
            self.wire.publish(ns, keys, old, new, patch)
        for stream in self._streams:
            if stream.ns != ns:
                continue
            if stream.query is not None:
                if _under(keys, stream.keys) or _under(stream.keys, keys):
                    self._send_window(stream)
                continue
            if _under(keys, stream.keys):  # at or below the stream's location
                relative = "/" + "/".join(keys[len(stream.keys) :])
                if patch is not None:
                    stream.send("patch", {"path": relative, "data": patch})
                else:
                    stream.send("put", {"path": relative, "data": _render(new)})
            elif _under(stream.keys, keys):  # above it: the new value at the location, whole
                below = stream.keys[len(keys) :]
                before, after = _at(old, below), _at(new, below)
                if before != after:
                    stream.send("put", {"path": "/", "data": _render(after)})

    def _send_window(self, stream: _Stream) -> None:
        """A query stream: one `put` per child that entered, changed in or left the window."""
        assert stream.query is not None
        window = stream.query.apply(_at(self._data.get(stream.ns), stream.keys)) or {}
        before = stream.window or {}
        for key in [*(k for k in before if k not in window), *window]:
            if before.get(key) != window.get(key):
                stream.send("put", {"path": f"/{key}", "data": _render(window.get(key))})
        stream.window = copy.deepcopy(window)

    # streams

    def open(self, ns: str, keys: tuple[str, ...], query: _Query | None = None) -> _Stream:
        stream = _Stream(ns, keys, query=query)
        node = _at(self._data.get(ns), keys)
        if query is not None:
            stream.window = copy.deepcopy(query.apply(node))
        stream.send("put", {"path": "/", "data": self.read(ns, keys, query)})
        self._streams.add(stream)
        return stream

    def forget(self, stream: _Stream) -> None:
        self._streams.discard(stream)

    def open_streams(self, ns: str | None = None) -> int:
        return sum(1 for stream in self._streams if ns is None or stream.ns == ns)

    def drop(self, mode: str = _ABORT) -> int:
        for stream in self._streams:
            stream.end(_ABORT if mode == _ABORT else _CLOSE)
        return len(self._streams) + (self.wire.drop(mode) if self.wire is not None else 0)

    def revoke(self, new_token: str | None = None) -> int:
        if new_token is not None:
            self.token = new_token
        for stream in self._streams:
            stream.send("auth_revoked", "credential is no longer valid")
            stream.end()
        return len(self._streams) + (self.wire.revoke() if self.wire is not None else 0)

    def cancel(self, ns: str, keys: tuple[str, ...]) -> int:
        self._denied.add((ns, keys))
        hit = [stream for stream in self._streams if stream.ns == ns and _under(stream.keys, keys)]
        for stream in hit:
            stream.send("cancel", None)
            stream.end()
        return len(hit) + (self.wire.cancel(ns, keys) if self.wire is not None else 0)

    def inject(self, ns: str, keys: tuple[str, ...], event: str, raw: bytes) -> int:
        """Send a raw, possibly malformed event to the streams open at exactly this path: the
        fuzz tests' way to put bytes on the wire that no real write could produce."""
        hit = [stream for stream in self._streams if stream.ns == ns and stream.keys == keys]
        for stream in hit:
            stream.queue.put_nowait(b"event: " + event.encode() + b"\ndata: " + raw + b"\n\n")
        return len(hit)

    def reset(self) -> None:
        self._data.clear()
        self._denied.clear()


class _EventStream(Response):
    """An EventSource response that also watches for the client going away.

    Starlette's StreamingResponse notices a disconnect only on some ASGI servers; a stream
    with no traffic must still be forgotten as soon as its client leaves.
    """

    def __init__(self, hub: Hub, stream: _Stream) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.hub = hub
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                    ],
                }
            )
            pump = asyncio.ensure_future(self._pump(send))
            gone = asyncio.ensure_future(self._disconnected(receive))
            try:
                await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (pump, gone):
                    task.cancel()
                await asyncio.gather(pump, gone, return_exceptions=True)
            error = pump.exception() if pump.done() and not pump.cancelled() else None
            if error is not None:
                raise error  # an abort: the server resets the connection mid-body
        finally:
            self.hub.forget(self.stream)

    async def _pump(self, send: Send) -> None:
        queue = self.stream.queue
        while True:
            try:
                if self.hub.keepalive > 0:
                    async with asyncio.timeout(self.hub.keepalive):
                        item = await queue.get()
                else:
                    item = await queue.get()
            except TimeoutError:
                item = _frame("keep-alive", None)
            if item == _ABORT:
                raise _Aborted("dropped by the test hook")
            if item == _CLOSE:
                self.hub.forget(self.stream)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            assert isinstance(item, bytes)
            await send({"type": "http.response.body", "body": item, "more_body": True})

    @staticmethod
    async def _disconnected(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


# --- HTTP ----------------------------------------------------------------------------------


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _request_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.query_params.get("access_token") or request.query_params.get("auth")


def build_app(hub: Hub, wire: WireSide) -> Starlette:

    async def data(request: Request) -> Response:
        raw = request.scope["path"]
        if not raw.endswith(".json"):
            return _error(400, "Append .json to the path of a REST request")
        try:
            keys = _keys(raw[: -len(".json")])
        except _BadRequest as exc:
            return _error(400, str(exc))
        ns = request.query_params.get("ns") or DEFAULT_NAMESPACE
        method = request.method
        if method == "POST" and "x-http-method-override" in request.headers:
            method = request.headers["x-http-method-override"].upper()
        if hub.token is not None and _request_token(request) != hub.token:
            hub.unauthorized += 1
            return _error(401, "Unauthorized request.")
        streaming = method == "GET" and "text/event-stream" in request.headers.get("accept", "")
        try:
            query = _Query.parse(request.query_params) if method == "GET" else None
        except _BadRequest as exc:
            return _error(400, str(exc))
        if method == "GET" and hub.denied(ns, keys):
            return _error(401, "Permission denied")
        if streaming:
            if hub.hold:
                return _error(503, "Service Unavailable (held by the test hook)")
            if hub.redirect and "hop" not in request.query_params:
                again = urlencode([*request.query_params.multi_items(), ("hop", "1")])
                return Response(status_code=307, headers={"location": f"{raw}?{again}"})
            return _EventStream(hub, hub.open(ns, keys, query))
        silent = request.query_params.get("print") == "silent"
        try:
            if method == "GET":
                value = hub.read(ns, keys, query)
                if request.query_params.get("shallow") == "true" and isinstance(value, dict):
                    value = dict.fromkeys(value, True)
                elif request.query_params.get("shallow") == "true" and isinstance(value, list):
                    value = {str(i): True for i, v in enumerate(value) if v is not None}
                result: Json = value
            elif method == "DELETE":
                hub.put(ns, keys, None)
                result = None
            else:
                try:
                    body = json.loads(await request.body())
                except ValueError:
                    return _error(400, "Invalid data; couldn't parse JSON object, array, or value.")
                if method == "PUT":
                    hub.put(ns, keys, body)
                    result = _render(_store(body))
                elif method == "POST":
                    result = {"name": hub.push(ns, keys, body)}
                elif method == "PATCH":
                    if not isinstance(body, dict):
                        return _error(400, "Invalid data; PATCH needs an object")
                    hub.patch(ns, keys, body)
                    result = body
                else:
                    return _error(405, f"{method} is not supported")
        except _BadRequest as exc:
            return _error(400, str(exc))
        if silent:
            return Response(status_code=204)
        return Response(json.dumps(result, separators=(",", ":")), media_type="application/json")

    async def streams(request: Request) -> Response:
        open_streams = hub.open_streams(request.query_params.get("ns"))
        return JSONResponse({"open": open_streams, "unauthorized": hub.unauthorized})

    async def drop(request: Request) -> Response:
        return JSONResponse({"dropped": hub.drop(request.query_params.get("mode", _ABORT))})

    async def revoke(request: Request) -> Response:
        return JSONResponse({"revoked": hub.revoke(request.query_params.get("token"))})

    async def cancel(request: Request) -> Response:
        ns = request.query_params.get("ns") or DEFAULT_NAMESPACE
        keys = _keys(request.query_params.get("path", "/"))
        return JSONResponse({"cancelled": hub.cancel(ns, keys)})

    async def redirect(request: Request) -> Response:
        hub.redirect = request.query_params.get("on", "1") == "1"
        return JSONResponse({"redirect": hub.redirect})

    async def hold(request: Request) -> Response:
        hub.hold = request.query_params.get("on", "1") == "1"
        return JSONResponse({"hold": hub.hold})

    async def reset(request: Request) -> Response:
        hub.reset()
        return JSONResponse({})

    async def inject(request: Request) -> Response:
        ns = request.query_params.get("ns") or DEFAULT_NAMESPACE
        keys = _keys(request.query_params.get("path", "/"))
        event = request.query_params.get("event", "put")
        return JSONResponse({"injected": hub.inject(ns, keys, event, await request.body())})

    async def wire_stats(request: Request) -> Response:
        return JSONResponse(wire.stats(request.query_params.get("ns")))

    async def wire_reset(request: Request) -> Response:
        return JSONResponse({"reset": wire.reset(request.query_params["host"])})

    async def wire_shutdown(request: Request) -> Response:
        return JSONResponse({"shutdown": wire.shutdown(request.query_params.get("reason", "shut down"))})

    async def wire_host(request: Request) -> Response:
        wire.handshake_host = request.query_params.get("host") or None
        return JSONResponse({"host": wire.handshake_host})

    async def wire_accept(request: Request) -> Response:
        wire.accepted.add(request.query_params["token"])
        return JSONResponse({})

    return Starlette(
        routes=[
            Route("/_standin/wire_accept", wire_accept, methods=["POST"]),
            WebSocketRoute("/.ws", wire.serve),
            Route("/_standin/wire", wire_stats, methods=["GET"]),
            Route("/_standin/wire_reset", wire_reset, methods=["POST"]),
            Route("/_standin/wire_shutdown", wire_shutdown, methods=["POST"]),
            Route("/_standin/wire_host", wire_host, methods=["POST"]),
            Route("/_standin/streams", streams, methods=["GET"]),
            Route("/_standin/drop", drop, methods=["POST"]),
            Route("/_standin/revoke", revoke, methods=["POST"]),
            Route("/_standin/cancel", cancel, methods=["POST"]),
            Route("/_standin/redirect", redirect, methods=["POST"]),
            Route("/_standin/hold", hold, methods=["POST"]),
            Route("/_standin/reset", reset, methods=["POST"]),
            Route("/_standin/inject", inject, methods=["POST"]),
            Route("/{path:path}", data, methods=list(_METHODS)),
        ]
    )


# --- the child process for tests -------------------------------------------------------------


class RtdbStandin(_Child):
    """The stand-in as a child process on a fixed port; the hooks are async HTTP calls."""

    def __init__(self, port: int | None = None, *, keepalive: float = 30.0, token: str | None = None) -> None:
        super().__init__(port)
        self.keepalive = keepalive
        self.token = token

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "listeners_testkit.rtdb_app", "--port", str(self.port)]
        command += ["--keepalive", str(self.keepalive)]
        if self.token is not None:
            command += ["--token", self.token]
        return command

    def __enter__(self) -> Self:
        self.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def hook(self, method: str, name: str, **params: str) -> Any:
        async with httpx.AsyncClient(base_url=self.url, timeout=10.0) as http:
            response = await http.request(method, f"/_standin/{name}", params=params)
            response.raise_for_status()
            return response.json()

    async def open_streams(self, ns: str | None = None) -> int:
        result = await self.hook("GET", "streams", **({"ns": ns} if ns else {}))
        return int(result["open"])

    async def unauthorized(self) -> int:
        return int((await self.hook("GET", "streams"))["unauthorized"])

    async def drop(self, mode: str = _ABORT) -> int:
        return int((await self.hook("POST", "drop", mode=mode))["dropped"])

    async def revoke(self, new_token: str | None = None) -> int:
        if new_token is not None:
            self.token = new_token  # a restart keeps requiring it
        return int(
            (await self.hook("POST", "revoke", **({"token": new_token} if new_token else {})))["revoked"]
        )

    async def cancel(self, path: str, ns: str | None = None) -> int:
        return int((await self.hook("POST", "cancel", path=path, **({"ns": ns} if ns else {})))["cancelled"])

    async def inject(self, path: str, event: str, raw: bytes, ns: str | None = None) -> int:
        """Raw bytes as one event's data to the streams open at `path` (see Hub.inject)."""
        params = {"path": path, "event": event, **({"ns": ns} if ns else {})}
        async with httpx.AsyncClient(base_url=self.url, timeout=10.0) as http:
            response = await http.post("/_standin/inject", params=params, content=raw)
            response.raise_for_status()
            return int(response.json()["injected"])

    async def set_redirect(self, on: bool) -> None:
        await self.hook("POST", "redirect", on="1" if on else "0")

    async def set_hold(self, on: bool) -> None:
        await self.hook("POST", "hold", on="1" if on else "0")

    @property
    def ws_url(self) -> str:
        """What the wire client and the SDK take as the database URL (with `?ns=`)."""
        return f"ws://127.0.0.1:{self.port}"

    async def wire(self, ns: str | None = None) -> dict[str, Any]:
        """The WebSocket side: connections and listens open now, and counters since the start."""
        return dict(await self.hook("GET", "wire", **({"ns": ns} if ns else {})))

    async def wire_reset(self, host: str) -> int:
        return int((await self.hook("POST", "wire_reset", host=host))["reset"])

    async def wire_shutdown(self, reason: str) -> int:
        return int((await self.hook("POST", "wire_shutdown", reason=reason))["shutdown"])

    async def wire_host(self, host: str) -> None:
        await self.hook("POST", "wire_host", host=host)

    async def wire_accept(self, token: str) -> None:
        """Accept `token` too on WebSockets, from now on."""
        await self.hook("POST", "wire_accept", token=token)
