"""What the message and chat streams, the session and the service use of a Realtime Database
client: both `RtdbClient` (REST) and `WireClient` have it (tests/test_rtdb_wire.py checks both
with mypy), so code typed against these protocols takes either transport."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol


class RtdbStream(Protocol):
    path: str
    reconnects: int
    events: int
    last_changed: frozenset[str] | None

    @property
    def tree(self) -> Any: ...

    @property
    def active(self) -> bool: ...

    @property
    def failed(self) -> bool: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def synced(self) -> bool: ...

    async def close(self) -> None: ...


class RtdbSource(Protocol):
    on_reconnect: Callable[[str], None]  # told each reconnect's cause, for the metrics

    def stream(
        self,
        path: str,
        on_change: Callable[[Any], None],
        *,
        on_failed: Callable[[str], None] | None = None,
        query: Mapping[str, str] | None = None,
    ) -> RtdbStream: ...

    async def update(self, path: str, values: Mapping[str, Any]) -> None: ...

    @property
    def open_streams(self) -> int: ...

    async def aclose(self) -> None: ...
