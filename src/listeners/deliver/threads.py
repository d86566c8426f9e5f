"""Direct mode's chat threads in the registry: `chat.subscribe` lists a thread in the user's
entry (which makes the serving instance open its stream), and the user's last socket on it
leaving takes it off.

With WebSocket presence on, presence keeps the entry: its writes carry every thread this
process's sockets hold, and a write it could not make waits for its next heartbeat without
saying so, so an added thread is confirmed by reading it back. Without presence, a
conditional read-modify-write adds or removes the one thread and leaves the others' alone.
"""

from __future__ import annotations

from collections.abc import Callable, Set

from listeners.deliver.ports import Presence, RegistryWrites
from listeners_bridge.registry import ChatThread


class RegistryThreads:
    def __init__(
        self,
        registry: RegistryWrites,
        presence: Presence | None,
        held: Callable[[str], Set[ChatThread]],  # the threads this process's sockets hold
    ) -> None:
        self._registry = registry
        self._presence = presence
        self._held = held

    async def open(self, uid: str, thread: ChatThread) -> bool:
        """True once the user's entry lists the thread."""
        if self._presence is None:
            return await self._registry.add_thread(uid, thread)
        await self._presence.set_threads(uid, self._sorted(uid))
        return await self._registry.has_thread(uid, thread)

    async def close(self, uid: str, thread: ChatThread) -> None:
        if self._presence is None:
            await self._registry.remove_thread(uid, thread)
        else:
            await self._presence.set_threads(uid, self._sorted(uid))

    def _sorted(self, uid: str) -> list[ChatThread]:
        return sorted(self._held(uid), key=str)
