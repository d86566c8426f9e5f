"""Wire documents and values (raw protobuf) to the `SourceDoc` the rest of the service reads.

Values decode as the SDK's `to_dict()` does, except that a reference becomes a
`DocumentPath` (the SDK needs a client to build a `DocumentReference`); the normaliser reads
both through `.path`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.api_core.datetime_helpers import DatetimeWithNanoseconds
from google.cloud.firestore_v1._helpers import GeoPoint
from google.protobuf.timestamp_pb2 import Timestamp

from listeners.source.snapshots import SourceDoc


@dataclass(frozen=True, slots=True)
class DocumentPath:
    """A reference value: the document's path relative to the database, e.g. `clients/u1`."""

    path: str


class Undecodable(ValueError):
    """A document we cannot read. The message names the field and the wire type, never a value."""


def timestamp(value: Timestamp) -> datetime:
    return DatetimeWithNanoseconds.from_timestamp_pb(value)  # type: ignore[no-untyped-call,no-any-return]


def decode(value: Any) -> Any:
    kind = value.WhichOneof("value_type")
    if kind == "string_value":
        return value.string_value
    if kind == "integer_value":
        return value.integer_value
    if kind == "boolean_value":
        return value.boolean_value
    if kind == "double_value":
        return value.double_value
    if kind == "null_value" or kind is None:
        return None
    if kind == "timestamp_value":
        return timestamp(value.timestamp_value)
    if kind == "map_value":
        return {k: decode(v) for k, v in value.map_value.fields.items()}
    if kind == "array_value":
        return [decode(v) for v in value.array_value.values]
    if kind == "bytes_value":
        return value.bytes_value
    if kind == "reference_value":
        return DocumentPath(value.reference_value.split("/documents/", 1)[-1])
    if kind == "geo_point_value":
        return GeoPoint(value.geo_point_value.latitude, value.geo_point_value.longitude)
    raise Undecodable(f"unknown value type {kind}")


def source_doc(document: Any) -> SourceDoc:
    """A raw `google.firestore.v1.Document` as a `SourceDoc`; `Undecodable` if it is not one."""
    data = {}
    for key, value in document.fields.items():
        try:
            data[key] = decode(value)
        except (ValueError, OverflowError) as exc:  # a timestamp out of range says its value
            raise Undecodable(f"field {key!r}: {why(exc)}") from exc
    try:
        updated = timestamp(document.update_time) if document.HasField("update_time") else None
    except (ValueError, OverflowError) as exc:
        raise Undecodable(f"update_time: {why(exc)}") from exc
    return SourceDoc(document.name.rsplit("/", 1)[-1], data, updated)


def why(exc: Exception) -> str:
    return str(exc) if isinstance(exc, Undecodable) else f"{type(exc).__name__} decoding a value"
