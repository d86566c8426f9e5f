"""A scripted Firestore Listen server: a grpc.aio server on 127.0.0.1 that serves the real
`google.firestore.v1.Firestore/Listen` RPC and, for each call, plays what a test's script
says. It shows what only production sends (a REMOVE without a cause, PERMISSION_DENIED, a
stream-wide CURRENT before an ADD acknowledgement...); no emulator does. `ListenSource`
connects to it as to an emulator.

A script is an async function of one `Call`: it reads the client's requests, sends
responses, and ends the call with a status (`fail`), leaves it open (`hold`) or returns (the
call ends with OK). Every call started, request read and snapshot recorded pokes
`ListenServer.signal`, which the tests wait on (no sleeps).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from listeners.source.listen import ListenSource, wire
from listeners.source.snapshots import Snapshot, SnapshotHandler

DATABASE = "projects/p/databases/(default)"
WAIT = 60.0  # only a guard against a hang: every wait ends on an event long before


class Signal:
    """Set at each thing that happens; `until` re-checks a condition after each."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def poke(self) -> None:
        self._event.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not condition():
                self._event.clear()
                await self._event.wait()


class Call:
    """One Listen call, as its script sees it."""

    def __init__(self, number: int, context: Any, signal: Signal) -> None:
        self.number = number  # 0 for the first call of the test, 1 for the first reconnect...
        self.requests: list[Any] = []
        self._context = context
        self._signal = signal

    @property
    def removed(self) -> list[int]:
        """Target ids the client sent remove_target for."""
        return [r.remove_target for r in self.requests if r.WhichOneof("target_change") == "remove_target"]

    async def request(self) -> Any:
        request = await self._context.read()
        if request is grpc.aio.EOF:
            await asyncio.Event().wait()  # the client closed its side: wait for the call's end
        self.requests.append(request)
        self._signal.poke()
        return request

    async def added(self, count: int) -> dict[str, int]:
        """Reads requests until `count` add_target came: target ids by collection id."""
        targets: dict[str, int] = {}
        while len(targets) < count:
            request = await self.request()
            if request.WhichOneof("target_change") == "add_target":
                target = request.add_target
                targets[target.query.structured_query.from_[0].collection_id] = target.target_id
        return targets

    def resume_token(self, target_id: int) -> bytes:
        return next(  # type: ignore[no-any-return]
            r.add_target.resume_token
            for r in self.requests
            if r.WhichOneof("target_change") == "add_target" and r.add_target.target_id == target_id
        )

    async def send(self, *responses: Any) -> None:
        for response in responses:
            await self._context.write(response)

    async def fail(self, code: grpc.StatusCode, details: str) -> NoReturn:
        await self._context.abort(code, details)
        raise AssertionError("abort returned")  # pragma: no cover

    async def hold(self) -> NoReturn:
        """Keep the call open until the client goes, reading what it sends."""
        while True:
            await self.request()


Script = Callable[[Call], Awaitable[None]]


class ListenServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.calls: list[Call] = []
        self.errors: list[BaseException] = []  # a script's own failure, re-raised at exit
        self.signal = Signal()
        self._server: Any = None
        self.port = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> ListenServer:
        handler = grpc.stream_stream_rpc_method_handler(
            self._listen,
            request_deserializer=wire.ListenRequest.FromString,
            response_serializer=wire.ListenResponse.SerializeToString,
        )
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("google.firestore.v1.Firestore", {"Listen": handler}),)
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop(None)
        if self.errors:
            raise self.errors[0]

    async def _listen(self, requests: Any, context: Any) -> None:
        call = Call(len(self.calls), context, self.signal)
        self.calls.append(call)
        self.signal.poke()
        try:
            await self.script(call)
        except asyncio.CancelledError:
            return  # the server stops: nothing for gRPC to log
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # an assertion in a script: the test must fail on it
            self.errors.append(exc)
            self.signal.poke()
            raise


def source(server: ListenServer, **options: Any) -> ListenSource:
    """A Listen source on the scripted server; never probing (a script's silence is meant)."""
    return ListenSource("p", emulator_host=server.host, silence=math.inf, **options)


class Recorder:
    """Every snapshot each watch got, as sorted document ids."""

    def __init__(self, signal: Signal) -> None:
        self.snapshots: dict[str, list[Snapshot]] = {}
        self._signal = signal

    def handler(self, name: str) -> SnapshotHandler:
        def on_snapshot(snapshot: Snapshot) -> None:
            self.snapshots.setdefault(name, []).append(snapshot)
            self._signal.poke()

        return on_snapshot

    def ids(self, name: str) -> list[list[str]]:
        return [sorted(d.id for d in s.docs) for s in self.snapshots.get(name, [])]

    def latest(self, name: str) -> list[str] | None:
        ids = self.ids(name)
        return ids[-1] if ids else None


def ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def change(
    kind: int,
    *target_ids: int,
    token: bytes = b"",
    read_time: int | None = None,
    cause: tuple[int, str] | None = None,
) -> Any:
    response = wire.ListenResponse()
    tc = response.target_change
    tc.target_change_type = kind
    tc.target_ids.extend(target_ids)
    if token:
        tc.resume_token = token
    if read_time is not None:
        tc.read_time.CopyFrom(ts(read_time))
    if cause is not None:
        tc.cause.code, tc.cause.message = cause
    return response


def point(read_time: int, token: bytes = b"") -> Any:
    """A global consistent point: NO_CHANGE with no target ids and a read time."""
    return change(wire.NO_CHANGE, token=token, read_time=read_time)


def document(collection: str, doc_id: str, *target_ids: int, version: int = 1, **fields: int) -> Any:
    response = wire.ListenResponse()
    dc = response.document_change
    dc.document.name = f"{DATABASE}/documents/{collection}/{doc_id}"
    dc.document.update_time.CopyFrom(ts(version))
    for key, value in fields.items():
        dc.document.fields[key].integer_value = value
    dc.target_ids.extend(target_ids)
    return response
