"""An asyncio client for the Firebase Realtime Database REST API and its streaming protocol.

`RtdbClient` reads and writes JSON over HTTP(S). `RtdbClient.stream(path, on_change)` opens a
`NodeStream`: one task that keeps a local mirror of the node from the server-sent events
(`put`, `patch`, `keep-alive`, `cancel`, `auth_revoked`) and calls `on_change(tree)` on the
loop after each applied event. No threads; httpx underneath. The protocol, and the local
stand-in server that implements it for tests, are described in
`listeners.local.rtdb_server`.

Choices, and why:
- A tree handed to `on_change` is never mutated afterwards. Each event copies only the
  containers on the written path, so unchanged subtrees are shared by identity between
  successive trees and a consumer can diff the previous tree against the new one cheaply.
- The access token travels in the `Authorization: Bearer` header, not in the documented
  `access_token` query parameter, so it never appears in a URL that httpx logs at INFO.
  Redirects (the server may move a stream to another machine with a 307) are followed
  here rather than by httpx, which drops that header on a redirect to another host; the
  header is sent again only to the same host or to a Firebase database host over HTTPS.
- A stream the server cancels (the rules no longer allow the read), and a stream whose
  single event exceeds `max_event_bytes`, fail for good: retrying would get the same
  answer. Everything else (end of stream, resets, idle timeout, 5xx, `auth_revoked`)
  reconnects with backoff, and the server's first `put` at "/" replaces the mirror.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote, urljoin, urlsplit, urlunsplit

import httpx

from listeners.backoff import Backoff

log = logging.getLogger(__name__)

# The scopes the REST API asks of a Google OAuth2 access token (docs: database/rest/auth).
SCOPES = (
    "https://www.googleapis.com/auth/firebase.database",
    "https://www.googleapis.com/auth/userinfo.email",
)
DEFAULT_IDLE_TIMEOUT = 45.0  # the server sends keep-alive about every 30 s
DEFAULT_MAX_EVENT_BYTES = 32 * 1024 * 1024
_MAX_REDIRECTS = 5
_MAX_ERROR_BODY = 64 * 1024
_MAX_UNAUTHORIZED = 3  # 401s in a row, each after a fresh token, before a stream gives up
_RETRY_STATUSES = frozenset({408, 423, 429})  # and every 5xx
_CLOSE_WAIT = 5.0
_TOKEN_HOST_SUFFIXES = (".firebaseio.com", ".firebasedatabase.app")
_FORBIDDEN_KEY_CHARS = re.compile(r"[.#$\[\]\x00-\x1f\x7f]")
_LINE_END = re.compile(rb"[\r\n]")
_BOM = b"\xef\xbb\xbf"

Json = Any
_NO_BODY: Any = object()
ChangeHandler = Callable[[Json], None]
FailureHandler = Callable[[str], None]


class RtdbError(Exception):
    """The server answered with an error status; `message` is its `{"error": ...}` text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class EventTooLarge(Exception):
    """One server-sent event is larger than the configured bound."""


def split_path(path: str) -> tuple[str, ...]:
    """'/a/b/' -> ('a', 'b'); '' and '/' -> () (the root). Rejects keys the database forbids."""
    keys = tuple(part for part in path.split("/") if part)
    for key in keys:
        if _FORBIDDEN_KEY_CHARS.search(key):
            raise ValueError(f"invalid Realtime Database key {key!r} in path {path!r}")
    return keys


def _event_keys(path: str) -> tuple[str, ...]:
    return tuple(part for part in path.split("/") if part)


# --- tokens -----------------------------------------------------------------------------


class TokenProvider(Protocol):
    """An OAuth2 access token for the next request, or None for unauthenticated requests.

    `refresh=True` means the server rejected the last token: get a new one.
    """

    async def __call__(self, *, refresh: bool = False) -> str | None: ...


