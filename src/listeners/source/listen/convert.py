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
    raise ValueError(f"unknown Firestore value type {kind}")


def source_doc(document: Any) -> SourceDoc:
    """A raw `google.firestore.v1.Document` as a `SourceDoc`."""
    data = {k: decode(v) for k, v in document.fields.items()}
    updated = timestamp(document.update_time) if document.HasField("update_time") else None
    return SourceDoc(document.name.rsplit("/", 1)[-1], data, updated)
