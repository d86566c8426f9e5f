"""`WireClient`: every listen of the instance over a few WebSockets, as the Firebase SDKs do.

A drop-in for `RtdbClient` where the streams use it: `stream(path, on_change, on_failed=...,
query=...)` returns a `WireStream` with the same interface as the REST stream, `update` (and
`get`, `set`, `push`, `delete`) go over the wire too, `open_streams` and `aclose()`. Beyond it:
`degraded` / `reason` (for /healthz) and `stats()`.

How many connections: listens go to the least loaded connection with fewer than
`listens_per_connection` (2,500); a new one opens when all have that many, up to
`max_connections` (4), after which they share. So up to 2,500 users take one connection and
10,000 users take four (docs/rtdb.md, "How many connections").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit

from listeners.source.rtdb import Json, RtdbError, TokenProvider, split_path
from listeners.source.rtdb_wire.connection import Connection
from listeners.source.rtdb_wire.listen import ChangeHandler, FailureHandler, Listen, WireStream
from listeners.source.rtdb_wire.protocol import PROTOCOL_VERSION, PushIds, host_allowed, query_key, wire_query
from listeners_bridge.backoff import Backoff

log = logging.getLogger("listeners.source.rtdb_wire")

MAX_CONNECTIONS = 4
LISTENS_PER_CONNECTION = 2_500
MAX_PENDING_LISTENS = 256  # listens awaiting their answer at once, per connection
DOWN_GRACE = 30.0  # seconds a connection with listens may be down before the client is degraded
_FIREBASE_SUFFIXES = (".firebaseio.com", ".firebasedatabase.app")


def _namespace(parts: SplitResult, given: str | None) -> str | None:
    if given:
        return given
    query = dict(parse_qsl(parts.query))
    if "ns" in query:
        return query["ns"]
    host = parts.hostname or ""
    return host.split(".")[0] if host.endswith(_FIREBASE_SUFFIXES) else None


class WireClient:
    """Streams and requests against one database over the wire protocol.

    `base_url`: `https://<db>.firebaseio.com` (or a regional `firebasedatabase.app` URL), or an
    emulator or stand-in URL such as `http://127.0.0.1:9000` with `namespace=` (or `?ns=`);
    `ws://` and `wss://` are taken as they are.
    """

    def __init__(
        self,
        base_url: str,
        *,
        namespace: str | None = None,
        tokens: TokenProvider | None = None,
        max_connections: int = MAX_CONNECTIONS,
        listens_per_connection: int = LISTENS_PER_CONNECTION,
        max_pending_listens: int = MAX_PENDING_LISTENS,
        keepalive: float = 25.0,
        idle_timeout: float = 60.0,
        token_check_interval: float = 60.0,
        connect_timeout: float = 30.0,
        request_timeout: float = 30.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        backoff: Backoff | None = None,
    ) -> None:
        if max_connections < 1 or listens_per_connection < 1 or max_pending_listens < 1:
            raise ValueError("max_connections, listens_per_connection and max_pending_listens must be >= 1")
        parts = urlsplit(base_url)
        scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
        if scheme is None or not parts.netloc:
            raise ValueError(f"not a database URL: {base_url!r}")
        self.namespace = _namespace(parts, namespace)
        self.secure = scheme == "wss"
        self._scheme = scheme
        self.base_host = parts.netloc.lower()
        self.host = self.base_host  # where connections go: the server may move us (`h`, `r`)
        self._tokens = tokens
        self.max_connections = max_connections
        self.listens_per_connection = listens_per_connection
        self.max_pending_listens = max_pending_listens
        self.keepalive = keepalive
        self.idle_timeout = idle_timeout
        self.token_check_interval = token_check_interval
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.max_message_chars = max_message_bytes  # a character is at least a byte
        self.backoff = backoff or Backoff(base=1.0, cap=30.0)  # the SDK's, for admin credentials
        self.user_agent = f"Firebase/{PROTOCOL_VERSION}/listeners/python/AdminNode"
        self._connections: list[Connection] = []
        self._listens: dict[tuple[tuple[str, ...], str], Listen] = {}
        self._streams: dict[WireStream, Listen] = {}
        self._push_ids = PushIds()
        self._closed = False
        self.on_reconnect: Callable[[str], None] = lambda cause: None  # metrics: reconnects by cause

    # --- streams ---------------------------------------------------------------------------

    def stream(
        self,
        path: str,
        on_change: ChangeHandler,
        *,
        on_failed: FailureHandler | None = None,
        query: Mapping[str, str] | None = None,
        **_rest_only: Any,
    ) -> WireStream:
        """Start mirroring `path` (and `query`, in the REST form `RtdbClient.stream` takes);
        close the stream (or the client) to stop. ValueError for a path or query the database
        refuses. `idle_timeout`, `max_event_bytes` and `backoff` of the REST stream are the
        client's here and are ignored per stream."""
        if self._closed:
            raise RuntimeError("the client is closed")
        keys = split_path(path)
        wire = wire_query(query)
        ident = (keys, query_key(wire))
        stream = WireStream("/" + "/".join(keys), on_change, on_failed, self._release)
        listen = self._listens.get(ident)
        if listen is None:
            listen = self._listens[ident] = Listen(keys, wire)
            listen.join(stream)
            self._pick().add(listen)
        else:
            listen.join(stream)
        self._streams[stream] = listen
        return stream

    def _pick(self) -> Connection:
        room = [c for c in self._connections if c.load < self.listens_per_connection]
        if room:
            return min(room, key=lambda c: c.load)
        if len(self._connections) < self.max_connections:
            connection = Connection(self, len(self._connections))
            self._connections.append(connection)
            return connection
        return min(self._connections, key=lambda c: c.load)

    def _release(self, stream: WireStream) -> None:
        listen = self._streams.pop(stream, None)
        if listen is not None and listen.leave(stream) and self._listens.get(listen.ident) is listen:
            del self._listens[listen.ident]
            if listen.connection is not None:
                listen.connection.remove(listen)

    def failed(self, listen: Listen, reason: str, *, unlisten: bool = True) -> None:
        """A listen the server refused or cancelled: its streams fail for good."""
        if self._listens.get(listen.ident) is listen:
            del self._listens[listen.ident]
        if listen.connection is not None:
            listen.connection.remove(listen, unlisten=unlisten)
        for stream in listen.streams:
            self._streams.pop(stream, None)
        listen.fail(reason)

    @property
    def open_streams(self) -> int:
        return sum(1 for stream in self._streams if stream.active)

    @property
    def connections(self) -> int:
        """WebSockets open now (authenticated and ready)."""
        return sum(1 for c in self._connections if c.ready.is_set())

    @property
    def reason(self) -> str | None:
        """Why the client is degraded, or None: a credential refused or revoked, a token
        refresh that failed, a server shutdown, or a connection with listens down for longer
        than DOWN_GRACE seconds."""
        now = time.monotonic()
        for connection in self._connections:
            if connection.degraded_reason:
                return connection.degraded_reason
            down = now - connection.down_since if connection.down_since is not None else 0.0
            if connection.listens and down > DOWN_GRACE:
                why = connection.last_error or "connecting"
                return f"no connection to the database for {down:.0f}s: {why}"
        return None

    @property
    def degraded_reason(self) -> str | None:
        """`reason`, under the name the Listen source gives it (service.health reads that)."""
        return self.reason

    @property
    def degraded(self) -> bool:
        return self.reason is not None

    def stats(self) -> dict[str, Any]:
        return {
            "connections": [c.stats() for c in self._connections],
            "listens": len(self._listens),
            "streams": self.open_streams,
            "host": self.host,
        }

    # --- connections -----------------------------------------------------------------------

    def ws_url(self, last_session: str | None = None) -> str:
        params = {"v": PROTOCOL_VERSION}
        if self.namespace:
            params["ns"] = self.namespace
        if last_session:
            params["ls"] = last_session
        return f"{self._scheme}://{self.host}/.ws?{urlencode(params)}"

    def remember_host(self, host: Json) -> bool:
        """The server names the host to use (`h` of its hello, or a reset): kept when allowed."""
        if not host_allowed(host, self.base_host, self.secure):
            if host != self.host:
                log.warning("rtdb wire: the server named a host not allowed: %r", host)
            return False
        assert isinstance(host, str)
        self.host = host.lower()
        return True

    async def token(self, *, refresh: bool = False) -> str | None:
        if self._tokens is None:
            return None
        return await self._tokens(refresh=refresh)

    def _writer(self) -> Connection:
        if not self._connections:
            self._connections.append(Connection(self, 0))
        return self._connections[0]

    # --- requests over the wire --------------------------------------------------------------

    async def _call(self, action: str, path: str, body: dict[str, Json]) -> Json:
        keys = split_path(path)
        return await self._writer().call(action, {"p": "/" + "/".join(keys), **body}, self.request_timeout)

    async def get(self, path: str = "/", *, query: Mapping[str, str] | None = None) -> Json:
        wire = wire_query(query)
        return await self._call("g", path, {"q": wire or {}})

    async def set(self, path: str, value: Json) -> None:
        """Replace the node (None deletes it)."""
        await self._call("p", path, {"d": value})

    async def update(self, path: str, values: Mapping[str, Json]) -> None:
        """Write the named children (keys may be paths, 'a/b'); leave the others."""
        for key in values:
            if not split_path(key):
                raise ValueError(f"invalid child path {key!r} in update")
        await self._call("m", path, {"d": dict(values)})

    async def push(self, path: str, value: Json) -> str:
        """Add a child under a new push id (made here, as the SDKs do) and return the id."""
        name = self._push_ids.next()
        await self._call("p", f"{path.rstrip('/')}/{name}", {"d": value})
        return name

    async def delete(self, path: str) -> None:
        await self._call("p", path, {"d": None})

    async def aclose(self) -> None:
        self._closed = True
        for stream in list(self._streams):
            await stream.close()
        await asyncio.gather(*(connection.aclose() for connection in self._connections))
        if self._connections:
            log.debug("rtdb wire: closed %d connections", len(self._connections))


__all__ = ["RtdbError", "WireClient", "WireStream"]
