"""`NodeMirror`: a live mirror of one node, kept by one task over the REST streaming protocol
(one long-lived `text/event-stream` request, made again after a failure).

A mirror whose stream the server cancels (the rules no longer allow the read), and one whose
single event exceeds `max_event_bytes`, fail for good: retrying would get the same answer.
Everything else (end of stream, resets, idle timeout, 5xx, `auth_revoked`) reconnects with
backoff, and the server's first `put` at "/" replaces the mirror.

A mirror needs of the client that made it only what `MirrorClient` names (a token, its
event stream opened, a turn to connect, to be forgotten): the client imports this module to
make mirrors, and this module imports nothing of the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import httpx

from listeners.source.rtdb.errors import ProtocolError, RtdbError, read_error
from listeners.source.rtdb.sse import DEFAULT_MAX_EVENT_BYTES, EventTooLarge, SseEvent, SseParser
from listeners.source.rtdb.tree import Json, apply_event, split_path
from listeners_bridge.backoff import Backoff
from listeners_bridge.inputs import InvalidInput, parse_json

# The logger of the module before it became a package: the JSON logs' "logger" field stays the same.
log = logging.getLogger("listeners.source.rtdb")

_MAX_UNAUTHORIZED = 3  # 401s in a row, each after a fresh token, before a mirror gives up
_RETRY_STATUSES = frozenset({408, 423, 429})  # and every 5xx
_CLOSE_WAIT = 5.0
DEFAULT_IDLE_TIMEOUT = 45.0  # the server sends keep-alive about every 30 s

ChangeHandler = Callable[[Json], None]
FailureHandler = Callable[[str], None]


class _Fatal(Exception):
    """Stop the mirror: reconnecting would get the same answer."""


class _Retry(Exception):
    def __init__(self, reason: str, *, refresh_token: bool = False) -> None:
        super().__init__(reason)
        self.refresh_token = refresh_token


class _StreamEnded(Exception):
    pass


class MirrorClient(Protocol):
    """What a mirror needs of the client that made it (`RtdbClient`)."""

    @property
    def connecting(self) -> asyncio.Semaphore:
        """Turns among the mirrors between their request and the server's first full read."""

    async def token(self, *, refresh: bool = False) -> str | None:
        """The access token for the next request; None: unauthenticated."""

    async def open_event_stream(
        self, mirror: NodeMirror, keys: Sequence[str], query: Mapping[str, str], *, token: str | None
    ) -> httpx.Response:
        """The node's `text/event-stream` GET, on the mirror's connection pool, redirects
        followed: the response open, its status not yet looked at."""

    def forget(self, mirror: NodeMirror) -> None:
        """The mirror is closed or failed for good."""

    def on_reconnect(self, cause: str) -> None:
        """The mirror connected again after a loss; `cause` is one of a few fixed words."""


