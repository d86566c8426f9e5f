"""Streams spread over gRPC connections: a new target joins a stream with room, a new stream
goes on the least loaded connection with fewer than `max_streams_per_connection` streams
(Firestore serves at most 100 per connection), and a connection opens only when all are full.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from listeners.source.listen.stream import ListenStream


@dataclass(eq=False)
class Connection:
    channel: grpc.aio.Channel
    streams: list[ListenStream] = field(default_factory=list)


class ListenPool:
    def __init__(
        self,
        new_channel: Callable[[], grpc.aio.Channel],
        new_stream: Callable[[grpc.aio.Channel], ListenStream],
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
            connection = Connection(self._new_channel())
            self.connections.append(connection)
        stream = self._new_stream(connection.channel)
        connection.streams.append(stream)
        return stream

    async def aclose(self) -> None:
        streams = self.streams
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        for connection in self.connections:
            with contextlib.suppress(Exception):
                await connection.channel.close(grace=None)
        self.connections.clear()


def open_listen(channel: grpc.aio.Channel) -> Callable[[Any, Any], Any]:
    """The Listen stream-stream method on `channel`, in raw protobuf messages."""
    from listeners.source.listen import wire

    method = channel.stream_stream(
        wire.LISTEN_METHOD,
        request_serializer=wire.ListenRequest.SerializeToString,
        response_deserializer=wire.ListenResponse.FromString,
    )

    def open_call(requests: Any, metadata: Any) -> Any:
        return method(requests, metadata=metadata)

    return open_call
