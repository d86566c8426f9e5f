"""Everything the node holds for one online user, in one place."""

from __future__ import annotations

import asyncio

from listeners.source.registry import RegistryEntry
from listeners.source.snapshots import SnapshotSource
from listeners.streams.notifications import Emit, NotificationStream


class UserSession:
    def __init__(self, entry: RegistryEntry, source: SnapshotSource, emit: Emit) -> None:
        self.uid = entry.uid
        self.entry = entry
        self.streams = [NotificationStream(entry.uid, entry.authorized_companies_ids, source, emit)]

    def start(self) -> None:
        for stream in self.streams:
            stream.start()

    def update(self, entry: RegistryEntry) -> None:
        self.entry = entry
        for stream in self.streams:
            stream.set_companies(entry.authorized_companies_ids)

    def resync(self) -> None:
        for stream in self.streams:
            stream.resync()

    async def close(self) -> None:
        await asyncio.gather(*(stream.close() for stream in self.streams), return_exceptions=True)
