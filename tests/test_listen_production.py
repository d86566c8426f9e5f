"""The Listen client on paths only production produces, against a scripted Listen server
(`tests/listen_script.py`): a REMOVE without a cause, permanent and exhausting stream errors,
stream-wide CURRENT and RESET before an ADD acknowledgement, an undecodable document, and a
consistent point that is not a NO_CHANGE. Google's emulator shows everything else
(test_listen_source.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest

from listeners.metrics import Metrics
from listeners.service import Service
from listeners.source.listen import ListenSource, wire
from listeners.source.listen.status import ListenStatus
from listeners.source.listen.stream import RECONNECT, SLOW_RECONNECT
from listeners.source.snapshots import Query
from listeners_bridge.backoff import Backoff

from .listen_script import Call, ListenServer, Recorder, change, document, point, source


class Pauses:
    """The stream's wait between attempts: records each delay and what `observe` says at that
    moment, and returns at once (no test waits out a backoff)."""

    def __init__(self, observe: Callable[[], Any] = lambda: None) -> None:
        self.delays: list[float] = []
        self.seen: list[Any] = []
        self._observe = observe

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.seen.append(self._observe())
        await asyncio.sleep(0)


def within(backoff: Backoff, attempt: int, delay: float) -> bool:
    """Whether `delay` is what `backoff` gives at `attempt` (equal jitter: half to all the step)."""
    step = min(backoff.cap, backoff.base * 2.0**attempt)
    return step / 2 <= delay <= step


def health_of(listen: ListenSource, metrics: Metrics) -> dict[str, object]:
    """`Service.health()` with everything but the source well."""
    service = Service(
        settings=cast(Any, None),
        metrics=metrics,
        publisher=cast(Any, SimpleNamespace(up=True)),
        source=listen,
        node=cast(Any, SimpleNamespace(registry_healthy=True, sessions={})),
        control=cast(Any, None),
        membership=cast(Any, None),
        broker=cast(Any, None),
        supervisor=cast(Any, SimpleNamespace(restarts={})),
    )
    return service.health()


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == text]


async def test_a_remove_without_a_cause_fails_that_watch_and_the_others_flow() -> None:
    async def script(call: Call) -> None:
        if call.number:
            await call.hold()  # a reconnect: the test fails on it
        ids = await call.added(2)
        a, b = ids["a"], ids["b"]
        await call.send(
            change(wire.ADD, a, b),
            document("a", "x", a),
            document("b", "y", b),
            change(wire.CURRENT, a, b),
            point(1, b"t1"),
        )
        await call.send(change(wire.REMOVE, a))  # not asked for: we never sent remove_target
        await call.send(document("b", "z", b), point(2, b"t2"))
        renewed = (await call.added(1))["a"]  # the replacement watch, as the node makes it
        await call.send(
            change(wire.ADD, renewed), document("a", "x", renewed), change(wire.CURRENT, renewed), point(3)
        )
        await call.hold()

    async with ListenServer(script) as server:
        listen = source(server)
        seen = Recorder(server.signal)
        first = listen.watch(Query("a"), seen.handler("a"))
        other = listen.watch(Query("b"), seen.handler("b"))
        try:
            await server.signal.until(lambda: seen.latest("b") == ["y", "z"] or len(server.calls) > 1)
            assert len(server.calls) == 1, "the stream reconnected"
            assert not first.active and first.error is not None and first.error.code == 13  # INTERNAL
            assert other.active and seen.ids("a") == [["x"]]
            await first.close()
            listen.watch(Query("a"), seen.handler("a"))
            await server.signal.until(lambda: len(seen.ids("a")) == 2)
            assert seen.ids("a") == [["x"], ["x"]]  # a fresh sync on a new target
        finally:
            await listen.aclose()


async def test_a_permanent_error_is_retried_slowly_and_shows_as_degraded_until_data_flows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def script(call: Call) -> None:
        a = (await call.added(1))["a"]
        if call.number < 3:
            await call.fail(grpc.StatusCode.PERMISSION_DENIED, "Missing or insufficient permissions.")
        await call.send(change(wire.ADD, a), document("a", "x", a), change(wire.CURRENT, a), point(1))
        await call.hold()

    metrics = Metrics()

    def degraded() -> float | None:
        return metrics.registry.get_sample_value("listeners_listen_degraded")

    def stream_errors(code: str) -> float | None:
        return metrics.registry.get_sample_value("listeners_listen_stream_errors_total", {"code": code})

    async with ListenServer(script) as server:
        pauses = Pauses(lambda: (listen.degraded_reason, degraded(), health_of(listen, metrics)))
        listen = source(server, metrics=metrics, sleep=pauses)
        seen = Recorder(server.signal)
        listen.watch(Query("a"), seen.handler("a"))
        try:
            assert listen.degraded_reason is None and degraded() == 0
            await server.signal.until(lambda: bool(seen.ids("a")))
            reason = "PERMISSION_DENIED: Missing or insufficient permissions."
            assert [(r, g) for r, g, _ in pauses.seen] == [(reason, 1.0)] * 3
            assert all(within(SLOW_RECONNECT, n, delay) for n, delay in enumerate(pauses.delays))
            health = pauses.seen[0][2]
            assert health["status"] == "degraded" and health["reason"] == f"firestore: {reason}"
            assert {"version", "listeners_count", "redis"} <= health.keys()
            # data flows again: recovered, said once
            assert listen.degraded_reason is None and degraded() == 0
            assert health_of(listen, metrics)["status"] == "ok"
            assert stream_errors("PERMISSION_DENIED") == 3
            assert len(messages(caplog, "firestore listen degraded")) == 1
            assert len(messages(caplog, "firestore listen recovered")) == 1
        finally:
            await listen.aclose()


async def test_unauthenticated_again_after_a_fresh_token_is_permanent() -> None:
    refreshed: list[bool] = []

    async def tokens(*, refresh: bool = False) -> str:
        refreshed.append(refresh)
        return "token"

    async def script(call: Call) -> None:
        a = (await call.added(1))["a"]
        if call.number < 2:
            await call.fail(
                grpc.StatusCode.UNAUTHENTICATED, "Request had invalid authentication credentials."
            )
        await call.send(change(wire.ADD, a), change(wire.CURRENT, a), point(1))
        await call.hold()

    async with ListenServer(script) as server:
        pauses = Pauses(lambda: listen.degraded_reason)
        listen = source(server, tokens=tokens, sleep=pauses)
        seen = Recorder(server.signal)
        listen.watch(Query("a"), seen.handler("a"))
        try:
            await server.signal.until(lambda: bool(seen.ids("a")))
            # the first may be an expired token (the SDKs' reading): at once, with a fresh one
            assert refreshed == [False, True, True]
            assert pauses.seen[0] is None and within(RECONNECT, 0, pauses.delays[0])
            # rejected again with a fresh token: the credentials themselves
            assert pauses.seen[1] == "UNAUTHENTICATED: Request had invalid authentication credentials."
            assert within(SLOW_RECONNECT, 1, pauses.delays[1])
            assert listen.degraded_reason is None
        finally:
            await listen.aclose()


async def test_the_backoff_grows_through_add_acknowledgements_and_is_longest_when_exhausted() -> None:
    async def script(call: Call) -> None:
        a = (await call.added(1))["a"]
        await call.send(change(wire.ADD, a))  # an acknowledgement is no sign the stream serves
        if call.number < 3:
            await call.fail(grpc.StatusCode.UNAVAILABLE, "The service is currently unavailable.")
        if call.number == 3:  # data and a consistent point: the backoff starts again
            await call.send(document("a", "x", a), change(wire.CURRENT, a), point(1))
            await call.fail(grpc.StatusCode.UNAVAILABLE, "The service is currently unavailable.")
        if call.number == 4:
            await call.fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "Quota exceeded.")
        await call.hold()

    async with ListenServer(script) as server:
        pauses = Pauses()
        listen = source(server, sleep=pauses)
        listen.watch(Query("a"), Recorder(server.signal).handler("a"))
        try:
            await server.signal.until(lambda: len(server.calls) == 6)
            first, second, third, after_data, exhausted = pauses.delays
            assert (
                within(RECONNECT, 0, first) and within(RECONNECT, 1, second) and within(RECONNECT, 2, third)
            )
            assert within(RECONNECT, 0, after_data)
            # as the SDKs do: the longest step at once, not to overload the backend
            assert RECONNECT.cap / 2 <= exhausted <= RECONNECT.cap
            assert listen.degraded_reason is None  # retried as the SDKs do: not permanent
        finally:
            await listen.aclose()


async def test_a_stream_wide_current_before_the_add_acknowledgement_delivers_no_empty_snapshot() -> None:
    async def script(call: Call) -> None:
        a = (await call.added(1))["a"]
        await call.send(change(wire.CURRENT), point(1))  # for the targets already acknowledged
        await call.send(change(wire.ADD, a), document("a", "x", a), change(wire.CURRENT, a), point(2))
        await call.hold()

    async with ListenServer(script) as server:
        listen = source(server)
        seen = Recorder(server.signal)
        listen.watch(Query("a"), seen.handler("a"))
        try:
            await server.signal.until(lambda: seen.latest("a") == ["x"])
            assert seen.ids("a") == [["x"]]  # an empty first one would read "every user gone"
        finally:
            await listen.aclose()


async def test_a_stream_wide_reset_before_the_add_acknowledgement_leaves_that_target_alone() -> None:
    async def script(call: Call) -> None:
        a = (await call.added(1))["a"]
        if call.number == 0:
            await call.send(
                change(wire.ADD, a), document("a", "x", a), change(wire.CURRENT, a), point(1, b"t1")
            )
            await call.fail(grpc.StatusCode.UNAVAILABLE, "The service is currently unavailable.")
        assert call.resume_token(a) == b"t1"
        # resumed: nothing changed since t1, so nothing is re-sent for the target
        await call.send(change(wire.RESET), change(wire.ADD, a), change(wire.CURRENT, a), point(2, b"t2"))
        await call.send(document("a", "y", a), point(3))
        await call.hold()

    async with ListenServer(script) as server:
        listen = source(server, sleep=Pauses())
        seen = Recorder(server.signal)
        listen.watch(Query("a"), seen.handler("a"))
        try:
            await server.signal.until(lambda: seen.latest("a") in (["x", "y"], ["y"]))
            assert seen.ids("a") == [["x"], ["x", "y"]]
        finally:
            await listen.aclose()


async def test_an_undecodable_document_fails_its_target_only(caplog: pytest.LogCaptureFixture) -> None:
    bad = document("a", "x", 1)
    bad.document_change.document.fields[
        "where"
    ].field_reference_value = "secret-path"  # a type we do not read
    bad.document_change.document.fields["note"].string_value = "secret-text"

    async def script(call: Call) -> None:
        if call.number:
            await call.hold()  # a reconnect: the test fails on it
        ids = await call.added(2)
        a, b = ids["a"], ids["b"]
        assert a == 1
        await call.send(change(wire.ADD, a, b), bad, document("b", "y", b), change(wire.CURRENT, a, b))
        await call.send(point(1), document("b", "z", b), point(2))
        await call.hold()

    metrics = Metrics()
    async with ListenServer(script) as server:
        listen = source(server, metrics=metrics)
        seen = Recorder(server.signal)
        failing = listen.watch(Query("a"), seen.handler("a"))
        other = listen.watch(Query("b"), seen.handler("b"))
        try:
            await server.signal.until(
                lambda: (
                    (seen.latest("b") == ["y", "z"] and 1 in server.calls[0].removed) or len(server.calls) > 1
                )
            )
            assert len(server.calls) == 1, "the stream broke"
            assert not failing.active and failing.error is not None and "undecodable" in failing.error.message
            assert other.active and seen.ids("b") == [["y"], ["y", "z"]] and "a" not in seen.snapshots
            assert metrics.registry.get_sample_value("listeners_listen_undecodable_documents_total") == 1
            logged = "\n".join(f"{r.getMessage()} {r.__dict__.get('reason', '')}" for r in caplog.records)
            assert "/documents/a/x" in logged and "field_reference_value" in logged
            assert "secret" not in logged
        finally:
            await listen.aclose()


async def test_a_target_change_with_no_target_ids_and_a_read_time_is_a_consistent_point() -> None:
    async def script(call: Call) -> None:
        a = (await call.added(1))["a"]
        await call.send(change(wire.ADD, a), document("a", "x", a))
        await call.send(change(wire.CURRENT, read_time=5))  # no NO_CHANGE follows at once
        await call.send(point(9))
        await call.hold()

    async with ListenServer(script) as server:
        listen = source(server)
        seen = Recorder(server.signal)
        listen.watch(Query("a"), seen.handler("a"))
        try:
            await server.signal.until(lambda: bool(seen.ids("a")))
            (snapshot,) = seen.snapshots["a"]
            assert [d.id for d in snapshot.docs] == ["x"]
            assert snapshot.read_time is not None and snapshot.read_time.timestamp() == 5
        finally:
            await listen.aclose()


def test_a_target_error_code_outside_google_rpc_counts_as_other() -> None:
    """The code comes from the server: the metric's label set stays the 17 codes and `other`."""
    metrics = Metrics()
    status = ListenStatus(metrics)
    for code in (7, 2**31 - 1, -5, 17):
        status.target_failed(code)
    counted = {
        sample.labels["code"]: sample.value
        for family in metrics.registry.collect()
        if family.name == "listeners_listen_target_errors"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert counted == {"7": 1.0, "other": 3.0}
