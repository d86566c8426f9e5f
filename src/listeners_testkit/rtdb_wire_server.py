"""The Realtime Database wire protocol (the Firebase SDKs' WebSocket) on the REST stand-in's data.

`build_app` in `listeners_testkit.rtdb_server` mounts `WireEndpoint` at `/.ws`; both share one
`Hub`, so a write through REST reaches the wire listens and a write over the wire reaches the
REST streams. The protocol as the JS SDK (`@firebase/database` 1.1.5: `PersistentConnection`,
`Connection`, `WebSocketConnection`, `Constants`) speaks it; what the stand-in does with each
message is listed in docs/rtdb.md ("The stand-in"), with what it cannot show about production.

Envelopes, one JSON text per message; one longer than 16,384 characters goes as a frame holding
the count of frames, then the frames (either side); a frame "0" from the client is a keep-alive.

  server control  {"t":"c","d":{"t":"h","d":{"ts":ms,"v":"5","h":host,"s":session}}}  handshake
                  {"t":"c","d":{"t":"o","d":{}}}           pong, the answer to a ping
                  {"t":"c","d":{"t":"r","d":host}}         reset: connect to that host instead
                  {"t":"c","d":{"t":"s","d":reason}}       shutdown: the server ends the session
  client control  {"t":"c","d":{"t":"p","d":{}}}           ping
  client request  {"t":"d","d":{"r":n,"a":action,"b":body}}, answered by
                  {"t":"d","d":{"r":n,"b":{"s":"ok"|error,"d":data}}}
                  actions: auth / gauth {cred}, unauth, q {p, q?, t?, h} listen, n {p, q?, t?}
                  unlisten, p {p, d} set, m {p, d} update, g {p, q} get, s (stats), o / om / oc
                  (on-disconnect: answered, not kept)
  server push     {"t":"d","d":{"a":"d"|"m","b":{"p":path,"d":data,"t"?:tag}}}  data, merge
                  {"t":"d","d":{"a":"c","b":{"p":path,"q"?:[query]}}}          listen revoked
                  {"t":"d","d":{"a":"ac","b":{"s":status,"d":explanation}}}    auth revoked
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from listeners_testkit.rtdb_server import (
    DEFAULT_NAMESPACE,
    Hub,
    _at,
    _BadRequest,
    _keys,
    _Query,
    _render,
    _under,
)

Json = Any

MAX_FRAME = 16_384  # characters per WebSocket frame, as the SDK sends them
PROTOCOL_VERSION = "5"
_CLOSE = object()


def _path_string(keys: tuple[str, ...]) -> str:
    return "/".join(keys)


def query_key(query: Json) -> str:
    """A listen's identity within its path: the query object, canonical (None: the default)."""
    if not query:
        return "default"
    return json.dumps(query, sort_keys=True, separators=(",", ":"))


def wire_query(query: Json) -> _Query | None:
    """The SDK's query object (`i`, `l`, `vf`, `sp`, `ep`, ...) as the REST stand-in's `_Query`.

    `sn` / `en` (a key bound after an equal index value) and `sin` / `ein` false (startAfter,
    endBefore) are not implemented: the bounds are inclusive and by index value alone."""

    if not query:
        return None
    if not isinstance(query, dict):
        raise _BadRequest("a query must be an object")
    index = query.get("i", ".priority")
    order_by = {".key": "$key", ".value": "$value", ".priority": "$priority"}.get(str(index), str(index))
    limit = query.get("l")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
        raise _BadRequest("a limit must be a positive integer")
    view_from = query.get("vf", "l")
    return _Query(
        order_by,
        first=limit if limit is not None and view_from == "l" else None,
        last=limit if limit is not None and view_from == "r" else None,
        start=query.get("sp"),
        end=query.get("ep"),
        has_start="sp" in query,
        has_end="ep" in query,
    )


@dataclass(eq=False)
class _Listen:
    keys: tuple[str, ...]
    query_object: Json
    tag: int | None
    query: _Query | None
    window: Json = None  # with a query: the children last sent


@dataclass(eq=False)
class _Connection:
    ws: WebSocket
    ns: str
    session: str
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    listens: dict[tuple[tuple[str, ...], str], _Listen] = field(default_factory=dict)
    auth: str | None = None

    def send(self, message: Json) -> None:
        self.queue.put_nowait(message)

    def push(self, action: str, body: Json) -> None:
        self.send({"t": "d", "d": {"a": action, "b": body}})

    def control(self, kind: str, data: Json) -> None:
        self.send({"t": "c", "d": {"t": kind, "d": data}})

    def end(self, code: int = 1000) -> None:
        self.queue.put_nowait((_CLOSE, code))


