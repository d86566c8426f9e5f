"""Timestamps in every form the production data uses, to UTC ISO 8601.

Seen in real documents: Firestore Timestamps (datetime subclasses), naive ISO strings
(`2025-09-05T10:11:12.123456`), Python's `str(datetime.now())` (space-separated), and
zoned ISO strings. Naive values are UTC. Numbers are taken as Unix epoch seconds, or
milliseconds when too large to be seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

_MS_THRESHOLD = 100_000_000_000  # epoch seconds pass this in the year 5138


def parse_timestamp(value: Any) -> datetime | None:
    """An aware UTC datetime, or None when the value is not a recognisable time."""
    parsed: datetime | None
    try:
        if isinstance(value, datetime):
            parsed = value
        elif isinstance(value, str):
            parsed = _parse_text(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                return None
            seconds = value / 1000 if abs(value) >= _MS_THRESHOLD else value
            parsed = datetime.fromtimestamp(seconds, UTC)
        else:
            return None
        if parsed is None:
            return None
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _parse_text(text: str) -> datetime | None:
    text = text.strip()
    if not text or len(text) > 64:
        return None
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # fromisoformat (3.11) takes both 'T' and ' ' separators and 1-6 fraction digits.
    return datetime.fromisoformat(text)


def format_utc(moment: datetime) -> str:
    """`2025-01-01T12:00:00Z`, with microseconds only when there are some."""
    moment = moment.astimezone(UTC)
    spec = "microseconds" if moment.microsecond else "seconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def to_utc_iso(value: Any) -> str:
    """The normalised text of a timestamp, or "" when it cannot be read."""
    parsed = parse_timestamp(value)
    return format_utc(parsed) if parsed is not None else ""


_OLDEST = datetime.min.replace(tzinfo=UTC)
ItemT = TypeVar("ItemT", bound=Mapping[str, Any])


def sort_key(item: Mapping[str, Any]) -> tuple[datetime, str]:
    return (parse_timestamp(item.get("timestamp")) or _OLDEST, str(item.get("doc_id", "")))


def newest_first(items: Iterable[ItemT]) -> list[ItemT]:
    """Newest first by `timestamp`; unreadable timestamps last; ties by `doc_id`."""
    return sorted(items, key=sort_key, reverse=True)
