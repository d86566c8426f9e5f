"""`ListenSource`: the `SnapshotSource` on the multiplexed Listen client.

Every watch is one query target on a shared stream; `on_snapshot` runs on the loop, inside
the stream's task; `close()` sends remove_target and returns at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import grpc

from listeners.config import MAX_STREAMS_PER_CONNECTION as FIRESTORE_STREAM_LIMIT
from listeners.config import TARGETS_PER_STREAM
from listeners.metrics import Metrics
from listeners.source.access_tokens import ServiceAccountTokens, emulator_token
from listeners.source.listen.pool import Connection, ListenPool
from listeners.source.listen.protocol import TargetError, query_target
from listeners.source.listen.status import ListenStatus
from listeners.source.listen.stream import (
    ANSWER_SECONDS,
    SILENCE_SECONDS,
    ListenStream,
    Metadata,
    Sleep,
)
from listeners.source.snapshots import Query, Snapshot, SnapshotHandler

log = logging.getLogger(__name__)

FIRESTORE_HOST = "firestore.googleapis.com:443"
SCOPES = ("https://www.googleapis.com/auth/datastore",)
_CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),  # a connection per channel: the stream limit is per connection
    ("grpc.max_receive_message_length", -1),
    # Java gRPC servers (the emulator) send GOAWAY "too_many_pings" to pings more often than
    # every 5 minutes, ending every stream on the connection; 30 s did exactly that. A dead
    # connection under a quiet stream is found by the stream's own probe (stream.py) instead.
    ("grpc.keepalive_time_ms", 360_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]

Tokens = Callable[..., Awaitable[str]]  # tokens(refresh=bool) -> access token


class ListenWatch:
    """One query target on a shared stream; the stream's `Watcher`."""

    def __init__(self, stream: ListenStream, on_snapshot: SnapshotHandler, query: Query) -> None:
        self._stream = stream
        self._on_snapshot = on_snapshot
        self.query = query
        self.error: TargetError | None = None
        self._closed = False

    @property
    def active(self) -> bool:
        return not self._closed and self.error is None

    @property
    def stream(self) -> ListenStream:
        return self._stream

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._stream.remove(self)

    def deliver(self, snapshot: Snapshot) -> None:
        if not self._closed:
            deliver_safely(self._on_snapshot, snapshot)

    def failed(self, error: TargetError) -> None:
        """The server removed this target with its own error (not a stream failure)."""
        self.error = error
        log.error(
            "firestore target failed",
            extra={"collection": self.query.collection, "reason": f"{error.code}: {error.message}"},
        )


def deliver_safely(handler: SnapshotHandler, snapshot: Snapshot) -> None:
    try:
        handler(snapshot)
    except Exception:  # one watch's handler must not break the stream of every other
        log.exception("snapshot handler failed")


class ListenSource:
    def __init__(
        self,
        project_id: str,
        *,
        emulator_host: str | None = None,
        credentials: Any = None,
        tokens: Tokens | None = None,
        max_streams_per_connection: int = FIRESTORE_STREAM_LIMIT,
        targets_per_stream: int = TARGETS_PER_STREAM,
        host: str = FIRESTORE_HOST,
        silence: float = SILENCE_SECONDS,
        answer: float = ANSWER_SECONDS,
        metrics: Metrics | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not 1 <= max_streams_per_connection <= FIRESTORE_STREAM_LIMIT:
            raise ValueError("max_streams_per_connection must be between 1 and 100")
        if targets_per_stream < 1:
            raise ValueError("targets_per_stream must be at least 1")
        self.database = f"projects/{project_id}/databases/(default)"
        self._emulator_host = emulator_host or os.environ.get("FIRESTORE_EMULATOR_HOST") or None
        self._host = host
        if tokens is None:
            tokens = emulator_token if self._emulator_host else _credential_tokens(credentials)
        self._tokens = tokens
        self._targets_per_stream = targets_per_stream
        # A probe is a second target on the stream: with one target per stream (the npm
        # emulator answers only a stream's first target) the streams are not probed.
        self._silence = silence if targets_per_stream > 1 else math.inf
        self._answer = answer
        self._sleep = sleep
        self.status = ListenStatus(metrics)
        self.pool = ListenPool(
            self._new_channel, self._new_stream, max_streams_per_connection=max_streams_per_connection
        )

    @property
    def degraded_reason(self) -> str | None:
        """Why some watches get no data (a permanent error on their stream), or None."""
        return self.status.degraded_reason

    @property
    def open_streams(self) -> int:
        return sum(1 for s in self.pool.streams if s.open)

    @property
    def connections(self) -> int:
        return len(self.pool.connections)

    def watch(self, query: Query, on_snapshot: SnapshotHandler) -> ListenWatch:
        target = query_target(self.database, query.collection, query.equals)
        stream = self.pool.stream_with_room()
        watch = ListenWatch(stream, on_snapshot, query)
        stream.add(watch, target)
        return watch

    async def aclose(self) -> None:
        await self.pool.aclose()

    def _new_channel(self) -> grpc.aio.Channel:
        if self._emulator_host:
            return grpc.aio.insecure_channel(self._emulator_host, options=_CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(self._host, grpc.ssl_channel_credentials(), options=_CHANNEL_OPTIONS)

    def _new_stream(self, connection: Connection) -> ListenStream:
        return ListenStream(
            connection,
            self.database,
            self._metadata,
            self._targets_per_stream,
            silence=self._silence,
            answer=self._answer,
            status=self.status,
            sleep=self._sleep,
        )

    async def _metadata(self, refresh: bool) -> Metadata:
        token = await self._tokens(refresh=refresh)
        return (
            ("authorization", f"Bearer {token}"),
            # Without it the emulator accepts targets and never sends their changes.
            ("google-cloud-resource-prefix", self.database),
            ("x-goog-request-params", f"database={quote(self.database, safe='')}"),
        )


def _credential_tokens(credentials: Any) -> Tokens:
    """Access tokens refreshed before they expire, from the given credentials (given Firestore's
    scopes if they require scopes) or the environment's (Application Default Credentials)."""
    if credentials is None:
        import google.auth

        credentials, _ = google.auth.default(scopes=list(SCOPES))
    return ServiceAccountTokens(credentials, scopes=SCOPES)
