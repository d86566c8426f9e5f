"""REST calls against one database: URLs, the access token, redirects, and error bodies.

`RtdbClient.stream()` makes a `NodeMirror` (`mirror.py`) and gives it what it needs
(`mirror.MirrorClient`): a token, its event stream opened on one of the client's connection
pools, a turn among the mirrors connecting, and forgetting it once it is closed.

The access token travels in the `Authorization: Bearer` header, not in the documented
`access_token` query parameter, so it never appears in a URL that httpx logs at INFO.
Redirects (the server may move a stream to another machine with a 307) are followed here
rather than by httpx, which drops that header on a redirect to another host; the header is
sent again only to the same host or to a Firebase database host over HTTPS.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urljoin, urlsplit, urlunsplit

import httpx

from listeners.source.access_tokens import TokenProvider
from listeners.source.rtdb.errors import RtdbError, read_error
from listeners.source.rtdb.mirror import DEFAULT_IDLE_TIMEOUT, ChangeHandler, FailureHandler, NodeMirror
from listeners.source.rtdb.sse import DEFAULT_MAX_EVENT_BYTES
from listeners.source.rtdb.tree import Json, split_path
from listeners_bridge.backoff import Backoff

_MAX_REDIRECTS = 5
_TOKEN_HOST_SUFFIXES = (".firebaseio.com", ".firebasedatabase.app")

_NO_BODY: Any = object()


STREAMS_PER_POOL = 100
# Streams that may be between their request and the server's first full read at once. When a
# link comes back, every stream of the instance reconnects within the same second; without a
# cap they all read their node and publish a fresh sync together, and the heap keeps the
# high-water mark of that burst (see docs/benchmarks.md, "Soak"). The rest wait their turn:
# a full read takes milliseconds, so 1,000 streams are through in about a second.
MAX_CONNECTING = 32


@dataclass(eq=False)
class _StreamPool:
    http: httpx.AsyncClient
    streams: int = 0


def _http_client(timeout: float) -> httpx.AsyncClient:
    # no cap on connections: each stream holds one, and they are counted per pool above
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=20)
    return httpx.AsyncClient(timeout=timeout, limits=limits)


def _encode(value: Json) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class RtdbClient:
    """REST calls and streams against one database.

    `base_url` is `https://<db>.firebaseio.com` (or a regional `firebasedatabase.app` URL),
    or an emulator or stand-in URL such as `http://127.0.0.1:9000` with `namespace=`; a
    `?ns=` in `base_url` is taken as the namespace too.
    """

    def __init__(
        self,
        base_url: str,
        *,
        namespace: str | None = None,
        tokens: TokenProvider | None = None,
        http: httpx.AsyncClient | None = None,
        timeout: float = 30.0,
        max_connecting: int = MAX_CONNECTING,
    ) -> None:
        parts = urlsplit(base_url)
        self.namespace = namespace or dict(parse_qsl(parts.query)).get("ns")
        self.base_url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self._host = parts.hostname
        self._tokens = tokens
        self._timeout = timeout
        self._own_http = http is None
        self._http = http or _http_client(timeout)
        self._streams: set[NodeMirror] = set()
        # Each stream holds a connection for its lifetime (HTTP/1.1: the REST API streams one
        # location per request). httpcore scans its whole pool on every request and response,
        # so 10,000 streams in one pool cost O(streams) per event, O(streams²) to start them:
        # streams are spread over pools of at most STREAMS_PER_POOL connections each.
        self._stream_pools: list[_StreamPool] = []
        self._pool_of: dict[NodeMirror, _StreamPool] = {}
        self.connecting = asyncio.Semaphore(max_connecting)
        # Told the cause of each mirror's reconnect (a few fixed words: the metrics' label).
        self.on_reconnect: Callable[[str], None] = lambda cause: None

    def url(self, keys: Sequence[str]) -> str:
        return self.base_url + "/" + "/".join(quote(key, safe="") for key in keys) + ".json"

    @property
    def open_streams(self) -> int:
        return sum(1 for stream in self._streams if stream.active)

    async def get(
        self, path: str = "/", *, shallow: bool = False, query: Mapping[str, str] | None = None
    ) -> Json:
        """`query`: REST query parameters, as for `stream`."""
        params = {**({"shallow": "true"} if shallow else {}), **(query or {})}
        response = await self._request("GET", path, params=params or None)
        return response.json()

    async def set(self, path: str, value: Json) -> None:
        """PUT: replace the node (None deletes it)."""
        await self._request("PUT", path, body=value, params={"print": "silent"})

    async def update(self, path: str, values: Mapping[str, Json]) -> None:
        """PATCH: write the named children (keys may be paths, 'a/b'); leave the others."""
        for key in values:
            if not split_path(key):
                raise ValueError(f"invalid child path {key!r} in update")
        await self._request("PATCH", path, body=dict(values), params={"print": "silent"})

    async def push(self, path: str, value: Json) -> str:
        """POST: add a child under a new push id and return the id."""
        response = await self._request("POST", path, body=value)
        return str(response.json()["name"])

    async def delete(self, path: str) -> None:
        await self._request("DELETE", path, params={"print": "silent"})

    def stream(
        self,
        path: str,
        on_change: ChangeHandler,
        *,
        on_failed: FailureHandler | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        backoff: Backoff | None = None,
        query: Mapping[str, str] | None = None,
    ) -> NodeMirror:
        """Start mirroring `path` over a streaming request; close the returned mirror (or the
        client) to stop.

        `query`: REST query parameters, values JSON-encoded as the REST API wants them, e.g.
        `{"orderBy": '"$key"', "limitToLast": "100"}`: the mirror then holds the query's window."""
        stream = NodeMirror(
            self,
            path,
            on_change,
            on_failed=on_failed,
            idle_timeout=idle_timeout,
            max_event_bytes=max_event_bytes,
            backoff=backoff,
            query=query,
        )
        self._streams.add(stream)
        if self._own_http:
            pool = min(self._stream_pools, key=lambda p: p.streams, default=None)
            if pool is None or pool.streams >= STREAMS_PER_POOL:
                pool = _StreamPool(_http_client(self._timeout))
                self._stream_pools.append(pool)
            pool.streams += 1
            self._pool_of[stream] = pool
        stream.start()
        return stream

    def stream_http(self, stream: NodeMirror) -> httpx.AsyncClient:
        """The HTTP client (connection pool) this mirror connects through."""
        pool = self._pool_of.get(stream)
        return self._http if pool is None else pool.http

    async def open_event_stream(
        self, mirror: NodeMirror, keys: Sequence[str], query: Mapping[str, str], *, token: str | None
    ) -> httpx.Response:
        """The node's `text/event-stream` GET, on the mirror's connection pool, redirects
        followed: the response open, its status not yet looked at (`mirror.MirrorClient`)."""
        return await self._send(
            "GET",
            keys,
            token=token,
            headers={"Accept": "text/event-stream", "Cache-Control": "no-cache"},
            params=query,
            stream=True,
            http=self.stream_http(mirror),
        )

    def forget(self, stream: NodeMirror) -> None:
        """The mirror is closed or failed for good: its place in a pool is free."""
        self._streams.discard(stream)
        pool = self._pool_of.pop(stream, None)
        if pool is not None:
            pool.streams -= 1

    @property
    def stream_pools(self) -> int:
        return len(self._stream_pools)

    async def aclose(self) -> None:
        await asyncio.gather(*(stream.close() for stream in list(self._streams)))
        if self._own_http:
            await asyncio.gather(self._http.aclose(), *(pool.http.aclose() for pool in self._stream_pools))

    async def token(self, *, refresh: bool = False) -> str | None:
        """The access token for the next request; None without a token provider."""
        if self._tokens is None:
            return None
        return await self._tokens(refresh=refresh)

    async def _request(
        self, method: str, path: str, *, body: Json = _NO_BODY, params: Mapping[str, str] | None = None
    ) -> httpx.Response:
        keys = split_path(path)
        content = None if body is _NO_BODY else _encode(body)
        headers = {"Content-Type": "application/json"} if content is not None else {}
        token = await self.token()
        response = await self._send(
            method, keys, token=token, params=params, headers=headers, content=content
        )
        if response.status_code == 401 and self._tokens is not None:
            token = await self.token(refresh=True)
            response = await self._send(
                method, keys, token=token, params=params, headers=headers, content=content
            )
        if not response.is_success:
            raise await read_error(response)
        return response

    def _may_carry_token(self, url: httpx.URL) -> bool:
        if url.host == self._host:
            return True
        return url.scheme == "https" and url.host.endswith(_TOKEN_HOST_SUFFIXES)

    async def _send(
        self,
        method: str,
        keys: Sequence[str],
        *,
        token: str | None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        stream: bool = False,
        http: httpx.AsyncClient | None = None,
    ) -> httpx.Response:
        url = httpx.URL(self.url(keys))
        query = {"ns": self.namespace} if self.namespace else {}
        url = url.copy_merge_params({**query, **(params or {})})
        # a stream has no read timeout of its own: NodeMirror's idle deadline covers it
        timeout = httpx.Timeout(self._timeout, read=None) if stream else httpx.USE_CLIENT_DEFAULT
        for _ in range(_MAX_REDIRECTS + 1):
            request_headers = dict(headers or {})
            if token is not None and self._may_carry_token(url):
                request_headers["Authorization"] = f"Bearer {token}"
            http = http or self._http
            request = http.build_request(
                method, url, headers=request_headers, content=content, timeout=timeout
            )
            response = await http.send(request, stream=stream, follow_redirects=False)
            location = response.headers.get("location")
            if response.status_code not in (301, 302, 303, 307, 308) or not location:
                return response
            await response.aclose()
            url = httpx.URL(urljoin(str(url), location))  # the Location carries its own query
            if response.status_code == 303:
                method, content = "GET", None
        raise RtdbError(310, f"more than {_MAX_REDIRECTS} redirects")