class ServiceAccountTokens:
    """Google OAuth2 access tokens from service-account credentials, refreshed before expiry.

    google-auth refreshes with a blocking HTTPS call to the token endpoint; it runs in a
    worker thread so the loop never waits on it. A lock makes concurrent callers share one
    refresh, and forced refreshes within `min_refresh_interval` of the last one reuse its
    token: when the server revokes a token, every stream asks for a new one at once.
    """

    def __init__(
        self,
        credentials: Any,
        *,
        refresh_margin: float = 300.0,
        min_refresh_interval: float = 5.0,
        request_factory: Callable[[], Any] | None = None,
    ) -> None:
        if getattr(credentials, "requires_scopes", False):
            credentials = credentials.with_scopes(list(SCOPES))
        self.credentials = credentials
        self.refresh_margin = refresh_margin
        self.min_refresh_interval = min_refresh_interval
        self.refreshes = 0
        self._request_factory = request_factory
        self._lock = asyncio.Lock()
        self._last_refresh = -math.inf

    @classmethod
    def from_service_account_info(cls, info: Mapping[str, Any], **kwargs: Any) -> ServiceAccountTokens:
        from google.oauth2 import service_account

        credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            dict(info), scopes=list(SCOPES)
        )
        return cls(credentials, **kwargs)

    @classmethod
    def from_service_account_file(cls, path: str, **kwargs: Any) -> ServiceAccountTokens:
        from google.oauth2 import service_account

        credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
            path, scopes=list(SCOPES)
        )
        return cls(credentials, **kwargs)

    async def __call__(self, *, refresh: bool = False) -> str:
        async with self._lock:
            recent = time.monotonic() - self._last_refresh < self.min_refresh_interval
            if self._expiring() or (refresh and not recent):
                await asyncio.to_thread(self._refresh_blocking)
                self._last_refresh = time.monotonic()
                self.refreshes += 1
            token = self.credentials.token
            if not token:
                raise RuntimeError("the credentials produced no access token")
            return str(token)

    def _expiring(self) -> bool:
        if not self.credentials.token:
            return True
        expiry = self.credentials.expiry
        if expiry is None:
            return False
        # google-auth keeps expiry as a naive UTC datetime
        now = datetime.now(UTC) if expiry.tzinfo is not None else datetime.now(UTC).replace(tzinfo=None)
        return bool((expiry - now).total_seconds() <= self.refresh_margin)

    def _refresh_blocking(self) -> None:
        if self._request_factory is not None:
            request = self._request_factory()
        else:
            from google.auth.transport.requests import Request

            request = Request()
        self.credentials.refresh(request)


# --- server-sent events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    data: str


class SseParser:
    """Incremental EventSource parser: bytes in, complete events out.

    Lines may end in CRLF, LF or CR, and may be split anywhere between chunks. Memory is
    bounded: the fields of the event being read plus the unterminated line never exceed
    `max_event_bytes`, else `EventTooLarge`.
    """

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._buffer = bytearray()
        self._scanned = 0  # no line end in the buffer before this index
        self._started = False
        self._event = ""
        self._data: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[SseEvent]:
        buffer = self._buffer
        buffer += chunk
        if not self._started:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                return []
            self._started = True
            if buffer.startswith(_BOM):
                del buffer[: len(_BOM)]
        events: list[SseEvent] = []
        start = 0
        while True:
            match = _LINE_END.search(buffer, max(start, self._scanned))
            if match is None:
                self._scanned = len(buffer)
                break
            end = match.start()
            if buffer[end] == 0x0D:
                if end + 1 == len(buffer):  # CR last: wait for the next chunk to see if LF follows
                    self._scanned = end
                    break
                following = end + 2 if buffer[end + 1] == 0x0A else end + 1
            else:
                following = end + 1
            self._line(bytes(buffer[start:end]), events)
            start = following
        del buffer[:start]
        self._scanned = max(0, self._scanned - start)
        if self._size + len(buffer) > self.max_event_bytes:
            raise EventTooLarge(f"a server-sent event is larger than {self.max_event_bytes} bytes")
        return events

    def _line(self, line: bytes, events: list[SseEvent]) -> None:
        if not line:
            if self._data or self._event:
                data = b"\n".join(self._data).decode("utf-8", errors="replace")
                events.append(SseEvent(self._event or "message", data))
            self._event, self._data, self._size = "", [], 0
            return
        if line.startswith(b":"):  # a comment
            return
        self._size += len(line) + 1
        if self._size > self.max_event_bytes:
            raise EventTooLarge(f"a server-sent event is larger than {self.max_event_bytes} bytes")
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"event":
            self._event = value.decode("utf-8", errors="replace")
        elif name == b"data":
            self._data.append(value)
        # `id` and `retry` carry nothing in this protocol


# --- the mirror ---------------------------------------------------------------------------


def _list_index(node: list[Any], key: str, *, grow: bool) -> int | None:
    """The list position `key` names, if it is a canonical index (one past the end if `grow`)."""
    if not (key.isascii() and key.isdigit()) or (len(key) > 1 and key[0] == "0"):
        return None
    index = int(key)
    limit = len(node) if grow else len(node) - 1
    return index if index <= limit else None


