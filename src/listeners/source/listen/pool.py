"""Streams spread over gRPC connections: a new target joins a stream with room, a new stream
goes on the least loaded connection with fewer than `max_streams_per_connection` streams
(Firestore serves at most 100 per connection), and a connection opens only when all are full.

A connection can die without closing (a NAT entry dropped, a peer gone behind a blackhole):
gRPC's own keepalive notices only after minutes, since servers refuse frequent pings. A
stream that finds its connection silent (`stream.py`) has it replaced: the old channel is
closed, which ends every call on it, and each of its streams resumes on the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import grpc

from listeners.source.listen import wire
from listeners.source.listen.stream import ListenStream, Metadata

log = logging.getLogger(__name__)


class Connection:
    """One gRPC channel (one HTTP/2 connection) and the streams on it."""

    def __init__(self, new_channel: Callable[[], grpc.aio.Channel]) -> None:
        self._new_channel = new_channel
        self.channel = new_channel()
        self.generation = 0  # bumped by each replacement: a late report of the old one is moot
        self.streams: list[ListenStream] = []
        self._closing: set[asyncio.Task[None]] = set()

    def open_call(self, requests: Any, metadata: Metadata) -> Any:
        return open_listen(self.channel)(requests, metadata)

    def replace(self, generation: int) -> None:
        """The connection of `generation` is dead: a new one for every stream on it."""
        if generation != self.generation:
            return  # another stream on it found out first
        old, self.channel = self.channel, self._new_channel()
        self.generation += 1
        log.warning("firestore connection silent; replacing it", extra={"streams": len(self.streams)})
        closing = asyncio.create_task(self._close(old), name="close-firestore-channel")
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        await self._close(self.channel)
        await asyncio.gather(*self._closing, return_exceptions=True)

    @staticmethod
    async def _close(channel: grpc.aio.Channel) -> None:
        with contextlib.suppress(Exception):
            await channel.close(grace=None)  # cancels its calls at once, whatever the peer does


class ListenPool:
    def __init__(
        self,
        new_channel: Callable[[], grpc.aio.Channel],
        new_stream: Callable[[Connection], ListenStream],
        *,
        max_streams_per_connection: int,
    ) -> None:
        self._new_channel = new_channel
        self._new_stream = new_stream
        self._max_streams = max_streams_per_connection
        self.connections: list[Connection] = []

    @property
    def streams(self) -> list[ListenStream]:
        return [s for c in self.connections for s in c.streams]

    def stream_with_room(self) -> ListenStream:
        for connection in self.connections:
            for stream in connection.streams:
                if stream.has_room:
                    return stream
        roomy = [c for c in self.connections if len(c.streams) < self._max_streams]
        if roomy:
            connection = min(roomy, key=lambda c: len(c.streams))
        else:
            connection = Connection(self._new_channel)
            self.connections.append(connection)
        stream = self._new_stream(connection)
        connection.streams.append(stream)
        return stream

    async def aclose(self) -> None:
        streams = self.streams
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        for connection in self.connections:
            await connection.aclose()
        self.connections.clear()


def open_listen(channel: grpc.aio.Channel) -> Callable[[Any, Any], Any]:
    """The Listen stream-stream method on `channel`, in raw protobuf messages."""
    method = channel.stream_stream(
        wire.LISTEN_METHOD,
        request_serializer=wire.ListenRequest.SerializeToString,
        response_deserializer=wire.ListenResponse.FromString,
    )

    def open_call(requests: Any, metadata: Any) -> Any:
        return method(requests, metadata=metadata)

    return open_call
