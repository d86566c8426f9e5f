"""The Listen protocol's target bookkeeping (`listeners.source.listen.protocol`), with
hand-built ListenResponse messages: no emulator, no network."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from listeners.source.listen import wire
from listeners.source.listen.protocol import ListenState, TargetError, query_target

DB = "projects/p/databases/(default)"


def name(doc_id: str) -> str:
    return f"{DB}/documents/c/{doc_id}"


def ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def change(kind: int, *ids: int, token: bytes = b"", read_time: int | None = None, cause: int = 0) -> Any:
    response = wire.ListenResponse()
    tc = response.target_change
    tc.target_change_type = kind
    tc.target_ids.extend(ids)
    if token:
        tc.resume_token = token
    if read_time is not None:
        tc.read_time.CopyFrom(ts(read_time))
    if cause:
        tc.cause.code = cause
        tc.cause.message = "target failed"
    return response


def global_point(at: int, token: bytes = b"") -> Any:
    return change(wire.NO_CHANGE, token=token, read_time=at)


def doc(
    doc_id: str, version: int, targets: tuple[int, ...] = (1,), removed: tuple[int, ...] = (), **fields: Any
) -> Any:
    response = wire.ListenResponse()
    dc = response.document_change
    dc.document.name = name(doc_id)
    dc.document.update_time.CopyFrom(ts(version))
    for key, value in fields.items():
        dc.document.fields[key].integer_value = value
    dc.target_ids.extend(targets)
    dc.removed_target_ids.extend(removed)
    return response


def delete(doc_id: str, *targets: int) -> Any:
    response = wire.ListenResponse()
    response.document_delete.document = name(doc_id)
    response.document_delete.removed_target_ids.extend(targets)
    return response


def remove(doc_id: str, *targets: int) -> Any:
    response = wire.ListenResponse()
    response.document_remove.document = name(doc_id)
    response.document_remove.removed_target_ids.extend(targets)
    return response


def existence(target_id: int, count: int) -> Any:
    response = wire.ListenResponse()
    response.filter.target_id = target_id
    response.filter.count = count
    return response


def feed(
    state: ListenState[str], *responses: Any
) -> tuple[dict[str, list[str]], list[Any], list[tuple[str, TargetError]]]:
    """Snapshots (watch -> doc ids), requests and failures the responses produced, in order."""
    snapshots: dict[str, list[str]] = {}
    requests: list[Any] = []
    failed: list[tuple[str, TargetError]] = []
    for response in responses:
        outcome = state.on_response(response)
        for key, snapshot in outcome.snapshots:
            snapshots[key] = sorted(d.id for d in snapshot.docs)
        requests.extend(outcome.requests)
        failed.extend(outcome.failed)
    return snapshots, requests, failed


def listening(*keys: str) -> ListenState[str]:
    state: ListenState[str] = ListenState(DB)
    for key in keys:
        state.add(key, query_target(DB, "c", ()))
    return state


def test_nothing_is_delivered_before_current_and_a_global_consistent_point() -> None:
    state = listening("a")
    snapshots, _, _ = feed(state, change(wire.ADD, 1), doc("d1", 1), doc("d2", 1))
    assert snapshots == {}
    snapshots, _, _ = feed(state, global_point(5))  # not current yet: a partial result set
    assert snapshots == {}
    snapshots, _, _ = feed(state, change(wire.CURRENT, 1, token=b"t1"))
    assert snapshots == {}  # current, but the consistent point has not come yet
    snapshots, _, _ = feed(state, global_point(6))
    assert snapshots == {"a": ["d1", "d2"]}


def test_an_empty_result_is_delivered_once_then_only_changes() -> None:
    state = listening("a")
    snapshots, _, _ = feed(state, change(wire.CURRENT, 1), global_point(1))
    assert snapshots == {"a": []}
    snapshots, _, _ = feed(state, global_point(2))
    assert snapshots == {}  # nothing changed
    snapshots, _, _ = feed(state, doc("d1", 3), global_point(3))
    assert snapshots == {"a": ["d1"]}
    snapshots, _, _ = feed(state, doc("d1", 3), global_point(4))
    assert snapshots == {}  # the same version re-sent is no change


def test_each_target_gets_only_its_own_documents_and_a_change_with_no_ids_applies_to_all() -> None:
    state = listening("a", "b")
    snapshots, _, _ = feed(
        state,
        change(wire.ADD, 1, 2),
        doc("x", 1, targets=(1,)),
        doc("y", 1, targets=(2,)),
        change(wire.CURRENT),
    )
    snapshots, _, _ = feed(state, global_point(2))
    assert snapshots == {"a": ["x"], "b": ["y"]}


def test_change_delete_and_remove_take_documents_out() -> None:
    state = listening("a")
    feed(
        state,
        doc("d1", 1),
        doc("d2", 1),
        doc("d3", 1),
        doc("d4", 1),
        change(wire.CURRENT, 1),
        global_point(1),
    )
    snapshots, _, _ = feed(
        state,
        doc("d1", 2, targets=(), removed=(1,)),  # changed so that it no longer matches
        delete("d2", 1),
        remove("d3", 1),
        global_point(2),
    )
    assert snapshots == {"a": ["d4"]}


def test_reset_drops_what_the_target_held_and_takes_the_resent_set() -> None:
    state = listening("a")
    feed(state, doc("d1", 1), doc("d2", 1), change(wire.CURRENT, 1), global_point(1))
    snapshots, _, _ = feed(state, change(wire.RESET, 1), doc("d2", 1))
    assert snapshots == {}
    snapshots, _, _ = feed(state, global_point(2))
    assert snapshots == {}  # not current after a reset
    snapshots, _, _ = feed(state, change(wire.CURRENT, 1), global_point(3))
    assert snapshots == {"a": ["d2"]}


def test_an_existence_filter_mismatch_relistens_that_target_from_scratch() -> None:
    state = listening("a", "b")
    feed(state, doc("d1", 1), doc("d2", 1), change(wire.CURRENT, 1, 2, token=b"t1"), global_point(1))
    _, requests, _ = feed(state, existence(1, 2))
    assert requests == []  # the count agrees
    _, requests, _ = feed(state, existence(1, 1))
    assert [r.WhichOneof("target_change") for r in requests] == ["remove_target", "add_target"]
    assert requests[0].remove_target == 1
    fresh = requests[1].add_target
    assert fresh.target_id not in (1, 2) and not fresh.resume_token  # a new id, no resume
    # late messages for the old id are ignored; the new id rebuilds the result set
    snapshots, _, _ = feed(state, doc("d9", 2, targets=(1,)), global_point(2))
    assert snapshots == {}
    snapshots, _, _ = feed(
        state, doc("d1", 1, targets=(fresh.target_id,)), change(wire.CURRENT, fresh.target_id)
    )
    snapshots, _, _ = feed(state, global_point(3))
    assert snapshots == {"a": ["d1"]}
    assert state.target("b").target_id == 2  # the other target is untouched


def test_a_target_error_ends_that_target_only() -> None:
    state = listening("a", "b")
    _, _, failed = feed(state, change(wire.REMOVE, 1, cause=7))
    assert failed == [("a", TargetError(7, "target failed"))]
    assert "a" not in state and "b" in state
    snapshots, _, _ = feed(state, doc("d1", 1, targets=(1, 2)), change(wire.CURRENT, 1, 2), global_point(1))
    assert snapshots == {"b": ["d1"]}


def test_remove_acknowledges_our_own_remove_target() -> None:
    state = listening("a", "b")
    request = state.remove("a")
    assert request is not None and request.remove_target == 1
    assert state.remove("a") is None
    snapshots, _, failed = feed(
        state, change(wire.ADD, 2), change(wire.REMOVE, 1), doc("d1", 1, targets=(1,)), change(wire.CURRENT)
    )
    snapshots, _, _ = feed(state, global_point(1))
    assert failed == [] and snapshots == {"b": []}


def test_resume_tokens_are_committed_only_at_a_consistent_point_where_the_target_was_current() -> None:
    state = listening("a", "b")
    feed(state, doc("d1", 1), change(wire.CURRENT, 1, token=b"a1"), change(wire.ADD, 2, token=b"b1"))
    feed(state, global_point(1, token=b"g1"))  # applies to every target; b is not current
    assert [r.add_target.resume_token for r in state.resume()] == [b"g1", b""]
    # changes after the consistent point are dropped with the stream: resume from before them
    feed(state, doc("d2", 2), change(wire.NO_CHANGE, 1, token=b"a2"))
    state.disconnected()
    assert [r.add_target.resume_token for r in state.resume()] == [b"g1", b""]
    snapshots, _, _ = feed(state, change(wire.CURRENT, 1, 2), global_point(3, token=b"g3"))
    assert snapshots == {"b": []}  # a: nothing new since what was delivered
    assert [r.add_target.resume_token for r in state.resume()] == [b"g3", b"g3"]


def test_the_query_target_carries_equality_filters() -> None:
    target = query_target(DB, "clients/u1/notifications", (("read", False), ("k", None)))
    assert target.query.parent == f"{DB}/documents/clients/u1"
    structured = target.query.structured_query
    assert structured.from_[0].collection_id == "notifications"
    first, second = structured.where.composite_filter.filters
    assert first.field_filter.field.field_path == "read" and first.field_filter.value.boolean_value is False
    assert second.unary_filter.op == wire.StructuredQuery.UnaryFilter.Operator.IS_NULL


def test_a_target_relistened_without_a_token_takes_only_the_resent_set() -> None:
    """The npm emulator issues no resume tokens: after a reconnect it re-sends the result set
    with no RESET, and a document that left meanwhile is simply not among it."""
    state = listening("a")
    feed(state, doc("d1", 1), doc("d2", 1), change(wire.CURRENT, 1), global_point(1))
    state.disconnected()
    assert [r.add_target.resume_token for r in state.resume()] == [b""]
    snapshots, _, _ = feed(state, change(wire.ADD, 1), doc("d2", 1), change(wire.CURRENT, 1), global_point(2))
    assert snapshots == {"a": ["d2"]}


def test_a_consistent_point_looks_only_at_targets_that_changed() -> None:
    state = listening("a", "b", "c")
    feed(state, change(wire.ADD, 1, 2, 3), change(wire.CURRENT), global_point(1, token=b"g1"))
    snapshots, _, _ = feed(state, doc("d1", 2, targets=(2,)), global_point(2, token=b"g2"))
    assert snapshots == {"b": ["d1"]}
    # the untouched targets still resume from the newest stream-wide token
    assert [r.add_target.resume_token for r in state.resume()] == [b"g2", b"g2", b"g2"]
    feed(state, change(wire.RESET, 3), global_point(3, token=b"g3"))
    state.disconnected()
    assert [r.add_target.resume_token for r in state.resume()] == [b"g3", b"g3", b"g2"]


def test_each_snapshot_says_what_changed_since_the_previous_one() -> None:
    """The changes carried with a snapshot: what the registry watch reads instead of the whole
    result set, so that a heartbeat costs one entry, not every user."""
    state = listening("a")
    changes = []
    for response in (doc("d1", 1), doc("d2", 1), change(wire.CURRENT, 1), global_point(1)):
        changes += [s.changes for _, s in state.on_response(response).snapshots]
    for response in (doc("d1", 2), doc("d2", 1), delete("d3", 1), remove("d2", 1), global_point(2)):
        changes += [s.changes for _, s in state.on_response(response).snapshots]
    first, second = changes
    assert first is not None and sorted(d.id for d in first.upserted) == ["d1", "d2"] and not first.removed
    assert second is not None and [d.id for d in second.upserted] == ["d1"] and second.removed == ("d2",)


def test_a_consistent_point_older_than_the_last_one_delivers_nothing() -> None:
    """As the SDKs: a snapshot is raised only at a read time not before the last one."""
    state = listening("a")
    feed(state, change(wire.ADD, 1), change(wire.CURRENT, 1), global_point(5, token=b"g5"))
    snapshots, _, _ = feed(state, doc("d1", 6), global_point(4, token=b"g4"))
    assert snapshots == {}
    assert [r.add_target.resume_token for r in state.resume()] == [b"g5"]
    snapshots, _, _ = feed(state, global_point(7))
    assert snapshots == {"a": ["d1"]}