def _child(node: Json, key: str) -> Json:
    if isinstance(node, dict):
        return node.get(key)
    if isinstance(node, list):
        index = _list_index(node, key, grow=False)
        return node[index] if index is not None else None
    return None


def _is_empty(value: Json) -> bool:
    return isinstance(value, dict | list) and not value


class _Editor:
    """Writes into a tree without touching any container that an earlier tree still holds.

    A container on a written path is copied the first time this event writes into it and
    written in place after that, so a patch of many children copies their parent once.
    Lists the server sent stay lists while written at an existing index or appended to;
    any other key turns the list into an object with string keys, as the database stores it.
    """

    def __init__(self, root: Json) -> None:
        self.root = root
        # id -> container copied during this event; holding it keeps the id unique
        self._fresh: dict[int, dict[str, Json] | list[Json]] = {}

    def write(self, keys: Sequence[str], value: Json) -> None:
        self.root = self._write(self.root, keys, 0, value)

    def _write(self, node: Json, keys: Sequence[str], depth: int, value: Json) -> Json:
        if depth == len(keys):
            return None if _is_empty(value) else value
        key = keys[depth]
        child = _child(node, key)
        new_child = self._write(child, keys, depth + 1, value)
        if new_child is child:
            return node
        if new_child is None and not isinstance(node, dict | list):
            return node  # nothing to delete under a leaf
        container = self._own(node, key)
        if isinstance(container, dict):
            if new_child is None:
                container.pop(key, None)
            else:
                container[key] = new_child
        else:
            index = _list_index(container, key, grow=True)
            assert index is not None  # _own turned the list into a dict otherwise
            if index == len(container):
                container.append(new_child)
            else:
                container[index] = new_child
            while container and container[-1] is None:
                container.pop()
        return container if container else None

    def _own(self, node: Json, key: str) -> dict[str, Json] | list[Json]:
        copy: dict[str, Json] | list[Json]
        if isinstance(node, list) and _list_index(node, key, grow=True) is None:
            copy = {str(i): v for i, v in enumerate(node) if v is not None}
        elif id(node) in self._fresh:
            return self._fresh[id(node)]
        elif isinstance(node, dict):
            copy = dict(node)
        elif isinstance(node, list):
            copy = list(node)
        else:
            copy = {}
        self._fresh[id(copy)] = copy
        return copy


def apply_event(tree: Json, kind: str, path: str, data: Json) -> Json:
    """The tree after one `put` (replace at path; null deletes) or `patch` (merge children)."""
    keys = _event_keys(path)
    editor = _Editor(tree)
    if kind == "put":
        editor.write(keys, data)
    elif kind == "patch":
        if not isinstance(data, dict):
            raise _ProtocolError(f"patch data is not an object: {type(data).__name__}")
        for child_path, value in data.items():  # a child path may be several keys deep
            editor.write(keys + _event_keys(child_path), value)
    else:
        raise ValueError(f"not a data event: {kind!r}")
    return editor.root


# --- the stream ---------------------------------------------------------------------------


class _ProtocolError(Exception):
    """The server sent something this protocol does not allow; reconnect."""


class _Fatal(Exception):
    """Stop the stream: reconnecting would get the same answer."""


class _Retry(Exception):
    def __init__(self, reason: str, *, refresh_token: bool = False) -> None:
        super().__init__(reason)
        self.refresh_token = refresh_token


class _StreamEnded(Exception):
    pass


