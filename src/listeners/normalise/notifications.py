"""Firestore `clients/{uid}/notifications/{doc_id}` documents to UI items.

Defaults (also in docs/events.md): `file_name` "Document", `status` "info", other text
fields "", `job_id` the document id (it usually is the job id), `timestamp` "" when
unreadable (sorted last), `additional_info` "{}" when absent.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping
from typing import Any

from listeners.normalise.values import dumps, text, to_json_value
from listeners_bridge.events import NotificationItem
from listeners_bridge.timestamps import to_utc_iso

_OPTIONAL_TEXT = ("batch_id", "drive_link")


def normalise_notification(doc_id: str, data: Any) -> NotificationItem:
    fields: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
    job_id = text(fields.get("job_id"), "") or doc_id
    file_name = text(fields.get("file_name"), "") or "Document"
    status = text(fields.get("status"), "") or "info"
    info = _additional_info(fields.get("additional_info"))
    item: NotificationItem = {
        "doc_id": doc_id,
        "job_id": job_id,
        "file_id": text(fields.get("file_id"), ""),
        "file_name": file_name,
        "status": status,
        "collection_id": text(fields.get("collection_id"), ""),
        "collection_name": text(fields.get("collection_name"), ""),
        "function_name": text(fields.get("function_name"), ""),
        "timestamp": to_utc_iso(fields.get("timestamp")),
        "read": fields.get("read") is True,
        "additional_info": dumps(info),
        "info_message": _info_message(info),
        "message": f"{file_name} - {status}",
        "url": f"/edit_form/{job_id}",
    }
    for name in _OPTIONAL_TEXT:
        value = text(fields.get(name), "")
        if value:
            item[name] = value  # type: ignore[literal-required]
    return item


def _additional_info(value: Any) -> Any:
    """A JSON value: maps as they are, JSON or Python-literal strings parsed, other text wrapped.

    The earlier service published `str(dict)`; such strings are read back with
    `ast.literal_eval` (literals only, never code). Text that is neither is kept as
    `{"message": text}` so the UI still shows it.
    """
    if value is None:
        return {}
    if not isinstance(value, str):
        return to_json_value(value)
    stripped = value.strip()
    if not stripped:
        return {}
    try:
        return json.loads(stripped)
    except (ValueError, RecursionError):
        pass
    if stripped[0] in "{[" and len(stripped) < 100_000:
        try:
            return to_json_value(ast.literal_eval(stripped))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    return {"message": value}


def _info_message(info: Any) -> str:
    if not isinstance(info, Mapping):
        return ""
    for key in ("error_message", "message"):
        found = info.get(key)
        if found not in (None, ""):
            return found if isinstance(found, str) else dumps(found)
    return ""
