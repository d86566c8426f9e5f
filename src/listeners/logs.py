"""Structured JSON logs on stdout (CloudWatch reads one object per line).

Log calls pass context in `extra=` (uid, type, doc_id, reason, counts), never payloads.
As a second line of defence, every secret value the service knows is masked in the
final line, should one ever slip into a message or an exception text.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_secrets: set[str] = set()
# uvicorn logs WebSocket paths with their query string, and browsers may put the ID token there.
_TOKEN_IN_URL = re.compile(r"((?:access_)?token=)[^&\s\"']+")


def register_secret(value: str) -> None:
    """Mask this value (and each line of it, for multi-line keys) in every log line."""
    for part in [value, *value.splitlines()]:
        if len(part.strip()) >= 6:
            _secrets.add(part.strip())


def mask(text: str) -> str:
    for value in _secrets:
        if value in text:
            text = text.replace(value, "***")
    return _TOKEN_IN_URL.sub(r"\1***", text)


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
        return mask(json.dumps(entry, default=str, ensure_ascii=False))


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
    # The SDKs log their retries at INFO with full request context; keep them quiet.
    for name in ("google", "grpc", "urllib3"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