class NodeStream:
    """A live mirror of one node, fed by the REST streaming protocol.

    `on_change(tree)` runs on the loop after every `put` and `patch`, with the whole node
    (None when it does not exist). After a reconnect the server's first `put` at "/" is a
    full read, so `on_change` then gets a fresh full tree. Exceptions from the callbacks
    are logged and do not stop the stream.
    """

    def __init__(
        self,
        client: RtdbClient,
        path: str,
        on_change: ChangeHandler,
        *,
        on_failed: FailureHandler | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        backoff: Backoff | None = None,
    ) -> None:
        self._client = client
        self._keys = split_path(path)
        self.path = "/" + "/".join(self._keys)
        self._on_change = on_change
        self._on_failed = on_failed
        self._idle_timeout = idle_timeout
        self._max_event_bytes = max_event_bytes
        self._backoff = backoff or Backoff()
        self._tree: Json = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failed = False
        self._reason: str | None = None
        self._synced = False
        self._refresh_token = False
        self._attempt = 0
        self._unauthorized = 0
        self.reconnects = 0
        self.events = 0

    def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"rtdb-stream {self.path}")

    @property
    def tree(self) -> Json:
        """The mirror as of the last applied event; never mutated once handed out."""
        return self._tree

    @property
    def active(self) -> bool:
        """False once closed or failed; a reconnecting stream is still active."""
        return not self._closed and not self._failed

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def reason(self) -> str | None:
        """Why the stream failed, or None."""
        return self._reason

    @property
    def synced(self) -> bool:
        """True while connected and past the server's initial full read."""
        return self._synced

    async def close(self) -> None:
        """Stop the stream and drop its connection; returns promptly, never hangs the loop."""
        self._closed = True
        self._client._streams.discard(self)
        task = self._task
        if task is None or task.done():
            return
        task.cancel()
        if task is not asyncio.current_task():
            await asyncio.wait({task}, timeout=_CLOSE_WAIT)

    async def _run(self) -> None:
        try:
            while not self._closed:
                try:
                    await self._connect_once()
                except (_Fatal, EventTooLarge) as exc:
                    self._fail(str(exc))
                    return
                except RtdbError as exc:
                    if exc.status == 401:
                        self._unauthorized += 1
                        if self._unauthorized > _MAX_UNAUTHORIZED:
                            self._fail(f"unauthorized even with a fresh token: {exc}")
                            return
                        self._refresh_token = True
                    elif exc.status not in _RETRY_STATUSES and exc.status < 500:
                        self._fail(str(exc))
                        return
                    why = str(exc)
                except _Retry as exc:
                    self._refresh_token = self._refresh_token or exc.refresh_token
                    why = str(exc)
                except TimeoutError:
                    why = f"no event for {self._idle_timeout:g}s"
                except (_StreamEnded, _ProtocolError) as exc:
                    why = str(exc)
                except (httpx.HTTPError, OSError) as exc:
                    why = f"{type(exc).__name__}: {exc}"
                self._synced = False
                delay = self._backoff.delay(self._attempt)
                self._attempt += 1
                log.info("rtdb stream %s: reconnecting in %.2fs (%s)", self.path, delay, why)
                await asyncio.sleep(delay)
                self.reconnects += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not look like a healthy stream
            log.exception("rtdb stream %s: internal error", self.path)
            self._fail(f"internal error: {exc!r}")
        finally:
            self._synced = False

    async def _connect_once(self) -> None:
        try:
            token = await self._client._token(refresh=self._refresh_token)
        except Exception as exc:
            raise _Retry(f"the token provider failed: {exc!r}") from exc
        self._refresh_token = False
        parser = SseParser(self._max_event_bytes)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._idle_timeout) as idle:
            response = await self._client._send(
                "GET",
                self._keys,
                token=token,
                headers={"Accept": "text/event-stream", "Cache-Control": "no-cache"},
                stream=True,
            )
            try:
                if response.status_code != 200:
                    raise await _error(response)
                content_type = response.headers.get("content-type", "")
                if not content_type.startswith("text/event-stream"):
                    raise _ProtocolError(f"expected text/event-stream, got {content_type!r}")
                async for chunk in response.aiter_bytes():
                    for event in parser.feed(chunk):
                        idle.reschedule(loop.time() + self._idle_timeout)  # keep-alive included
                        self._apply(event)
            finally:
                with contextlib.suppress(httpx.HTTPError, OSError):
                    await response.aclose()
        raise _StreamEnded("the server ended the stream")

    def _apply(self, event: SseEvent) -> None:
        kind = event.event
        if kind in ("put", "patch"):
            try:
                message = json.loads(event.data)
            except ValueError as exc:
                raise _ProtocolError(f"{kind} data is not JSON: {exc}") from exc
            if (
                not isinstance(message, dict)
                or not isinstance(message.get("path"), str)
                or "data" not in message
            ):
                raise _ProtocolError(f"{kind} data lacks path and data")
            self._tree = apply_event(self._tree, kind, message["path"], message["data"])
            self.events += 1
            if not self._synced:  # the first event of a connection is the full read
                self._synced = True
                self._attempt = 0
                self._unauthorized = 0
            try:
                self._on_change(self._tree)
            except Exception:
                log.exception("rtdb stream %s: on_change failed", self.path)
        elif kind == "keep-alive":
            pass  # liveness only; the idle deadline was pushed back already
        elif kind == "cancel":
            raise _Fatal(f"cancelled by the server: reading {self.path} is no longer permitted")
        elif kind == "auth_revoked":
            raise _Retry("the server revoked the access token", refresh_token=True)
        else:
            log.debug("rtdb stream %s: ignoring event %r", self.path, kind)

    def _fail(self, reason: str) -> None:
        self._failed = True
        self._reason = reason
        self._client._streams.discard(self)
        log.warning("rtdb stream %s failed: %s", self.path, reason)
        if self._on_failed is not None:
            try:
                self._on_failed(reason)
            except Exception:
                log.exception("rtdb stream %s: on_failed failed", self.path)


