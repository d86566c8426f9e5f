"""The source interface: a query watch that delivers whole snapshots on the event loop.

Implementations call `on_snapshot` on the loop thread, never from a thread of their own,
and `Watch.close()` never blocks the loop. Two implementations: `listen.ListenSource`, a
multiplexed Listen client on grpc.aio (the default), and `firestore.FirestoreSource` on the
SDK (two threads per watch), kept selectable by `LISTENERS_FIRESTORE_SOURCE`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class SourceDoc:
    id: str
    data: Mapping[str, Any]
    update_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed since the watch's previous snapshot: documents added or modified, and the
    ids of those that left the result."""

    upserted: tuple[SourceDoc, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.upserted or self.removed)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every document the query matches now (not only the changed ones), and, where the
    source knows them, the changes since the previous snapshot of the same watch (None: it
    does not say; compare `docs`)."""

    docs: tuple[SourceDoc, ...]
    read_time: datetime | None = None
    changes: Changes | None = None


@dataclass(frozen=True, slots=True)
class Query:
    """A collection path and equality filters, e.g. `clients/u1/notifications`, read == False."""

    collection: str
    equals: tuple[tuple[str, Any], ...] = field(default=())


SnapshotHandler = Callable[[Snapshot], None]


class Watch(Protocol):
    @property
    def active(self) -> bool:
        """False once the underlying stream has ended for good and must be replaced."""

    async def close(self) -> None: ...


class SnapshotSource(Protocol):
    def watch(self, query: Query, on_snapshot: SnapshotHandler) -> Watch: ...

    @property
    def open_streams(self) -> int: ...

    @property
    def connections(self) -> int: ...

    def targets(self) -> dict[str, int]:
        """Watched queries by state ("current": caught up with the server, "pending": not yet),
        where the source can tell; {} where it cannot (the SDK)."""
        ...

    async def aclose(self) -> None: ...
