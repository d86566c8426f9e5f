"""Structured JSON logs on stdout (CloudWatch reads one object per line).

Log calls pass context in `extra=` (uid, type, doc_id, reason, counts), never payloads.
As a second line of defence, every secret value the service knows is masked, should one
ever slip into a message, an extra or an exception text, and so is a token in a URL
(`?token=`, `access_token=`: uvicorn logs request paths with their query string).

Masking runs on each string of the entry *before* it is encoded: after encoding, a secret
holding `"` or `\\` would show escaped and be missed, and a pattern could eat the escapes
and quotes of the JSON text itself. Each line is then valid JSON whatever the values hold
(lone surrogates, NaN, objects of any kind).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from datetime import UTC, datetime
from typing import Any

from listeners_bridge.inputs import clean_text

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_secrets: set[str] = set()
_ordered: list[str] = []  # longest first, so a whole secret is masked before any line of it
_MIN_LENGTH = 6  # shorter fragments (a PEM's last line, a brace) would mask ordinary text
_MAX_DEPTH = 8  # extras nest a level or two; deeper is cut, never recursed into
# uvicorn logs WebSocket paths with their query string, and browsers may put the ID token there.
_TOKEN_IN_URL = re.compile(r"((?:access_)?token=)[^&\s\"'\\]+")


def register_secret(value: str) -> None:
    """Mask this value in every log line, with each line of it (multi-line keys), the
    `private_key` of a service account JSON, and the escaped forms (JSON, repr) of each."""
    parts = [value]
    try:
        info = json.loads(value)
    except ValueError:
        info = None
    if isinstance(info, dict) and isinstance(info.get("private_key"), str):
        parts.append(info["private_key"])  # in the JSON text its newlines are `\n`
    for part in list(parts):
        parts.extend(part.splitlines())
    for part in parts:
        part = part.strip()
        if len(part) < _MIN_LENGTH:
            continue
        # How the value shows once escaped: in JSON text (either ensure_ascii) or in a repr.
        escaped = (json.dumps(part)[1:-1], json.dumps(part, ensure_ascii=False)[1:-1], repr(part)[1:-1])
        _secrets.update((part, *escaped))
    _ordered[:] = sorted(_secrets, key=len, reverse=True)


def mask(text: str) -> str:
    for value in _ordered:
        if value in text:
            text = text.replace(value, "***")
    return _TOKEN_IN_URL.sub(r"\1***", text)


def _masked(value: Any, depth: int = _MAX_DEPTH) -> Any:
    """A JSON-ready copy of `value` with every string masked: keys too, and whatever is
    not JSON (an exception, an object) as its masked `str`."""
    if isinstance(value, str):
        return mask(clean_text(value))
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # NaN is not JSON
    if depth <= 0:
        return "..."
    if isinstance(value, dict):
        return {_masked(str(k)): _masked(v, depth - 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_masked(v, depth - 1) for v in value]
    return _masked(str(value))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(_masked(entry), ensure_ascii=False, allow_nan=False)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
        logging.getLogger(name).setLevel(root.level)  # uvicorn sets its own INFO otherwise
    # The SDKs log their retries at INFO with full request context; keep them quiet. websockets
    # logs each frame at DEBUG, the wire client's credential among them.
    for name in ("google", "grpc", "urllib3", "websockets"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
