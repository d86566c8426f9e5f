"""The normaliser: every form of the production data, and arbitrary values (hypothesis)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from google.api_core.datetime_helpers import DatetimeWithNanoseconds
from google.cloud.firestore_v1 import GeoPoint
from hypothesis import given, settings
from hypothesis import strategies as st

from listeners.normalise.notifications import normalise_notification
from listeners_bridge.timestamps import newest_first, parse_timestamp, to_utc_iso


def test_timestamps_in_every_production_form() -> None:
    assert to_utc_iso("2025-09-05T10:11:12.123456") == "2025-09-05T10:11:12.123456Z"
    assert to_utc_iso("2025-09-05 10:11:12.123456") == "2025-09-05T10:11:12.123456Z"
    assert to_utc_iso("2025-09-05T12:11:12+02:00") == "2025-09-05T10:11:12Z"
    assert to_utc_iso("2025-09-05T10:11:12Z") == "2025-09-05T10:11:12Z"
    assert to_utc_iso(DatetimeWithNanoseconds(2025, 9, 5, 10, 11, 12, tzinfo=UTC)) == "2025-09-05T10:11:12Z"
    assert to_utc_iso(datetime(2025, 9, 5, 10, 11, 12)) == "2025-09-05T10:11:12Z"  # naive is UTC
    assert to_utc_iso(datetime(2025, 9, 5, 12, tzinfo=timezone(timedelta(hours=2)))) == "2025-09-05T10:00:00Z"
    assert to_utc_iso(1757067072) == "2025-09-05T10:11:12Z"
    assert to_utc_iso(1757067072000) == "2025-09-05T10:11:12Z"
    bad: object
    for bad in ("", "yesterday", None, float("nan"), True, {}, [], "9" * 100):
        assert to_utc_iso(bad) == ""


def test_item_fields_and_ui_extras() -> None:
    item = normalise_notification(
        "job-1",
        {
            "job_id": "job-1",
            "file_id": "f1",
            "file_name": "invoice.pdf",
            "status": "error",
            "collection_id": "acme",
            "collection_name": "ACME",
            "function_name": "APbookeeper",
            "timestamp": "2025-09-05 10:11:12.123456",
            "read": False,
            "additional_info": {"error_message": "bad total", "message": "ignored"},
            "batch_id": "b1",
            "drive_link": "https://drive/x",
        },
    )
    assert item == {
        "doc_id": "job-1",
        "job_id": "job-1",
        "file_id": "f1",
        "file_name": "invoice.pdf",
        "status": "error",
        "collection_id": "acme",
        "collection_name": "ACME",
        "function_name": "APbookeeper",
        "timestamp": "2025-09-05T10:11:12.123456Z",
        "read": False,
        "additional_info": '{"error_message": "bad total", "message": "ignored"}',
        "info_message": "bad total",
        "message": "invoice.pdf - error",
        "url": "/edit_form/job-1",
        "batch_id": "b1",
        "drive_link": "https://drive/x",
    }


def test_additional_info_is_always_a_json_string() -> None:
    def info(value: Any) -> tuple[str, str]:
        item = normalise_notification("d", {"additional_info": value})
        json.loads(item["additional_info"])
        return item["additional_info"], item["info_message"]

    assert info('{"message": "hello"}') == ('{"message": "hello"}', "hello")
    assert info("{'message': 'repr of a dict'}") == ('{"message": "repr of a dict"}', "repr of a dict")
    assert info("plain text") == ('{"message": "plain text"}', "plain text")
    assert info(None) == ("{}", "")
    assert info({"when": datetime(2025, 1, 1, tzinfo=UTC)}) == ('{"when": "2025-01-01T00:00:00Z"}', "")
    assert info("__import__('os')") == ('{"message": "__import__(\'os\')"}', "__import__('os')")


def test_sorting_newest_first_with_unreadable_timestamps_last() -> None:
    items = [
        normalise_notification("a", {"timestamp": "2025-01-01 00:00:00"}),
        normalise_notification("b", {"timestamp": "garbage"}),
        normalise_notification("c", {"timestamp": "2025-01-02T00:00:00Z"}),
        normalise_notification("d", {"timestamp": datetime(2024, 12, 31, tzinfo=UTC)}),
    ]
    assert [i["doc_id"] for i in newest_first(items)] == ["c", "a", "d", "b"]


# Arbitrary Firestore values: every type a document field can hold, nested.
firestore_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.binary(max_size=64),
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5))])),
    st.datetimes(),
    st.builds(GeoPoint, st.floats(-90, 90), st.floats(-180, 180)),
)
firestore_values = st.recursive(
    firestore_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(
    [
        "job_id",
        "file_id",
        "file_name",
        "status",
        "collection_id",
        "collection_name",
        "function_name",
        "timestamp",
        "read",
        "additional_info",
        "batch_id",
        "drive_link",
        "other",
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    st.text(min_size=1, max_size=20),
    st.one_of(st.dictionaries(field_names, firestore_values), firestore_values),
)
def test_normaliser_never_raises_and_outputs_json(doc_id: str, data: Any) -> None:
    item = normalise_notification(doc_id, data)
    text = json.dumps(item, allow_nan=False)
    assert json.loads(text) == item
    json.loads(item["additional_info"])
    assert isinstance(item["timestamp"], str)
    assert item["timestamp"] == "" or parse_timestamp(item["timestamp"]) is not None
