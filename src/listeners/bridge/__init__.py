"""The consumer side, for the Reflex backend (Bridge mode, specification §8).

- `Bridge.events(uid)`: an async iterator over a user's events that always converges
  (resync on every (re)subscribe and every gap in `seq`, events older than the last sync and
  duplicates dropped, reconnect with backoff; bridge.ordering holds the rules).
- `reducers`: event stream -> the lists the UI holds.
- `Presence`: the registry document of an online user, reference-counted, heartbeated
  (written through source.stores.RegistryStore, which the service's Direct mode shares).

Light on purpose: redis and the standard library (plus google-cloud-firestore for Presence).
"""

from listeners.bridge.consumer import Bridge, parse_event
from listeners.bridge.presence import Presence
from listeners.bridge.reducers import ChatThreads, DirectMessages, Notifications
from listeners.source.registry import ChatThread

__all__ = [
    "Bridge",
    "ChatThread",
    "ChatThreads",
    "DirectMessages",
    "Notifications",
    "Presence",
    "parse_event",
]
