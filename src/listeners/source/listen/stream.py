"""One Listen stream holding many targets: opens the call, re-listens every target with its
resume token after a failure (backoff with jitter), and hands the protocol's outcomes to the
watches. Closing a watch sends remove_target; the stream itself stays up.

A quiet stream may be a dead connection: Firestore sends every stream a consistent point
about once a minute, but a blackholed peer sends nothing, and gRPC pings are too rare to tell
(servers refuse pings more often than every 5 minutes). So a stream that has heard nothing for
`silence` seconds asks a question the server must answer: it listens to one document (a
probe target, removed at the first answer). Without any answer within `answer` seconds the
connection is replaced (`pool.Connection`) and the stream resumes on the new one.

The backoff starts again only once the stream serves (data or a consistent point), not on an
ADD acknowledgement: a server that acknowledges every target and then closes the stream would
otherwise have them all re-listened twice a second. Codes that no retry heals are retried
slowly and shown as degraded (`status.py`) until data flows again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from typing import Any, Protocol

import grpc

from listeners.source.listen import wire
from listeners.source.listen.protocol import ListenState, TargetError
from listeners.source.listen.status import ListenStatus
from listeners.source.snapshots import Snapshot
from listeners_bridge.backoff import Backoff, reraise_if_cancelled
from listeners_bridge.waits import wait_event

log = logging.getLogger(__name__)

RECONNECT = Backoff(base=0.5, cap=30.0)
# After a permanent error: a fix (a role granted, a database created) is picked up within
# minutes, and the stream's targets are not re-listened every few seconds meanwhile.
SLOW_RECONNECT = Backoff(base=30.0, cap=300.0)
# What no retry heals, as both SDKs read it: the Web SDK's `isPermanentError` (rpc_error.ts),
# and the codes watch.py does not recover from. ABORTED is retried, as watch.py does (the Web
# SDK leaves it to the caller). UNAUTHENTICATED is retried at once with a fresh token, as both
# do (the token may have expired); refused again with a fresh one, it is the credentials.
PERMANENT = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.DATA_LOSS,
    }
)
SILENCE_SECONDS = 30.0  # heard nothing this long: probe
ANSWER_SECONDS = 20.0  # no answer to the probe this long: the connection is dead
PROBE_DOCUMENT = "listeners-probe/stream"  # never written: listening to it costs one read
Metadata = Sequence[tuple[str, str]]
MetadataFactory = Callable[[bool], Awaitable[Metadata]]  # argument: force a token refresh
Sleep = Callable[[float], Awaitable[None]]


# What a stream needs of the objects around it, as protocols: the stream sits below the pool
# and the source that hold it, and imports neither.


class Link(Protocol):
    """The connection a stream's calls go over (`pool.Connection`)."""

    generation: int

    def open_call(self, requests: AsyncIterator[Any], metadata: Metadata) -> Any:
        """A grpc.aio stream-stream Listen call."""

    def replace(self, generation: int) -> None:
        """The connection of that generation is dead: make a new one."""


class Watcher(Hashable, Protocol):
    """Who a target is for (`source.ListenWatch`): the stream's state knows the target by it,
    and it is told the target's outcomes, on the loop, inside the stream's task."""

    def deliver(self, snapshot: Snapshot) -> None:
        """The target's result set changed (or is read for the first time)."""

    def failed(self, error: TargetError) -> None:
        """The server removed the target with its own error: nothing more comes for it."""