class WireEndpoint:
    """The `/.ws` endpoint: its connections and their listens, fed by the hub's writes."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        hub.wire = self
        self.connections: set[_Connection] = set()
        self.connects = 0  # connections accepted since the start
        self.auths = 0  # auth / gauth requests accepted
        self.refused_auths = 0
        self.listen_requests = 0
        self.pings = 0
        self.keepalives = 0  # "0" frames from clients
        self.handshake_host: str | None = None  # the `h` of the handshake; None: the Host header
        self.accepted: set[str] = set()  # tokens accepted besides the hub's (a rotation)
        self.creds: list[str] = []  # the tokens accepted, in order (the last 20)
        self._sessions = 0

    # --- the hub's side -----------------------------------------------------------------

    def authorized(self, conn: _Connection) -> bool:
        """A token is checked when it is presented; `revoke` takes it back."""
        return self.hub.token is None or conn.auth is not None

    def publish(
        self, ns: str, keys: tuple[str, ...], old: Json, new: Json, patch: dict[str, Json] | None
    ) -> None:
        """A write at `keys` (value there was `old`, is `new`) to every wire listen it touches."""
        for conn in self.connections:
            if conn.ns != ns or not self.authorized(conn):
                continue
            for listen in conn.listens.values():
                if not (_under(keys, listen.keys) or _under(listen.keys, keys)):
                    continue
                if listen.query is not None:
                    self._send_window(conn, listen)
                elif _under(keys, listen.keys):  # at or below the listen: the write itself
                    if patch is not None:
                        conn.push("m", {"p": _path_string(keys), "d": patch})
                    else:
                        conn.push("d", {"p": _path_string(keys), "d": _render(new)})
                elif patch is not None:  # a merge above it: the child paths that reach it
                    reaching = {
                        child: value
                        for child, value in patch.items()
                        if _under(keys + _keys(child), listen.keys)
                        or _under(listen.keys, keys + _keys(child))
                    }
                    if reaching:
                        conn.push("m", {"p": _path_string(keys), "d": reaching})
                else:  # a set above it: the listened node's new value, whole
                    below = listen.keys[len(keys) :]
                    before, after = _at(old, below), _at(new, below)
                    if before != after:
                        conn.push("d", {"p": _path_string(listen.keys), "d": _render(after)})

    def _send_window(self, conn: _Connection, listen: _Listen) -> None:
        """One tagged merge at the query's path: every child that entered, changed in or left
        the window (null), in one message, so the client sees the window move at once."""

        assert listen.query is not None
        window = listen.query.apply(_at(self.hub._data.get(conn.ns), listen.keys)) or {}
        before = listen.window or {}
        changed = {
            key: _render(window.get(key))
            for key in [*(k for k in before if k not in window), *window]
            if before.get(key) != window.get(key)
        }
        listen.window = copy.deepcopy(window)
        if changed:
            conn.push("m", {"p": _path_string(listen.keys), "d": changed, "t": listen.tag})

    def drop(self, mode: str) -> int:
        for conn in self.connections:
            conn.end(1011 if mode == "abort" else 1001)
        return len(self.connections)

    def revoke(self) -> int:
        """`ac` to every authenticated connection, which is no longer authenticated."""
        hit = [conn for conn in self.connections if conn.auth is not None]
        for conn in hit:
            conn.auth = None
            conn.push("ac", {"s": "expired_token", "d": "Auth token is expired."})
        return len(hit)

    def cancel(self, ns: str, keys: tuple[str, ...]) -> int:

        hit = 0
        for conn in self.connections:
            if conn.ns != ns:
                continue
            for ident, listen in list(conn.listens.items()):
                if _under(listen.keys, keys):
                    del conn.listens[ident]
                    body: dict[str, Json] = {"p": _path_string(listen.keys)}
                    if listen.query_object:
                        body["q"] = [listen.query_object]
                    conn.push("c", body)
                    hit += 1
        return hit

    def reset(self, host: str) -> int:
        """Tell every connection to go to `host` instead, and close it."""
        for conn in self.connections:
            conn.control("r", host)
            conn.end()
        return len(self.connections)

    def shutdown(self, reason: str) -> int:
        for conn in self.connections:
            conn.control("s", reason)
            conn.end()
        return len(self.connections)

    def stats(self, ns: str | None = None) -> dict[str, Any]:
        conns = [conn for conn in self.connections if ns is None or conn.ns == ns]
        return {
            "connections": len(conns),
            "listens": sum(len(conn.listens) for conn in conns),
            "connects": self.connects,
            "auths": self.auths,
            "refused_auths": self.refused_auths,
            "listen_requests": self.listen_requests,
            "pings": self.pings,
            "keepalives": self.keepalives,
            "creds": self.creds[-20:],
        }

    # --- one connection -----------------------------------------------------------------

    async def serve(self, ws: WebSocket) -> None:

        if self.hub.hold:
            await ws.close(code=1013)  # before accept: the handshake is answered 403
            return
        await ws.accept()
        self._sessions += 1
        ns = ws.query_params.get("ns") or DEFAULT_NAMESPACE
        conn = _Connection(ws, ns, f"standin-{self._sessions}")
        self.connections.add(conn)
        self.connects += 1
        host = self.handshake_host or ws.headers.get("host", "127.0.0.1")
        ts = int(time.time() * 1000)
        conn.control("h", {"ts": ts, "v": PROTOCOL_VERSION, "h": host, "s": conn.session})
        writer = asyncio.ensure_future(self._write(conn))
        reader = asyncio.ensure_future(self._read(conn))
        try:
            await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.connections.discard(conn)
            for task in (writer, reader):
                task.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
            with contextlib.suppress(Exception):
                await ws.close()

    async def _write(self, conn: _Connection) -> None:
        while True:
            item = await conn.queue.get()
            if isinstance(item, tuple) and item and item[0] is _CLOSE:
                self.connections.discard(conn)
                await conn.ws.close(code=item[1])
                return
            text = json.dumps(item, separators=(",", ":"))
            if len(text) <= MAX_FRAME:
                await conn.ws.send_text(text)
                continue
            frames = [text[i : i + MAX_FRAME] for i in range(0, len(text), MAX_FRAME)]
            await conn.ws.send_text(str(len(frames)))
            for frame in frames:
                await conn.ws.send_text(frame)

    async def _read(self, conn: _Connection) -> None:
        pending: list[str] | None = None
        expected = 0
        try:
            while True:
                data = await conn.ws.receive_text()
                if pending is not None:
                    pending.append(data)
                    if len(pending) < expected:
                        continue
                    data, pending = "".join(pending), None
                elif data == "0":
                    self.keepalives += 1
                    continue
                elif len(data) <= 6 and data.isdigit():
                    pending, expected = [], int(data)
                    continue
                self._message(conn, json.loads(data))
        except WebSocketDisconnect:
            return

    def _message(self, conn: _Connection, message: Json) -> None:
        layer, data = message.get("t"), message.get("d")
        if layer == "c":
            if isinstance(data, dict) and data.get("t") == "p":
                self.pings += 1
                conn.control("o", {})
            return
        if layer != "d" or not isinstance(data, dict):
            return
        number, action, body = data.get("r"), data.get("a"), data.get("b") or {}
        status, result = self._request(conn, str(action), body)
        if number is not None:
            conn.send({"t": "d", "d": {"r": number, "b": {"s": status, "d": result}}})

    def _request(self, conn: _Connection, action: str, body: Json) -> tuple[str, Json]:

        hub = self.hub
        if action in ("auth", "gauth"):
            cred = body.get("cred")
            if hub.token is None or cred == hub.token or cred in self.accepted:
                conn.auth = str(cred)
                self.auths += 1
                self.creds = [*self.creds[-19:], str(cred)]
                return "ok", {"auth": None, "expires": int(time.time()) + 3600}
            conn.auth = None
            self.refused_auths += 1
            hub.unauthorized += 1
            return "invalid_token", "Invalid token in path"
        if action == "unauth":
            conn.auth = None
            return "ok", {}
        if action in ("s", "o", "om", "oc", "appcheck", "unappeck"):
            return "ok", {}
        try:
            keys = _keys(str(body.get("p", "/")))
            if action == "q":
                return self._listen(conn, keys, body)
            if action == "n":
                conn.listens.pop((keys, query_key(body.get("q"))), None)
                return "ok", {}
            if not self.authorized(conn):
                return "permission_denied", "Permission denied"
            if action == "g":
                if hub.denied(conn.ns, keys):
                    return "permission_denied", "Permission denied"
                return "ok", hub.read(conn.ns, keys, wire_query(body.get("q")))
            if action == "p":
                hub.put(conn.ns, keys, body.get("d"))
                return "ok", None
            if action == "m":
                children = body.get("d")
                if not isinstance(children, dict):
                    return "invalid_data", "a merge needs an object"
                hub.patch(conn.ns, keys, children)
                return "ok", None
        except _BadRequest as exc:
            return "invalid_data", str(exc)
        return "error", f"unknown action {action!r}"

    def _listen(self, conn: _Connection, keys: tuple[str, ...], body: Json) -> tuple[str, Json]:

        self.listen_requests += 1
        if not self.authorized(conn) or self.hub.denied(conn.ns, keys):
            return "permission_denied", "Permission denied"
        query_object = body.get("q")
        tag = body.get("t") if query_object else None
        query = wire_query(query_object)
        listen = _Listen(keys, query_object or None, tag, query)
        conn.listens[(keys, query_key(query_object))] = listen
        data = self.hub.read(conn.ns, keys, query)  # the full read before the answer
        if query is not None:
            listen.window = copy.deepcopy(query.apply(_at(self.hub._data.get(conn.ns), keys)))
        push: dict[str, Json] = {"p": _path_string(keys), "d": data}
        if tag is not None:
            push["t"] = tag
        conn.push("d", push)
        return "ok", {}
