"""listeners: Firebase changes for each online user, normalised, delivered to Redis Pub/Sub.

Data flow, one package per stage:

    source/     Firestore watches (registry and per-user queries) behind a small interface
    normalise/  pure functions: raw Firestore values -> the items the UI expects
    streams/    one per user and kind: a source watch + the normaliser -> envelopes
    publish/    the broker interface, its Redis and in-memory implementations, the publisher
    deliver/    HTTP (health, metrics) and, later, WebSocket delivery

`node.Node` owns the per-user sessions and wires the stages together.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("listeners")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"
