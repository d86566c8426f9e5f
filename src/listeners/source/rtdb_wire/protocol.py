"""The wire protocol's pieces that hold no state of a connection: frames, queries, pushes, hosts.

From `@firebase/database` (firebase-js-sdk `packages/database/src/realtime/Constants.ts`,
`Connection.ts`, `WebSocketConnection.ts`, `core/PersistentConnection.ts`,
`core/view/QueryParams.ts`); docs/rtdb.md has the whole list of messages.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import random
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from listeners.source.rtdb import Json, apply_event

PROTOCOL_VERSION = "5"
MAX_FRAME = 16_384  # characters per WebSocket frame; a longer message is split, count first
KEEPALIVE_FRAME = "0"  # what the SDK sends after 45 s without sending anything
_FIREBASE_HOST_SUFFIXES = (".firebaseio.com", ".firebasedatabase.app")
_PUSH_CHARS = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"


class WireProtocolError(Exception):
    """The server sent something the protocol does not allow; the connection starts again."""


class MessageTooLarge(WireProtocolError):
    pass


def encode_frames(message: Json) -> list[str]:
    """One message as the frames to send: itself, or the count of frames and then the frames."""
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if len(text) <= MAX_FRAME:
        return [text]
    frames = [text[i : i + MAX_FRAME] for i in range(0, len(text), MAX_FRAME)]
    return [str(len(frames)), *frames]


class FrameReader:
    """Frames in, whole messages out, as `WebSocketConnection.handleIncomingFrame` reads them:
    a frame of at most 6 digits announces that many frames, concatenated; memory is bounded
    by `max_message_chars` (then `MessageTooLarge`)."""

    def __init__(self, max_message_chars: int) -> None:
        self.max_message_chars = max_message_chars
        self._frames: list[str] | None = None
        self._expected = 0
        self._size = 0

    def feed(self, frame: str) -> str | None:
        if self._frames is None:
            if len(frame) <= 6 and frame.isascii() and frame.isdigit():
                self._expected = int(frame)
                if self._expected == 0:
                    return None  # a keep-alive
                self._frames, self._size = [], 0
                return None
            if len(frame) > self.max_message_chars:
                raise MessageTooLarge(f"a message is larger than {self.max_message_chars} characters")
            return frame
        self._frames.append(frame)
        self._size += len(frame)
        if self._size > self.max_message_chars:
            raise MessageTooLarge(f"a message is larger than {self.max_message_chars} characters")
        if len(self._frames) < self._expected:
            return None
        text, self._frames = "".join(self._frames), None
        return text


# --- queries ------------------------------------------------------------------------------------


def wire_query(rest: Mapping[str, str] | None) -> dict[str, Json] | None:
    """The REST query parameters that `RtdbClient.stream` takes (values JSON-encoded:
    `{"orderBy": '"$key"', "limitToLast": "100"}`) as the SDK's query object
    (`queryParamsGetQueryObject`): `i` the index (`.key`, `.value`, a child path; `.priority`
    is the default and left out), `l` the limit and `vf` the side it counts from (`r` for
    limitToLast), `sp` / `ep` the start and end values with `sin` / `ein` inclusive, and
    equalTo as both. None for no query. ValueError for what REST would answer 400."""
    if not rest:
        return None
    try:
        values = {name: json.loads(raw) for name, raw in rest.items()}
    except ValueError:
        raise ValueError("query values must be JSON, as the REST API takes them") from None
    unknown = set(values) - {"orderBy", "limitToFirst", "limitToLast", "startAt", "endAt", "equalTo"}
    if unknown:
        raise ValueError(f"query parameters not supported on the wire: {sorted(unknown)}")
    if "orderBy" not in values:
        raise ValueError("orderBy must be defined when other query parameters are defined")
    order_by = values["orderBy"]
    if not isinstance(order_by, str) or not order_by:
        raise ValueError("orderBy must be a JSON string")
    query: dict[str, Json] = {}
    index = {"$key": ".key", "$value": ".value", "$priority": ".priority"}.get(order_by, order_by)
    if "equalTo" in values:
        values["startAt"] = values["endAt"] = values["equalTo"]
    if "startAt" in values:
        query["sp"], query["sin"] = values["startAt"], True
    if "endAt" in values:
        query["ep"], query["ein"] = values["endAt"], True
    limits = [(name, values[name]) for name in ("limitToFirst", "limitToLast") if name in values]
    if len(limits) > 1:
        raise ValueError("limitToFirst and limitToLast cannot both be set")
    for name, limit in limits:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            raise ValueError(f"{name} must be a positive integer")
        query["l"], query["vf"] = limit, "l" if name == "limitToFirst" else "r"
    if index != ".priority":
        query["i"] = index
    return query or None


def query_key(query: Json) -> str:
    """A listen's identity within its path, as the SDK's `ObjectToUniqueKey` makes it: the query
    object with its keys sorted; "default" for none."""
    if not query:
        return "default"
    return json.dumps(query, sort_keys=True, separators=(",", ":"))


_INTEGER_KEY = re.compile(r"-?[1-9][0-9]{0,9}|0")  # ASCII digits only: "²" and "--1" are text


def _key_rank(key: str) -> tuple[int, int, str]:
    """`.key` order: keys that are 32-bit integers first, numerically, then the others as text."""
    if _INTEGER_KEY.fullmatch(key) and -(2**31) <= int(key) < 2**31:
        return (0, int(key), "")
    return (1, 0, key)


def trim_window(tree: Json, query: Mapping[str, Json] | None) -> tuple[Json, list[str]]:
    """A `.key` query with a limit keeps only its window: the children past it are dropped
    (the server also says so; this holds the mirror to the window whatever it sends). Returns
    the tree and the children removed. Other indexes are left to the server."""
    if not query or "l" not in query or query.get("i") != ".key" or not isinstance(tree, dict):
        return tree, []
    limit = int(query["l"])
    if len(tree) <= limit:
        return tree, []
    ordered = sorted(tree, key=_key_rank)
    dropped = ordered[:-limit] if query.get("vf") == "r" else ordered[limit:]
    gone = set(dropped)
    kept = {key: tree[key] for key in tree if key not in gone}
    return kept or None, dropped


# --- pushes -------------------------------------------------------------------------------------


MAX_DEPTH = 64  # path segments; the database allows 32 levels


def path_keys(path: Json) -> tuple[str, ...]:
    if not isinstance(path, str):
        raise WireProtocolError(f"a push path is not a string: {type(path).__name__}")
    keys = tuple(part for part in path.split("/") if part)
    if len(keys) > MAX_DEPTH:
        raise WireProtocolError(f"a push path deeper than {MAX_DEPTH}")
    return keys


def _descend(value: Json, keys: Iterable[str]) -> Json:
    for key in keys:
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list) and key.isascii() and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return None
    return value


def relative_writes(
    listen: tuple[str, ...], at: tuple[str, ...], merge: bool, data: Json
) -> list[tuple[tuple[str, ...], Json]]:
    """What a push (`d`: set `data` at `at`; `m`: set each child path of `data` under `at`)
    writes inside the node at `listen`, as (path relative to it, value); [] when it does not
    touch it. A write above the node carries the node's new value whole."""
    if merge:
        if not isinstance(data, dict):
            raise WireProtocolError(f"merge data is not an object: {type(data).__name__}")
        writes = [(at + path_keys(child), value) for child, value in data.items()]
    else:
        writes = [(at, data)]
    out: list[tuple[tuple[str, ...], Json]] = []
    for keys, value in writes:
        if keys[: len(listen)] == listen:
            out.append((keys[len(listen) :], value))
        elif listen[: len(keys)] == keys:
            out.append(((), _descend(value, listen[len(keys) :])))
    return out


