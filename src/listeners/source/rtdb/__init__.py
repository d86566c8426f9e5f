"""An asyncio client for the Firebase Realtime Database REST API and its streaming protocol.

`RtdbClient` reads and writes JSON over HTTP(S). `RtdbClient.stream(path, on_change)` opens a
streaming request and returns a `NodeMirror`: one task that keeps a local mirror of the node
from the server-sent events (`put`, `patch`, `keep-alive`, `cancel`, `auth_revoked`) and
calls `on_change(tree)` on the loop after each applied event. No threads; httpx underneath.
The tests' stand-in server (`listeners_testkit.rtdb_server`, not shipped) implements the
same protocol.

The protocol, from these pages:

- https://firebase.google.com/docs/reference/rest/database
  `.json` suffix on every URL; GET, PUT, POST (push: `{"name": <push id>}`), PATCH
  (named children written, others kept; keys may be paths), DELETE; `print=silent`
  answers 204; `shallow=true`; `X-HTTP-Method-Override`; errors as `{"error": "..."}`.
- https://firebase.google.com/docs/database/rest/retrieve-data (Streaming from the REST API)
  and https://firebase.blog/posts/2014/03/announcing-streaming-for-firebase-rest
  `Accept: text/event-stream` opens an EventSource stream of `event: <name>` /
  `data: <json>` messages. `put` and `patch` carry `{"path": ..., "data": ...}` with the
  path relative to the stream's location; the first event is a `put` at "/" with the whole
  node; `keep-alive` (data null) about every 30 s; `cancel` (data null) when the rules no
  longer allow the read; `auth_revoked` when the credential is no longer valid. The
  server closes the connection after `cancel` and `auth_revoked`.
- https://firebase.google.com/docs/database/rest/auth
  Google OAuth2 access tokens (scopes `firebase.database` and `userinfo.email`) in the
  `access_token` query parameter; also accepted here: `auth=` and
  `Authorization: Bearer`. An unauthenticated request gets 401 when a token is required.
- https://firebase.google.com/docs/emulator-suite/connect_rtdb and
  https://github.com/firebase/firebase-tools/pull/1413
  the emulator picks the database by the `ns` query parameter and has a default
  namespace when it is absent.
- https://firebase.blog/posts/2014/04/best-practices-arrays-in-firebase
  arrays are stored as objects with integer keys and read back as arrays when all keys
  are integers and more than half of the keys from 0 to the largest have values.

- https://firebase.google.com/docs/database/rest/retrieve-data#section-rest-filtering
  queries: `orderBy` (`"$key"`, `"$value"` or a child key, JSON-quoted) is required with
  `limitToFirst` / `limitToLast` / `startAt` / `endAt` / `equalTo` (400 otherwise); keys that
  are 32-bit integers sort first, numerically, then strings; by value or child: null, false,
  true, numbers, strings, objects, ties by key. A GET answers the matching children as an
  object. A stream with a query keeps the query's window: each write sends a `put` at
  "/<child>" for every child that entered, changed in, or left (null) the window.

The parts, each with the choices it makes: `sse` (event parsing), `tree` (the immutable
mirror), `errors` (error answers, protocol errors), `tokens` (`source/access_tokens.py` with
the database's scopes), `mirror` (`NodeMirror`, the mirror task: reconnects and failures) and
`client` (REST calls, token and redirects; it makes the mirrors). `client` imports `mirror`,
never the other way: a mirror needs of its client only what `mirror.MirrorClient` names.
"""

from listeners.source.rtdb.client import RtdbClient
from listeners.source.rtdb.errors import RtdbError
from listeners.source.rtdb.mirror import (
    DEFAULT_IDLE_TIMEOUT,
    ChangeHandler,
    FailureHandler,
    MirrorClient,
    NodeMirror,
)
from listeners.source.rtdb.sse import DEFAULT_MAX_EVENT_BYTES, EventTooLarge, SseEvent, SseParser
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
    "MirrorClient",
    "NodeMirror",
    "RtdbClient",
    "RtdbError",
    "ServiceAccountTokens",
    "SseEvent",
    "SseParser",
    "TokenProvider",
    "apply_event",
    "split_path",
]
