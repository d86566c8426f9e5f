"""The Listen protocol for the targets of one stream, as pure logic: responses in, snapshots,
target failures and requests out. No I/O, no clock; `stream.py` drives it.

The rules follow the reference clients (firebase-js-sdk `watch_change.ts`, the Python SDK's
`watch.py`):
- A target's changes accumulate as pending until a global consistent point: any target
  change with no target ids and a read time (the Web SDK's `versionFromListenResponse`), read
  after the change itself is applied, and not older than the last point. Then every CURRENT
  target applies its pending changes and its result set is delivered if it changed (or was
  never delivered).
- A target change with no target ids applies to every target whose ADD the server has
  acknowledged (`forEachTarget` in `watch_change.ts`): a target still being added has no
  result set yet, and a CURRENT would deliver it empty.
- RESET drops what the target holds: the server re-sends the full result set.
- An existence filter whose count differs from what the target holds re-listens the target
  from scratch under a new target id (ids are never reused, so late messages for the old id
  are ignored without counting pending acknowledgements).
- REMOVE of a target we hold ends that target only, with its `cause` or, without one, as
  INTERNAL (as `watch.py` does): our own remove_target forgets the id at once, so a REMOVE
  for a known id was never asked for, and the target would otherwise stay current and get
  nothing more.
- A document that cannot be decoded fails the targets it was sent for (and they are removed
  from the stream), not the stream: a resumed stream would be sent it again.
- Resume tokens are committed only at a consistent point where the target was current: a
  reconnect drops pending changes and resumes from the last delivered state, never past it.
  A target with no token is re-listened from scratch, which is a reset.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from listeners.source.listen import wire
from listeners.source.listen.convert import Undecodable, source_doc, timestamp, why
from listeners.source.snapshots import Changes, Snapshot, SourceDoc

K = TypeVar("K", bound=Hashable)  # what the stream's owner knows a target by (its watch)


Token = tuple[int, bytes]  # (the order it came in on this stream, the resume token)
NO_TOKEN: Token = (0, b"")


@dataclass(eq=False, slots=True)
class TargetState(Generic[K]):
    key: K
    target_id: int
    query: Any  # a wire.Target without target_id and resume token
    docs: dict[str, SourceDoc] = field(default_factory=dict)  # by document name, as delivered
    pending: dict[str, SourceDoc | None] = field(default_factory=dict)  # None: left the result
    current: bool = False
    acked: bool = False  # the server acknowledged this id's ADD
    delivered: bool = False
    token: Token = NO_TOKEN  # the latest sent for this target by id
    committed: Token = NO_TOKEN  # as of the last consistent point where it was current
    # Current at the last consistent point: the stream-wide tokens committed since cover it
    # too. Kept as a flag so a consistent point costs nothing for targets that did not change.
    follows: bool = False

    def count(self) -> int:
        """How many documents the target holds with its pending changes applied."""
        n = len(self.docs)
        for name, doc in self.pending.items():
            n += (doc is not None) - (name in self.docs)
        return n

    def apply(self) -> Changes:
        """Apply the pending changes; what changed in the result set."""
        upserted: list[SourceDoc] = []
        removed: list[str] = []
        for name, doc in self.pending.items():
            old = self.docs.get(name)
            if doc is None:
                if old is not None:
                    del self.docs[name]
                    removed.append(old.id)
            elif old is None or old.update_time != doc.update_time or doc.update_time is None:
                self.docs[name] = doc
                upserted.append(doc)
        self.pending.clear()
        return Changes(tuple(upserted), tuple(removed))


@dataclass(frozen=True, slots=True)
class TargetError:
    code: int
    message: str


INTERNAL = 13  # google.rpc.Code


@dataclass(slots=True)
class Outcome(Generic[K]):
    snapshots: list[tuple[K, Snapshot]] = field(default_factory=list)
    failed: list[tuple[K, TargetError]] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)  # wire.ListenRequest to send now
    undecodable: list[str] = field(default_factory=list)  # names of documents we could not read
    # Data or a consistent point: the stream serves. An ADD acknowledgement is not: a server
    # that acknowledges and then closes the stream must not reset the reconnect backoff.
    progress: bool = False


class ListenState(Generic[K]):
    def __init__(self, database: str) -> None:
        self.database = database
        self._by_id: dict[int, TargetState[K]] = {}
        self._by_key: dict[K, TargetState[K]] = {}
        self._next_id = 1
        self._order = 0
        self._stream_token = NO_TOKEN  # the latest sent with no target ids: for every target
        self._stream_committed = NO_TOKEN
        self._dirty: dict[TargetState[K], None] = {}  # to look at at the next consistent point
        self._read_time: datetime | None = None  # of the last consistent point

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: K) -> bool:
        return key in self._by_key

    def all_current(self) -> bool:
        return all(state.current for state in self._by_key.values())

    def target(self, key: K) -> TargetState[K]:
        return self._by_key[key]

    def add(self, key: K, query: Any) -> Any:
        """Start listening; returns the add_target request (send it if the stream is open)."""
        if key in self._by_key:
            raise ValueError(f"target {key!r} is already listening")
        state = TargetState(key, self._new_id(), query)
        self._by_id[state.target_id] = state
        self._by_key[key] = state
        return self._add_request(state)

    def remove(self, key: K) -> Any | None:
        """Stop listening; returns the remove_target request, or None if it was not listening."""
        state = self._by_key.pop(key, None)
        if state is None:
            return None
        del self._by_id[state.target_id]
        self._dirty.pop(state, None)
        return wire.ListenRequest(database=self.database, remove_target=state.target_id)

    def disconnected(self) -> None:
        """The stream ended: every target falls back to what was last delivered."""
        for state in self._by_key.values():
            self._freeze(state)
            state.acked = False
            state.pending.clear()
            state.token = state.committed
            if not state.committed[1]:
                # Re-listened without a token, the server sends the whole result set again and
                # no RESET (the npm emulator never issues tokens): what is not re-sent is gone.
                self._reset(state)
        self._dirty.clear()
        self._stream_token = self._stream_committed = NO_TOKEN

    def resume(self) -> list[Any]:
        """The add_target requests that re-listen every target on a new stream."""
        return [self._add_request(state) for state in self._by_key.values()]

    def on_response(self, response: Any) -> Outcome[K]:
        outcome: Outcome[K] = Outcome()
        kind = response.WhichOneof("response_type")
        if kind == "target_change":
            self._target_change(response.target_change, outcome)
        elif kind == "document_change":
            outcome.progress = True
            self._document_change(response.document_change, outcome)
        elif kind == "document_delete":
            outcome.progress = True
            for state in self._states(response.document_delete.removed_target_ids):
                state.pending[response.document_delete.document] = None
                self._dirty[state] = None
        elif kind == "document_remove":
            outcome.progress = True
            for state in self._states(response.document_remove.removed_target_ids):
                state.pending[response.document_remove.document] = None
                self._dirty[state] = None
        elif kind == "filter":
            filtered = self._by_id.get(response.filter.target_id)
            if filtered is not None and filtered.count() != response.filter.count:
                outcome.requests.extend(self._relisten(filtered))
        return outcome

    def _document_change(self, change: Any, outcome: Outcome[K]) -> None:
        name = change.document.name
        states = self._states(change.target_ids)
        if states:
            try:
                doc = self._known(change.document, states) or source_doc(change.document)
            except Undecodable as exc:
                self._undecodable(name, str(exc), states, outcome)
            else:
                for state in states:
                    state.pending[name] = doc
                    self._dirty[state] = None
        for state in self._states(change.removed_target_ids):
            state.pending[name] = None
            self._dirty[state] = None

    def _target_change(self, change: Any, outcome: Outcome[K]) -> None:
        kind = change.target_change_type
        every = not change.target_ids
        # A change that names its targets is taken as it comes: the server names a target only
        # after acknowledging its ADD.
        states = [s for s in self._by_key.values() if s.acked] if every else self._states(change.target_ids)
        if change.resume_token:
            self._order += 1
            if every:
                self._stream_token = (self._order, change.resume_token)
            for state in [] if every else states:
                state.token = (self._order, change.resume_token)
                self._dirty[state] = None
        if kind == wire.ADD:
            for state in states:
                state.acked = True
        elif kind == wire.REMOVE:
            if change.HasField("cause") and change.cause.code:
                error = TargetError(change.cause.code, change.cause.message)
            else:
                error = TargetError(INTERNAL, "removed by the server without a cause")
            for state in states:
                self.remove(state.key)
                outcome.failed.append((state.key, error))
        elif kind == wire.CURRENT:
            for state in states:
                state.current = True
                self._dirty[state] = None
        elif kind == wire.RESET:
            for state in states:
                self._reset(state)
        # Once applied, any change with no target ids and a read time is a consistent point:
        # `versionFromListenResponse` (serializer.ts) and `onWatchStreamChange` (remote_store.ts).
        if every and change.HasField("read_time"):
            self._consistent(timestamp(change.read_time), outcome)

    def _consistent(self, read_time: datetime, outcome: Outcome[K]) -> None:
        """Only targets that changed since the last point are looked at; the rest follow the
        stream's token."""
        if self._read_time is not None and read_time < self._read_time:
            return  # older than what was delivered: the SDKs raise no snapshot for it either
        self._read_time = read_time
        outcome.progress = True
        self._stream_committed = self._stream_token
        dirty, self._dirty = self._dirty, {}
        for state in dirty:
            if not state.current:
                continue  # it comes back here with its CURRENT
            state.committed = max(self._committed(state), state.token)
            state.follows = True
            changes = state.apply()
            if changes or not state.delivered:
                state.delivered = True
                snapshot = Snapshot(tuple(state.docs.values()), read_time, changes)
                outcome.snapshots.append((state.key, snapshot))

    def _committed(self, state: TargetState[K]) -> Token:
        return max(state.committed, self._stream_committed) if state.follows else state.committed

    def _freeze(self, state: TargetState[K]) -> None:
        """The target stops being current: later stream-wide commits no longer cover it."""
        state.committed = self._committed(state)
        state.follows = False
        state.current = False

    def _reset(self, state: TargetState[K]) -> None:
        self._freeze(state)
        state.pending = dict.fromkeys(state.docs)

    def _relisten(self, state: TargetState[K]) -> list[Any]:
        remove = wire.ListenRequest(database=self.database, remove_target=state.target_id)
        del self._by_id[state.target_id]
        state.target_id = self._new_id()
        self._by_id[state.target_id] = state
        self._reset(state)
        state.acked = False
        state.token = state.committed = NO_TOKEN
        return [remove, self._add_request(state)]

    def _undecodable(self, name: str, reason: str, states: list[TargetState[K]], outcome: Outcome[K]) -> None:
        """The targets the document was sent for fail (their watches are replaced, with a fresh
        sync) and leave the stream; the others never held it."""
        outcome.undecodable.append(name)
        error = TargetError(INTERNAL, f"undecodable document {name}: {reason}")
        for state in states:
            outcome.requests.append(self.remove(state.key))
            outcome.failed.append((state.key, error))

    def _known(self, document: Any, states: list[TargetState[K]]) -> SourceDoc | None:
        """The converted document when a target already holds this version: the emulator
        re-sends a target's whole result set after each change, and resumes re-send too."""
        if not document.HasField("update_time"):
            return None
        try:
            update_time = timestamp(document.update_time)
        except (ValueError, OverflowError) as exc:
            raise Undecodable(f"update_time: {why(exc)}") from exc
        for state in states:
            known = state.pending.get(document.name) or state.docs.get(document.name)
            if known is not None and known.update_time == update_time:
                return known
        return None

    def _states(self, target_ids: Iterable[int]) -> list[TargetState[K]]:
        # ids of removed or re-listened targets are no longer known: their messages are late
        return [s for s in map(self._by_id.get, target_ids) if s is not None]

    def reserve_id(self) -> int:
        """A target id for a target of the stream's own (a probe): no watch will have it."""
        return self._new_id()

    def _new_id(self) -> int:
        target_id = self._next_id
        self._next_id += 1
        return target_id

    def _add_request(self, state: TargetState[K]) -> Any:
        target = wire.Target()
        target.CopyFrom(state.query)
        target.target_id = state.target_id
        token = self._committed(state)[1]
        if token:
            target.resume_token = token
        return wire.ListenRequest(database=self.database, add_target=target)