Writes = list[tuple[tuple[str, ...], Json]]


def apply_writes(tree: Json, writes: Writes) -> tuple[Json, frozenset[str] | None]:
    """The tree after the writes, and the children they touched (None: the node replaced whole)."""
    changed: set[str] | None = set()
    children: dict[str, Json] = {}
    for keys, value in writes:
        if not keys:
            if children:
                tree = apply_event(tree, "patch", "/", children)
                children = {}
            tree = apply_event(tree, "put", "/", value)
            changed = None
        else:
            children["/".join(keys)] = value
            if changed is not None:
                changed.add(keys[0])
    if children:
        tree = apply_event(tree, "patch", "/", children)
    return tree, None if changed is None else frozenset(changed)


# --- auth and hosts -------------------------------------------------------------------------------


def auth_action(token: str) -> str:
    """`auth` for a Firebase ID token (a JWT with `iat`), `gauth` for anything else: Google
    OAuth2 access tokens and the emulator's `owner` (the SDK's `isValidFormat`)."""
    parts = token.split(".")
    if len(parts) != 3:
        return "gauth"
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return "gauth"
    return "auth" if isinstance(claims, dict) and "iat" in claims else "gauth"


def _loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0].strip("[]") if host.count(":") <= 1 or host.startswith("[") else host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(host: Json, base_host: str, secure: bool) -> bool:
    """May a handshake's `h` or a reset's host be connected to, with the token? The database's
    own host, a Firebase database host over TLS, or, for a local stand-in or emulator, loopback."""
    if not isinstance(host, str) or not host or "/" in host or "@" in host:
        return False
    if host == base_host:
        return True
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host
    if secure and name.endswith(_FIREBASE_HOST_SUFFIXES):
        return True
    return not secure and _loopback(base_host) and _loopback(host)


class PushIds:
    """Push ids as the SDKs make them: 8 characters of milliseconds, 12 random, the random part
    incremented within one millisecond, so ids sort in creation order."""

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


def describe(status: Json, data: Json) -> str:
    """A server's non-ok answer, for a reason or an error: never more than a line."""
    text = data if isinstance(data, str) else json.dumps(data, default=str)[:200]
    return f"{status}: {text}" if text else str(status)


Message = dict[str, Any]