class ListenStream:
    def __init__(
        self,
        link: Link,
        database: str,
        metadata: MetadataFactory,
        capacity: int,
        backoff: Backoff = RECONNECT,
        *,
        silence: float = SILENCE_SECONDS,
        answer: float = ANSWER_SECONDS,
        status: ListenStatus | None = None,
        slow: Backoff = SLOW_RECONNECT,
        sleep: Sleep = asyncio.sleep,  # between attempts (tests: record the delay, go on)
    ) -> None:
        self.state: ListenState[Watcher] = ListenState(database)
        self.capacity = capacity
        self.restarts = 0  # calls that ended and were replaced
        self.responses = 0
        self.served = 0  # responses that were data or a consistent point
        self._status = status or ListenStatus()
        self._slow = slow
        self._sleep = sleep
        self.probes = 0  # questions asked of a quiet stream
        self._link = link
        self._metadata = metadata
        self._backoff = backoff
        self._silence = silence
        self._answer = answer
        self._heard = asyncio.Event()  # set by every response
        self._silent_reason = ""
        self._outgoing: asyncio.Queue[Any] | None = None
        self._call: Any = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._refresh_token = False
        self._all_current = asyncio.Event()

    @property
    def targets(self) -> int:
        return len(self.state)

    @property
    def has_room(self) -> bool:
        return len(self.state) < self.capacity

    @property
    def open(self) -> bool:
        return self._call is not None

    def add(self, watch: Watcher, target: Any) -> None:
        self._all_current.clear()
        self._send(self.state.add(watch, target))
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="firestore-listen")

    def remove(self, watch: Watcher) -> None:
        request = self.state.remove(watch)
        if request is not None:
            self._send(request)

    def interrupt(self) -> None:
        """Cut the current call as a network failure would (tests): the stream resumes."""
        if self._call is not None:
            self._all_current.clear()
            self._call.cancel()

    async def current(self) -> None:
        """Until every target of this stream is CURRENT (tests: Google's emulator can miss a
        write that races a target being added, so they write only once this returns)."""
        await self._all_current.wait()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _send(self, request: Any) -> None:
        # Without an open call the request is not lost: the next call starts with `resume()`.
        if self._outgoing is not None:
            self._outgoing.put_nowait(request)

    async def _run(self) -> None:
        attempt = 0  # calls ended since the stream last served
        while True:
            while not len(self.state):  # an idle stream opens no call
                self._status.recovered(self, "no targets left on the stream")
                self._wake.clear()
                await self._wake.wait()
            served = self.served
            fresh_token = self._refresh_token
            code: grpc.StatusCode | None = None
            try:
                await self._session()
                reason, label = "closed by the server", "OK"
            except asyncio.CancelledError:
                reraise_if_cancelled()  # our task was cancelled; otherwise the call was
                reason = self._silent_reason or "call cancelled"
                label = "SILENT" if self._silent_reason else "CANCELLED"
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                reason, label = f"{code.name}: {exc.details()}", code.name
                self._refresh_token = code == grpc.StatusCode.UNAUTHENTICATED
            except Exception as exc:  # a broken call must never end the stream for good
                reason, label = f"{type(exc).__name__}: {exc}", "CLIENT"
            finally:
                self._outgoing = None
                self._call = None
                self._silent_reason = ""
                self._all_current.clear()
                self.state.disconnected()
            self.restarts += 1
            self._status.ended(label)
            if self.served > served:
                attempt = 0
            refused = code == grpc.StatusCode.UNAUTHENTICATED and fresh_token and self.served == served
            if code in PERMANENT or refused:
                self._status.degraded(self, reason)
                delay = self._slow.delay(attempt)
            elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                # As the SDKs do (`resetToMax` in persistent_stream.ts): the longest step at once.
                delay = Backoff(self._backoff.cap, self._backoff.cap).delay(0)
            else:
                delay = self._backoff.delay(attempt)
            attempt += 1
            log.warning(
                "firestore listen stream ended; resuming",
                extra={"reason": reason, "targets": len(self.state), "retry_in": round(delay, 2)},
            )
            await self._sleep(delay)

    async def _session(self) -> None:
        metadata = await self._metadata(self._refresh_token)
        self._refresh_token = False
        outgoing: asyncio.Queue[Any] = asyncio.Queue()
        self._status.relistened("stream", len(self.state))
        for request in self.state.resume():  # no await from here until the call is set
            outgoing.put_nowait(request)
        self._outgoing = outgoing

        async def requests() -> AsyncIterator[Any]:
            while (request := await outgoing.get()) is not None:
                yield request

        generation = self._link.generation
        call = self._link.open_call(requests(), metadata)
        self._call = call
        prober = asyncio.create_task(self._probe_when_silent(call, outgoing, generation), name="listen-probe")
        try:
            await self._read(call, outgoing)
        finally:
            prober.cancel()
            # Ends the requests: gRPC's task that reads them is left waiting on a call the
            # server ended, and would be destroyed pending (logged) at the next collection.
            outgoing.put_nowait(None)

    async def _read(self, call: Any, outgoing: asyncio.Queue[Any]) -> None:
        async for response in call:
            self.responses += 1
            self._heard.set()
            outcome = self.state.on_response(response)
            if outcome.progress:
                self.served += 1
                self._status.recovered(self, "data flows again")
            if outcome.undecodable:
                self._status.undecodable(len(outcome.undecodable))
            if outcome.mismatches:
                self._status.relistened("existence_filter", outcome.mismatches)
            for request in outcome.requests:
                outgoing.put_nowait(request)
            for watch, error in outcome.failed:
                self._status.target_failed(error.code)
                watch.failed(error)
            for watch, snapshot in outcome.snapshots:
                if watch in self.state:  # an earlier callback may have closed it
                    watch.deliver(snapshot)
            if not self._all_current.is_set() and self.state.all_current():
                self._all_current.set()

    async def _probe_when_silent(self, call: Any, outgoing: asyncio.Queue[Any], generation: int) -> None:
        """Probes after each `silence` without a response; cuts the call (and has the
        connection replaced) when a probe gets no answer within `answer`."""
        while True:
            self._heard.clear()
            if await wait_event(self._heard, self._silence):
                continue  # heard something: alive
            self.probes += 1
            probe_id = self.state.reserve_id()  # responses for it match no watch: ignored
            outgoing.put_nowait(probe_request(self.state.database, probe_id))
            answered = await wait_event(self._heard, self._answer)
            self._status.probed(answered)
            outgoing.put_nowait(wire.ListenRequest(database=self.state.database, remove_target=probe_id))
            if not answered:
                self._silent_reason = (
                    f"no answer within {self._answer:g} s to a probe after {self._silence:g} s of silence"
                )
                self._link.replace(generation)
                call.cancel()
                return


def probe_request(database: str, target_id: int) -> Any:
    target = wire.Target(target_id=target_id)
    target.documents.documents.append(f"{database}/documents/{PROBE_DOCUMENT}")
    return wire.ListenRequest(database=database, add_target=target)


__all__ = ["Link", "ListenStream", "Metadata", "MetadataFactory", "TargetError", "Watcher"]
