"""The message contract (specification §9): event types, payloads and the envelope.

These TypedDicts are the single source of the JSON Schemas in `docs/schemas/`
(`python -m listeners.schemas` writes them; a test checks they are current).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal, NotRequired

try:  # pydantic (the service's schemas) reads only typing_extensions' TypedDict on Python 3.11
    from typing_extensions import TypedDict
except ImportError:  # a consumer without it (the bridge needs only redis): annotations alone
    from typing import TypedDict

# The contract's version (docs/events.md, "Versions"): a major number only. It changes when an
# event a consumer already knows changes in a way an older consumer would misapply (a field
# removed, renamed or retyped, an order rule changed); additions (an optional field, a new event
# type, which consumers skip) keep it. Every envelope carries it as `v`.
CONTRACT_VERSION: Final = 1
# The majors the Python consumer (listeners_bridge) can apply, inclusive. The browser module
# exports its own (`ACCEPTED_VERSIONS` in listeners-client.js); tests/test_contract.py checks
# that both hold CONTRACT_VERSION.
ACCEPTED_VERSIONS: Final = (1, 1)

NOTIF_SYNC = "notif.sync"
NOTIF_ADD = "notif.add"
NOTIF_UPDATE = "notif.update"
NOTIF_REMOVE = "notif.remove"

MSG_SYNC = "msg.sync"
MSG_ADD = "msg.add"
MSG_UPDATE = "msg.update"
MSG_REMOVE = "msg.remove"
CHAT_SYNC = "chat.sync"
CHAT_MESSAGE = "chat.message"
# Where a stream ended, sent once it has been quiet after its last event (publish/tails.py).
NOTIF_POSITION = "notif.position"
MSG_POSITION = "msg.position"
CHAT_POSITION = "chat.position"


class _Item(TypedDict):
    """The fields notifications and direct messages share (docs/events.md has the defaults)."""

    doc_id: str
    job_id: str
    file_id: str
    file_name: str
    status: str
    collection_id: str
    collection_name: str
    function_name: str
    timestamp: str
    additional_info: str
    message: str
    url: str
    batch_id: NotRequired[str]
    drive_link: NotRequired[str]


class NotificationItem(_Item):
    """One notification as the Reflex UI holds it."""

    read: bool
    info_message: str


class NotifSyncPayload(TypedDict):
    notifications: list[NotificationItem]
    count: int
    timestamp: str


class NotifRemovePayload(TypedDict):
    doc_id: str


class _Envelope(TypedDict):
    v: Literal[1]  # CONTRACT_VERSION: the version of the contract this event follows
    uid: str
    timestamp: str
    event_id: str  # a delta's id is derived from its source: the same change has the same id
    epoch: str  # one run of the stream on one instance (docs/events.md, "Order and gaps")
    seq: int  # rises by one per event of the user's stream, syncs included


class NotifSyncEvent(_Envelope):
    type: Literal["notif.sync"]
    payload: NotifSyncPayload


class NotifAddEvent(_Envelope):
    type: Literal["notif.add"]
    payload: NotificationItem


class NotifUpdateEvent(_Envelope):
    type: Literal["notif.update"]
    payload: NotificationItem


class NotifRemoveEvent(_Envelope):
    type: Literal["notif.remove"]
    payload: NotifRemovePayload


class MessageItem(_Item):
    """A direct message: the notification item without `read` and `info_message`."""

    sender_id: NotRequired[str]
    chat_mode: NotRequired[str]
    thread_key: NotRequired[str]
    expires_at: NotRequired[str]


class MsgSyncPayload(TypedDict):
    messages: list[MessageItem]
    count: int
    timestamp: str
    new_message: MessageItem | None
    has_new_messages: bool


class ChatPayload(TypedDict):
    space_code: str
    thread_key: str
    raw_messages: list[dict[str, Any]]  # each with its push id as `id`, raw fields otherwise


class MsgSyncEvent(_Envelope):
    type: Literal["msg.sync"]
    payload: MsgSyncPayload


class MsgAddEvent(_Envelope):
    type: Literal["msg.add"]
    payload: MessageItem


class MsgUpdateEvent(_Envelope):
    type: Literal["msg.update"]
    payload: MessageItem


class MsgRemoveEvent(_Envelope):
    type: Literal["msg.remove"]
    payload: NotifRemovePayload


class ChatSyncEvent(_Envelope):
    type: Literal["chat.sync"]
    payload: ChatPayload


class ChatMessageEvent(_Envelope):
    type: Literal["chat.message"]
    payload: ChatPayload


class PositionPayload(TypedDict):
    """Empty: the envelope's `epoch` and `seq` are the stream's last event's."""


