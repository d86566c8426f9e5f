"""Arbitrary Firestore values to plain JSON values.

Firestore maps can hold timestamps, bytes, geo points, document references, NaN and
deeply nested structures; the UI wants JSON. This conversion never raises.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from listeners_bridge.timestamps import to_utc_iso

MAX_DEPTH = 32  # Firestore allows 20 levels of nesting; deeper input is cut, not followed


def to_json_value(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= MAX_DEPTH:
        return None
    if isinstance(value, datetime):
        return to_utc_iso(value) or None
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_value(v, depth + 1) for v in value]
    if hasattr(value, "latitude") and hasattr(value, "longitude"):  # GeoPoint
        return {
            "latitude": to_json_value(value.latitude),
            "longitude": to_json_value(value.longitude),
        }
    if hasattr(value, "path") and isinstance(value.path, str):  # DocumentReference
        return value.path
    return str(value)


def dumps(value: Any) -> str:
    """Compact JSON text of any Firestore value."""
    return json.dumps(to_json_value(value), ensure_ascii=False, allow_nan=False)


def text(value: Any, default: str) -> str:
    """A string field: strings as they are, scalars as text, anything else the default."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return default
