"""An asyncio client for the Firebase Realtime Database REST API and its streaming protocol.

`RtdbClient` reads and writes JSON over HTTP(S). `RtdbClient.stream(path, on_change)` opens a
`NodeStream`: one task that keeps a local mirror of the node from the server-sent events
(`put`, `patch`, `keep-alive`, `cancel`, `auth_revoked`) and calls `on_change(tree)` on the
loop after each applied event. No threads; httpx underneath. The protocol, and the local
stand-in server that implements it for tests, are described in
`listeners.local.rtdb_server`.

The parts, each with the choices it makes: `sse` (event parsing), `tree` (the immutable
mirror), `tokens` (access tokens), `client` (REST calls, token and redirects) and `stream`
(the mirror task: reconnects and failures). `stream` imports `client`; `client.stream()`
imports `stream` only when called.
"""

from listeners.source.rtdb.client import DEFAULT_IDLE_TIMEOUT, RtdbClient, RtdbError
from listeners.source.rtdb.sse import DEFAULT_MAX_EVENT_BYTES, EventTooLarge, SseEvent, SseParser
from listeners.source.rtdb.stream import ChangeHandler, FailureHandler, NodeStream
from listeners.source.rtdb.tokens import SCOPES, ServiceAccountTokens, TokenProvider
from listeners.source.rtdb.tree import Json, apply_event, split_path

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_EVENT_BYTES",
    "SCOPES",
    "ChangeHandler",
    "EventTooLarge",
    "FailureHandler",
    "Json",
    "NodeStream",
    "RtdbClient",
    "RtdbError",
    "ServiceAccountTokens",
    "SseEvent",
    "SseParser",
    "TokenProvider",
    "apply_event",
    "split_path",
]
