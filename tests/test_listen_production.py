"""The Listen client on paths only production produces, against a scripted Listen server
(`tests/listen_script.py`). Google's emulator shows everything else (test_listen_source.py)."""

from __future__ import annotations

import grpc

from listeners.source.listen import wire
from listeners.source.snapshots import Query

from .listen_script import Call, ListenServer, Recorder, change, document, point, source


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
        listen = source(server)
        seen = Recorder(server.signal)
        listen.watch(Query("a"), seen.handler("a"))
        try:
            await server.signal.until(lambda: seen.latest("a") in (["x", "y"], ["y"]))
            assert seen.ids("a") == [["x"], ["x", "y"]]
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