# --- the client ---------------------------------------------------------------------------


async def _error(response: httpx.Response) -> RtdbError:
    body = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > _MAX_ERROR_BODY:
                break
    except (httpx.HTTPError, OSError):
        pass
    text = body[:_MAX_ERROR_BODY].decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    message = parsed["error"] if isinstance(parsed, dict) and isinstance(parsed.get("error"), str) else text
    return RtdbError(response.status_code, message or response.reason_phrase)


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
    ) -> None:
        parts = urlsplit(base_url)
        self.namespace = namespace or dict(parse_qsl(parts.query)).get("ns")
        self.base_url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self._host = parts.hostname
        self._tokens = tokens
        self._timeout = timeout
        self._own_http = http is None
        # streams each hold a connection for their lifetime: no cap on the pool
        self._http = http or httpx.AsyncClient(
            timeout=timeout, limits=httpx.Limits(max_connections=None, max_keepalive_connections=20)
        )
        self._streams: set[NodeStream] = set()

    def url(self, keys: Sequence[str]) -> str:
        return self.base_url + "/" + "/".join(quote(key, safe="") for key in keys) + ".json"

    @property
    def open_streams(self) -> int:
        return sum(1 for stream in self._streams if stream.active)

    async def get(self, path: str = "/", *, shallow: bool = False) -> Json:
        params = {"shallow": "true"} if shallow else None
        response = await self._request("GET", path, params=params)
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
    ) -> NodeStream:
        """Start mirroring `path`; close the returned stream (or the client) to stop."""
        stream = NodeStream(
            self,
            path,
            on_change,
            on_failed=on_failed,
            idle_timeout=idle_timeout,
            max_event_bytes=max_event_bytes,
            backoff=backoff,
        )
        self._streams.add(stream)
        stream.start()
        return stream

    async def aclose(self) -> None:
        await asyncio.gather(*(stream.close() for stream in list(self._streams)))
        if self._own_http:
            await self._http.aclose()

    async def _token(self, *, refresh: bool = False) -> str | None:
        if self._tokens is None:
            return None
        return await self._tokens(refresh=refresh)

    async def _request(
        self, method: str, path: str, *, body: Json = _NO_BODY, params: Mapping[str, str] | None = None
    ) -> httpx.Response:
        keys = split_path(path)
        content = None if body is _NO_BODY else _encode(body)
        headers = {"Content-Type": "application/json"} if content is not None else {}
        token = await self._token()
        response = await self._send(
            method, keys, token=token, params=params, headers=headers, content=content
        )
        if response.status_code == 401 and self._tokens is not None:
            token = await self._token(refresh=True)
            response = await self._send(
                method, keys, token=token, params=params, headers=headers, content=content
            )
        if not response.is_success:
            raise await _error(response)
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
    ) -> httpx.Response:
        url = httpx.URL(self.url(keys))
        query = {"ns": self.namespace} if self.namespace else {}
        url = url.copy_merge_params({**query, **(params or {})})
        # a stream has no read timeout of its own: NodeStream's idle deadline covers it
        timeout = httpx.Timeout(self._timeout, read=None) if stream else httpx.USE_CLIENT_DEFAULT
        for _ in range(_MAX_REDIRECTS + 1):
            request_headers = dict(headers or {})
            if token is not None and self._may_carry_token(url):
                request_headers["Authorization"] = f"Bearer {token}"
            request = self._http.build_request(
                method, url, headers=request_headers, content=content, timeout=timeout
            )
            response = await self._http.send(request, stream=stream, follow_redirects=False)
            location = response.headers.get("location")
            if response.status_code not in (301, 302, 303, 307, 308) or not location:
                return response
            await response.aclose()
            url = httpx.URL(urljoin(str(url), location))  # the Location carries its own query
            if response.status_code == 303:
                method, content = "GET", None
        raise RtdbError(310, f"more than {_MAX_REDIRECTS} redirects")
