"""Everything the node holds for one online user, in one place: the registry entry, the
user's streams (notifications; direct messages when the Realtime Database is configured)
and the chat threads the user has open. Every session draws on the same `Sources` and
`StreamOptions`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from listeners.source.rtdb_wire import RtdbSource
from listeners.source.snapshots import SnapshotSource
from listeners.streams import UserStream
from listeners.streams.chat import DEFAULT_HISTORY, ChatStream
from listeners.streams.messages import MessageStream
from listeners.streams.notifications import NotificationStream
from listeners.streams.view import DEFAULT_PUBLISHING, Emit, Publishing
from listeners_bridge.channels import Channels
from listeners_bridge.registry import ChatThread, RegistryEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sources:
    """Where a user's changes come from: Firestore, and the Realtime Database when configured."""

    firestore: SnapshotSource
    rtdb: RtdbSource | None = None


@dataclass(frozen=True)
class StreamOptions:
    """How the user's streams behave, the same for every user."""

    publishing: Publishing = DEFAULT_PUBLISHING
    chat_mark_read: bool = True
    chat_history: int = DEFAULT_HISTORY  # messages mirrored per chat thread (limitToLast)


EmitTo = Callable[[str], Emit]  # channel -> emit on it


class UserSession:
    def __init__(
        self,
        entry: RegistryEntry,
        sources: Sources,
        options: StreamOptions,
        emit_to: EmitTo,
        channels: Channels,
    ) -> None:
        self.uid = entry.uid
        self.entry = entry
        self._sources = sources
        self._options = options
        self._emit_to = emit_to
        self._channels = channels
        emit = emit_to(channels.user(entry.uid))
        companies = entry.authorized_companies_ids
        publishing = options.publishing
        self.streams: list[UserStream] = [
            NotificationStream(entry.uid, companies, sources.firestore, emit, publishing)
        ]
        if sources.rtdb is not None:
            self.streams.append(MessageStream(entry.uid, companies, sources.rtdb, emit, publishing))
        self.threads: dict[ChatThread, ChatStream] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._refused: set[ChatThread] = set()

    def channels(self) -> list[str]:
        """Every channel this session publishes on: the user's, and each chat thread's."""
        return [self._channels.user(self.uid), *(self._channels.chat(self.uid, t) for t in self.threads)]

    def all_streams(self) -> list[UserStream]:
        return [*self.streams, *self.threads.values()]

    def start(self) -> None:
        for stream in self.streams:
            stream.start()
        self._follow_threads(self.entry.chat_threads)

    def update(self, entry: RegistryEntry) -> None:
        self.entry = entry
        for stream in self.streams:
            stream.set_companies(entry.authorized_companies_ids)
        self._follow_threads(entry.chat_threads)

    def resync(self, threads: Iterable[ChatThread] | None = None) -> None:
        """Fresh syncs of every stream, and of these chat threads (None: all of them)."""
        for stream in self.streams:
            stream.resync()
        for thread, chat in self.threads.items():
            if threads is None or thread in threads:
                chat.resync()

    def rebase(self) -> None:
        """This instance serves the user again after handing it over: every stream starts a new
        epoch with a sync, so that consumers which followed the other instance follow this one."""
        for stream in self.all_streams():
            stream.rebase()

    def _follow_threads(self, requested: frozenset[ChatThread]) -> None:
        # Threads of a company the user lost are closed like threads no longer requested.
        allowed = {t for t in requested if not self._refusal(t)}
        for thread in self.threads.keys() - allowed:
            self._spawn_close(self.threads.pop(thread))
        for thread in requested - self.threads.keys():
            refusal = self._refusal(thread)
            if refusal and thread not in self._refused:  # once, not at every heartbeat
                self._refused.add(thread)
                log.warning(
                    "chat thread refused",
                    extra={"uid": self.uid, "space_code": thread.space_code, "reason": refusal},
                )
            if refusal:
                continue
            assert self._sources.rtdb is not None
            emit = self._emit_to(self._channels.chat(self.uid, thread))
            chat = ChatStream(
                self.uid,
                thread,
                self._sources.rtdb,
                emit,
                mark_read=self._options.chat_mark_read,
                history=self._options.chat_history,
                publishing=self._options.publishing,
            )
            self.threads[thread] = chat
            chat.start()

    def _refusal(self, thread: ChatThread) -> str:
        if self._sources.rtdb is None:
            return "the Realtime Database is not configured"
        # Fail closed: no companies on the entry means no chat at all, never every chat.
        if thread.space_code not in self.entry.authorized_companies_ids:
            return "space_code is not in authorized_companies_ids"
        return ""

    def _spawn_close(self, stream: UserStream) -> None:
        task = asyncio.create_task(stream.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        streams = self.all_streams()
        self.threads.clear()
        await asyncio.gather(*(s.close() for s in streams), *self._closing, return_exceptions=True)