def query_target(database: str, collection: str, equals: Iterable[tuple[str, Any]]) -> Any:
    """A wire.Target for `collection` (a path, e.g. `clients/u1/notifications`) filtered by
    field equalities."""
    from google.cloud.firestore_v1 import _helpers
    from google.cloud.firestore_v1.field_path import FieldPath

    parent, _, collection_id = f"{database}/documents/{collection}".rpartition("/")
    structured = wire.StructuredQuery()
    structured.from_.add(collection_id=collection_id)
    filters = []
    for name, value in equals:
        f = wire.StructuredQuery.Filter()
        path = FieldPath.from_string(name).to_api_repr()
        if value is None:  # `== None` is a unary filter on the wire, as the SDK sends it
            f.unary_filter.field.field_path = path
            f.unary_filter.op = wire.StructuredQuery.UnaryFilter.Operator.IS_NULL
        else:
            f.field_filter.field.field_path = path
            f.field_filter.op = wire.StructuredQuery.FieldFilter.Operator.EQUAL
            encoded = _helpers.encode_value(value)
            f.field_filter.value.CopyFrom(type(encoded).pb(encoded))
        filters.append(f)
    if len(filters) == 1:
        structured.where.CopyFrom(filters[0])
    elif filters:
        structured.where.composite_filter.op = wire.StructuredQuery.CompositeFilter.Operator.AND
        structured.where.composite_filter.filters.extend(filters)
    target = wire.Target()
    target.query.parent = parent
    target.query.structured_query.CopyFrom(structured)
    return target