class NodeMirror:
    """A live mirror of one node, fed by the REST streaming protocol.

    `on_change(tree)` runs on the loop after every `put` and `patch`, with the whole node
    (None when it does not exist). After a reconnect the server's first `put` at "/" is a
    full read, so `on_change` then gets a fresh full tree. Exceptions from the callbacks
    are logged and do not stop the mirror.
    """

    def __init__(
        self,
        client: MirrorClient,
        path: str,
        on_change: ChangeHandler,
        *,
        on_failed: FailureHandler | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        backoff: Backoff | None = None,
        query: Mapping[str, str] | None = None,
    ) -> None:
        self._client = client
        self._query = dict(query or {})
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
        # The node's children the last applied event touched; None when it replaced the node
        # whole (the first `put` of a connection). Lets a consumer work in proportion to the
        # change instead of re-reading the whole mirror.
        self.last_changed: frozenset[str] | None = None

    def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"rtdb-stream {self.path}")

    @property
    def tree(self) -> Json:
        """The mirror as of the last applied event; never mutated once handed out."""
        return self._tree

    @property
    def active(self) -> bool:
        """False once closed or failed; a reconnecting mirror is still active."""
        return not self._closed and not self._failed

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def reason(self) -> str | None:
        """Why the mirror failed, or None."""
        return self._reason

    @property
    def synced(self) -> bool:
        """True while connected and past the server's initial full read."""
        return self._synced

    async def close(self) -> None:
        """Stop the mirror and drop its connection; returns promptly, never hangs the loop."""
        self._closed = True
        self._client.forget(self)
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
                    cause = "unauthorized" if exc.status == 401 else f"http_{exc.status // 100}xx"
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
                    why, cause = str(exc), "retry"
                except TimeoutError:
                    why, cause = f"no event for {self._idle_timeout:g}s", "idle_timeout"
                except (_StreamEnded, ProtocolError) as exc:
                    why, cause = str(exc), "ended" if isinstance(exc, _StreamEnded) else "protocol"
                except (httpx.HTTPError, OSError) as exc:
                    why, cause = f"{type(exc).__name__}: {exc}", "network"
                self._synced = False
                delay = self._backoff.delay(self._attempt)
                self._attempt += 1
                log.info("rtdb stream %s: reconnecting in %.2fs (%s)", self.path, delay, why)
                await asyncio.sleep(delay)
                self.reconnects += 1
                self._client.on_reconnect(cause)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not look like a healthy mirror
            log.exception("rtdb stream %s: internal error", self.path)
            self._fail(f"internal error: {exc!r}")
        finally:
            self._synced = False

    async def _connect_once(self) -> None:
        try:
            token = await self._client.token(refresh=self._refresh_token)
        except Exception as exc:
            raise _Retry(f"the token provider failed: {exc!r}") from exc
        self._refresh_token = False
        parser = SseParser(self._max_event_bytes)
        loop = asyncio.get_running_loop()
        # A turn among the mirrors connecting (`MAX_CONNECTING`), held until the full read
        # (given back in `_apply`) or the end of this attempt; waited for outside the idle
        # deadline, which is about the server, not about us.
        await self._client.connecting.acquire()
        try:
            async with asyncio.timeout(self._idle_timeout) as idle:
                response = await self._client.open_event_stream(self, self._keys, self._query, token=token)
                try:
                    if response.status_code != 200:
                        raise await read_error(response)
                    content_type = response.headers.get("content-type", "")
                    if not content_type.startswith("text/event-stream"):
                        raise ProtocolError(f"expected text/event-stream, got {content_type!r}")
                    async for chunk in response.aiter_bytes():
                        for event in parser.feed(chunk):
                            idle.reschedule(loop.time() + self._idle_timeout)  # keep-alive included
                            self._apply(event)
                finally:
                    with contextlib.suppress(httpx.HTTPError, OSError):
                        await response.aclose()
        finally:
            if not self._synced:  # no full read: the turn is still ours (`_synced` starts False)
                self._client.connecting.release()
        raise _StreamEnded("the server ended the stream")

    def _apply(self, event: SseEvent) -> None:
        kind = event.event
        if kind in ("put", "patch"):
            try:
                # Bounded: a put holds at most the watched subtree, never deeper than this.
                message = parse_json(
                    event.data, max_bytes=self._max_event_bytes, max_depth=64, allow_surrogates=True
                )
            except InvalidInput as exc:
                raise ProtocolError(f"{kind} data refused: {exc}") from None
            if (
                not isinstance(message, dict)
                or not isinstance(message.get("path"), str)
                or "data" not in message
            ):
                raise ProtocolError(f"{kind} data lacks path and data")
            self._tree = apply_event(self._tree, kind, message["path"], message["data"])
            # the first event of a connection is the full read: the whole node
            self.last_changed = _children(kind, message["path"], message["data"]) if self._synced else None
            self.events += 1
            if not self._synced:  # the first event of a connection is the full read
                self._synced = True
                self._client.connecting.release()  # our turn, taken in `_connect_once`
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
        self._client.forget(self)
        log.warning("rtdb stream %s failed: %s", self.path, reason)
        if self._on_failed is not None:
            try:
                self._on_failed(reason)
            except Exception:
                log.exception("rtdb stream %s: on_failed failed", self.path)


def _children(kind: str, path: str, data: Json) -> frozenset[str] | None:
    """The top-level children an event at `path` touches; None when it is the node itself."""
    keys = [part for part in path.split("/") if part]
    if keys:
        return frozenset(keys[:1])
    if kind == "patch" and isinstance(data, dict):
        return frozenset(part for child in data for part in [child.strip("/").split("/")[0]] if part)
    return None  # a put at "/": the whole node replaced
