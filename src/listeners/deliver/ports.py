"""What deliver/ needs from the rest of the instance, as Protocols. The composition root
(listeners.assemble) hands over objects that have these; deliver/ imports neither the
service nor the bridge, and each route or socket sees only what it uses.

| Protocol | used by | given |
|---|---|---|
| `Instance` | /healthz, /metrics, /v1/users, /ops/state | `service.Service` |
| `Entries` | chat decisions (fail closed on the entry's companies) | `node.Node` |
| `RegistryWrites` | `chat.subscribe` / `chat.unsubscribe` (deliver.threads) | `source.stores.RegistryStore` |
| `Presence` | a user kept online while a socket is open | `bridge.Presence` |
| `Notifications` | `notif.read` | `source.stores.NotificationStore` |
| `Resync` | fresh syncs for a socket, wherever its user is served | the root's hook |
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from listeners.metrics import Metrics
from listeners_bridge.registry import ChatThread, RegistryEntry


class Instance(Protocol):
    @property
    def metrics(self) -> Metrics: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def failed(self) -> str | None:
        """Why a task could not be kept alive (the process is going), or None."""

    def health(self) -> dict[str, object]: ...

    def user(self, uid: str) -> dict[str, object]:
        """Where a user is served, for operators."""

    def operations(self, websocket: dict[str, Any] | None) -> dict[str, Any]:
        """The operations page's data, with this process's sockets (`websocket`) in it."""


class Entries(Protocol):
    def entry(self, uid: str) -> RegistryEntry | None:
        """The user's last valid registry entry, attached here or not."""


class RegistryWrites(Protocol):
    async def add_thread(self, uid: str, thread: ChatThread) -> bool: ...

    async def remove_thread(self, uid: str, thread: ChatThread) -> bool: ...

    async def has_thread(self, uid: str, thread: ChatThread) -> bool: ...


class Presence(Protocol):
    def online(self, uid: str) -> AbstractAsyncContextManager[None]:
        """Keeps the user online in the registry while the block is open (reference-counted)."""

    async def set_threads(self, uid: str, threads: Sequence[ChatThread]) -> None:
        """The chat threads presence writes with the user's entry from now on."""


class Notifications(Protocol):
    async def mark_read(self, uid: str, doc_id: str) -> bool: ...


# (uid, chat threads) -> fresh syncs of the user's streams and of these threads
Resync = Callable[[str, tuple[ChatThread, ...]], Coroutine[Any, Any, None]]
