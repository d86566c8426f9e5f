"""listeners: Firebase changes for each online user, normalised, delivered to Redis Pub/Sub
and to browsers over WebSocket.

Data flow, one package per stage:

    source/     Firebase behind small interfaces: Firestore watches (Listen or the SDK), the
                Realtime Database (REST or the wire protocol), the registry watch, read marks
    normalise/  pure functions: raw Firebase values -> the items the UI expects
    streams/    a user's ordered event streams: a source watch + the normaliser -> envelopes
    publish/    the publisher (every event written, or its user resynced) and tail positions
    deliver/    HTTP (health, metrics, operator pages) and WebSocket Direct mode

What the service shares with its consumers lives in the listeners-bridge distribution
(clients/python/, package `listeners_bridge`), which it imports and which never imports it:
the envelope and its version, channel names, the registry document, the Redis broker and
subscriber, the settings table's machinery, and the consumer itself.

`node.Node` keeps one `session.UserSession` per online user; `service.Service` is one running
instance; `assemble` builds and connects every part (the only module that imports them all),
and `process` holds what the process does around it (signals, watchdog, exit status).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("listeners")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"
