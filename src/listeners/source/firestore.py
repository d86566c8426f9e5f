"""`SnapshotSource` on the google-cloud-firestore SDK's `on_snapshot`.

Two facts shape this module:
- Firestore serves at most 100 concurrent streams per gRPC connection; listeners past that
  hang silently. Watches are spread over a pool of clients, each with its own connection,
  and no client carries more than `max_streams_per_connection`.
- The SDK runs each watch on its own threads, calls back on one of them, and its `close()`
  joins a thread for up to a second. Callbacks only hand the snapshot to the loop;
  closes run on a small dedicated executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from google.auth.credentials import Credentials
from google.cloud import firestore
from google.cloud.firestore_v1 import base_client

from listeners.config import MAX_STREAMS_PER_CONNECTION as FIRESTORE_STREAM_LIMIT
from listeners.source.snapshots import Query, Snapshot, SnapshotHandler, SourceDoc

log = logging.getLogger(__name__)


class _DedicatedConnectionClient(firestore.Client):
    """A client whose gRPC channel never shares its TCP connection with another client.

    gRPC shares connections between channels with equal arguments through a global
    subchannel pool; the stream limit is per connection, so each pooled client asks for
    a local pool.
    """

    def _firestore_api_helper(self, transport: Any, client_class: Any, client_module: Any) -> Any:
        if self._firestore_api_internal is None and self._emulator_host is None:
            channel = transport.create_channel(
                self._target,
                credentials=self._credentials,
                options=[
                    *base_client._DEFAULT_CHANNEL_OPTIONS,
                    ("grpc.use_local_subchannel_pool", 1),
                ],
            )
            self._transport = transport(host=self._target, channel=channel)
            self._firestore_api_internal = client_class(
                transport=self._transport, client_options=self._client_options
            )
            client_module._client_info = self._client_info
        return super()._firestore_api_helper(transport, client_class, client_module)


class _PooledClient:
    def __init__(self, client: firestore.Client) -> None:
        self.client = client
        self.streams = 0


class FirestoreWatch:
    def __init__(self, source: FirestoreSource, pooled: _PooledClient, sdk_watch: Any) -> None:
        self._source = source
        self._pooled = pooled
        self._sdk_watch = sdk_watch
        self._closed = False

    @property
    def active(self) -> bool:
        return not self._closed and bool(self._sdk_watch.is_active)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._source._release(self._pooled)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._source._closer, self._sdk_watch.close)
        except Exception as exc:  # the SDK re-raises the reason a dead stream ended with
            log.debug("watch closed with %s", type(exc).__name__)


class FirestoreSource:
    def __init__(
        self,
        project_id: str,
        credentials: Credentials | None,
        *,
        max_streams_per_connection: int = FIRESTORE_STREAM_LIMIT,
        close_workers: int = 8,
    ) -> None:
        if not 1 <= max_streams_per_connection <= FIRESTORE_STREAM_LIMIT:
            raise ValueError("max_streams_per_connection must be between 1 and 100")
        self._project_id = project_id
        self._credentials = credentials
        self._max_streams = max_streams_per_connection
        self._pool: list[_PooledClient] = []
        self._closer = ThreadPoolExecutor(close_workers, thread_name_prefix="watch-close")
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def open_streams(self) -> int:
        return sum(p.streams for p in self._pool)

    @property
    def connections(self) -> int:
        return len(self._pool)

    def client(self) -> firestore.Client:
        """A client for one-off reads and writes (the first connection of the pool)."""
        return self._acquire(count=False).client

    def watch(self, query: Query, on_snapshot: SnapshotHandler) -> FirestoreWatch:
        loop = asyncio.get_running_loop()
        pooled = self._acquire()
        sdk_query: Any = pooled.client.collection(query.collection)
        for name, value in query.equals:
            sdk_query = sdk_query.where(filter=firestore.FieldFilter(name, "==", value))

        converted: dict[str, SourceDoc] = {}  # touched only by this watch's one SDK thread

        def on_thread(docs: list[Any], _changes: Any, read_time: Any) -> None:
            # Runs on an SDK thread: convert, hand over, return at once. Each snapshot holds
            # every matching document; only those with a new update time are converted.
            nonlocal converted
            fresh: dict[str, SourceDoc] = {}
            for d in docs:
                known = converted.get(d.id)
                if known is None or known.update_time != d.update_time:
                    known = SourceDoc(d.id, d.to_dict() or {}, d.update_time)
                fresh[d.id] = known
            converted = fresh
            snapshot = Snapshot(docs=tuple(fresh.values()), read_time=read_time)
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(on_snapshot, snapshot)

        try:
            sdk_watch = sdk_query.on_snapshot(on_thread)
        except Exception:
            self._release(pooled)
            raise
        return FirestoreWatch(self, pooled, sdk_watch)

    def _acquire(self, count: bool = True) -> _PooledClient:
        for pooled in self._pool:
            if pooled.streams < self._max_streams or not count:
                break
        else:
            client = _DedicatedConnectionClient(project=self._project_id, credentials=self._credentials)
            pooled = _PooledClient(client)
            self._pool.append(pooled)
            log.info("firestore connection opened", extra={"connections": len(self._pool)})
        if count:
            pooled.streams += 1
        return pooled

    def _release(self, pooled: _PooledClient) -> None:
        pooled.streams -= 1

    async def aclose(self) -> None:
        self._closer.shutdown(wait=False, cancel_futures=True)
        for pooled in self._pool:
            pooled.client.close()  # type: ignore[no-untyped-call]
        self._pool.clear()
