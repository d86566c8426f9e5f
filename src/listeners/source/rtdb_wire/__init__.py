"""The Firebase Realtime Database over its WebSocket wire protocol, every listen multiplexed.

The REST client (`listeners.source.rtdb`) holds one HTTP connection per listened node: one per
online user and per open chat thread. This client puts every listen of the instance on a few
WebSockets speaking the protocol of the Firebase SDKs (`/.ws?v=5`), as they do for one app:
listen and unlisten by path and query, data and merge pushes, auth with the service account's
access token refreshed on the open connection, ping/pong, and the server's redirects.

`WireClient` is a drop-in for `RtdbClient` where the streams use it (`stream`, `update`,
`open_streams`, `aclose`); `LISTENERS_RTDB_TRANSPORT=wire` selects it. The parts:
`protocol` (frames, queries, pushes, hosts), `listen` (a listen's mirror and the streams that
share it), `connection` (one WebSocket: sessions, auth, liveness), `client`. docs/rtdb.md has
the protocol as implemented and what the tests' stand-in cannot show.
"""

from listeners.source.rtdb_wire.client import LISTENS_PER_CONNECTION, MAX_CONNECTIONS, WireClient
from listeners.source.rtdb_wire.interface import RtdbSource, RtdbStream
from listeners.source.rtdb_wire.listen import WireStream

__all__ = [
    "LISTENS_PER_CONNECTION",
    "MAX_CONNECTIONS",
    "RtdbSource",
    "RtdbStream",
    "WireClient",
    "WireStream",
]
