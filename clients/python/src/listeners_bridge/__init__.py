"""listeners-bridge: the consumer side of the listeners service, for the Reflex backend
(Bridge mode, specification §8), and the contract the service and its consumers share.

- `Bridge.events(uid)`: an async iterator over a user's events that always converges
  (resync on every (re)subscribe and every gap in `seq`, events older than the last sync and
  duplicates dropped, reconnect with backoff; `ordering` holds the rules).
- `reducers`: event stream -> the lists the UI holds.
- `Presence`: the registry document of an online user, reference-counted, heartbeated
  (written through `registry.RegistryStore`, which the service's Direct mode shares).

Shared with the service, which imports them from here (one copy): the envelope and its
version (`events`), channel names (`channels`), the registry document (`registry`), signed
resync requests (`resync`), the Redis Pub/Sub broker (`broker`, `redis`, `redis_subscriber`,
`resp`, `connection`), the settings table and the Redis keys (`settings`, `secret_manager`),
and the small helpers they need (`inputs`, `timestamps`, `backoff`, `waits`).

Light on purpose: redis (and hiredis) and the standard library. Extras: `presence`
(google-cloud-firestore, for `Presence`), `secret-manager` (to read the Redis keys from
Google Secret Manager, as the service does).
"""

from listeners_bridge.consumer import Bridge, parse_event
from listeners_bridge.presence import Presence
from listeners_bridge.reducers import ChatThreads, DirectMessages, Notifications
from listeners_bridge.registry import ChatThread
from listeners_bridge.settings import load_redis_settings

__all__ = [
    "Bridge",
    "ChatThread",
    "ChatThreads",
    "DirectMessages",
    "Notifications",
    "Presence",
    "load_redis_settings",
    "parse_event",
]