class ChatPositionPayload(TypedDict):
    space_code: str
    thread_key: str


class NotifPositionEvent(_Envelope):
    type: Literal["notif.position"]
    payload: PositionPayload


class MsgPositionEvent(_Envelope):
    type: Literal["msg.position"]
    payload: PositionPayload


class ChatPositionEvent(_Envelope):
    type: Literal["chat.position"]
    payload: ChatPositionPayload


EVENT_MODELS: dict[str, type] = {
    NOTIF_SYNC: NotifSyncEvent,
    NOTIF_ADD: NotifAddEvent,
    NOTIF_UPDATE: NotifUpdateEvent,
    NOTIF_REMOVE: NotifRemoveEvent,
    MSG_SYNC: MsgSyncEvent,
    MSG_ADD: MsgAddEvent,
    MSG_UPDATE: MsgUpdateEvent,
    MSG_REMOVE: MsgRemoveEvent,
    CHAT_SYNC: ChatSyncEvent,
    CHAT_MESSAGE: ChatMessageEvent,
    NOTIF_POSITION: NotifPositionEvent,
    MSG_POSITION: MsgPositionEvent,
    CHAT_POSITION: ChatPositionEvent,
}
KNOWN_TYPES = frozenset(EVENT_MODELS)  # every type a consumer may see
SYNC_TYPES = frozenset({NOTIF_SYNC, MSG_SYNC, CHAT_SYNC})
POSITION_TYPES = frozenset({NOTIF_POSITION, MSG_POSITION, CHAT_POSITION})


def position_type(event_type: str) -> str:
    """The position event of the stream family of `event_type` (`notif.add` -> `notif.position`)."""
    return f"{event_type.partition('.')[0]}.position"


def stream_of(event: Mapping[str, Any]) -> str:
    """The stream an event belongs to, which its `seq` counts: `notif`, `msg`, or
    `chat:{space_code}:{thread_key}` (each chat thread is a stream of its own)."""
    family = str(event.get("type", "")).partition(".")[0]
    if family == "chat":
        payload = event.get("payload")
        payload = payload if isinstance(payload, Mapping) else {}
        return f"chat:{payload.get('space_code', '')}:{payload.get('thread_key', '')}"
    return family


class UnsupportedVersion(ValueError):
    """An event of a contract version this consumer cannot apply: upgrade the consumer."""


def event_version(event: Mapping[str, Any]) -> int | None:
    """The contract version an event follows: its `v`; 1 when it has none (a service older
    than the field, whose events are version 1); None when `v` is not an integer."""
    if "v" not in event:
        return 1
    version = event["v"]
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def check_version(event: Mapping[str, Any], accepted: tuple[int, int] = ACCEPTED_VERSIONS) -> None:
    """Raises `UnsupportedVersion`, saying which version and which range, unless this
    consumer accepts the event's version. Call it before the event reaches the ordering rules:
    an event of an unknown major must not be applied, nor move a stream's position."""
    version = event_version(event)
    low, high = accepted
    if version is None or not low <= version <= high:
        shown = repr(event.get("v"))[:20]
        raise UnsupportedVersion(
            f"event {str(event.get('type', ''))[:40]!r} follows contract version {shown}; this "
            f"consumer accepts versions {low} to {high}: upgrade the consumer (listeners)"
        )
