"""Outside input, read and written without ever raising past the item at hand.

Every loop that takes input from outside (Redis messages, WebSocket frames, registry and
notification documents, Realtime Database events, control requests) reads it through
`parse_json` (bounded in size and depth; anything wrong is an `InvalidInput`), refuses
identifiers that `valid_key` refuses (a uid: `valid_uid`), and writes through `encode_json`,
which never raises: a lone surrogate or a NaN that slipped through becomes a replacement,
not a dead task.
"""

from __future__ import annotations

import json
import math
import unicodedata
from typing import Any

MAX_DEPTH = 32  # our own documents nest 3 deep; 32 leaves room without a recursion risk
MAX_UID_LENGTH = 128  # Firebase's limit on a uid


class InvalidInput(ValueError):
    """One item of outside input that is refused; the message says why, never the payload."""


def parse_json(
    raw: bytes | str, *, max_bytes: int, max_depth: int = MAX_DEPTH, allow_surrogates: bool = False
) -> Any:
    """The JSON value, or InvalidInput. Lone surrogates (valid JSON escapes, invalid text) are
    refused unless `allow_surrogates`: data we only pass on is cleaned by `encode_json` instead."""
    if len(raw) > max_bytes:
        raise InvalidInput(f"larger than {max_bytes} bytes")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text)
    except UnicodeDecodeError:
        raise InvalidInput("not UTF-8") from None
    except RecursionError:
        raise InvalidInput(f"nested deeper than {max_depth}") from None
    except ValueError:
        raise InvalidInput("not JSON") from None
    # The walks below cost as much as the parse: each is skipped when the text alone shows
    # it would find nothing (the hub checks 5,000 events a second this way).
    if _openers(text) > max_depth and depth(value, max_depth) > max_depth:
        raise InvalidInput(f"nested deeper than {max_depth}")
    maybe = not allow_surrogates and _may_hold_surrogate(text, isinstance(raw, bytes))
    if maybe and has_lone_surrogate(value):
        raise InvalidInput("a string holds a lone surrogate")
    return value


def _openers(text: str) -> int:
    """Never less than the nesting depth: each level opens with `{` or `[` (strings may hold more)."""
    return text.count("{") + text.count("[")


def _may_hold_surrogate(text: str, decoded: bool) -> bool:
    """False when no string of the value can hold a lone surrogate: none is spelt as a
    `\\u` escape, and text decoded from UTF-8 holds none (the decoder refuses them)."""
    return "\\u" in text or (not decoded and _lone_surrogate(text))


def depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, without recursion; stops counting past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level > limit:
                return level
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def _strings(value: Any) -> Any:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def has_lone_surrogate(value: Any) -> bool:
    return any(_lone_surrogate(s) for s in _strings(value))


def clean_text(text: str) -> str:
    """The string with lone surrogates replaced by U+FFFD, so that it encodes as UTF-8."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace") if _lone_surrogate(text) else text


def json_safe(value: Any, limit: int = MAX_DEPTH) -> Any:
    """A copy that `json.dumps` accepts: text cleaned, NaN and infinities null, keys strings,
    anything else its `str`, nesting cut at `limit`."""
    if isinstance(value, str):
        return clean_text(value)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if limit <= 0:
        return None
    if isinstance(value, dict):
        return {clean_text(str(k)): json_safe(v, limit - 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, limit - 1) for v in value]
    return clean_text(str(value))


def encode_json(value: Any) -> bytes:
    """Compact UTF-8 JSON; never raises (what cannot be encoded is made safe first)."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError is a ValueError
        return json.dumps(json_safe(value), ensure_ascii=False, separators=(",", ":")).encode()


def valid_key(value: object, max_length: int = 200) -> bool:
    """An identifier that may stand in a channel name `chat:{uid}:{space}:{thread}` or a
    database path: a non-empty string without control characters, surrogates, `:` or `/`,
    nor the characters the Realtime Database forbids in keys (`. # $ [ ]`)."""
    if not isinstance(value, str) or not value or len(value) > max_length:
        return False
    if any(c in value for c in ":/.#$[]"):
        return False
    return not any(unicodedata.category(c) in ("Cc", "Cs", "Cf") for c in value)


def valid_uid(value: object) -> bool:
    """A uid we serve: at most `MAX_UID_LENGTH` characters and a `valid_key`, so that
    `chat:{uid}:…` and `clients/{uid}/…` mean one thing only. The registry, the control
    channel and the WebSocket all refuse what this refuses."""
    return valid_key(value, MAX_UID_LENGTH)
