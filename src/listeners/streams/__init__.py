"""A user's ordered event streams, one per kind (notifications, direct messages, a chat
thread): a source watch and the normaliser, producing envelopes in `epoch`/`seq` order (the
event contract). `UserStream` is what each offers the user's session."""

from __future__ import annotations

from typing import Protocol


class UserStream(Protocol):
    kind: str

    def start(self) -> None: ...

    @property
    def healthy(self) -> bool: ...

    def restart_due(self, now: float) -> bool: ...

    async def restart(self, now: float) -> None: ...

    async def close(self) -> None: ...

    def set_companies(self, companies: frozenset[str]) -> None: ...

    def resync(self) -> None: ...

    def rebase(self) -> None: ...
