"""Reducers: the event stream to the lists a Reflex State holds, in the UI's shapes.

Each `apply(event)` returns the new view; events of other kinds are ignored, so one stream
can feed every reducer. A sync replaces the view, deltas edit it, and applying the same
event twice changes nothing.
"""

from __future__ import annotations

from typing import Any

from listeners_bridge.timestamps import newest_first

Item = dict[str, Any]


def _newest_first(items: dict[str, Item]) -> list[Item]:
    return newest_first(items.values())


class Notifications:
    """`notif.*` -> the notification list, newest first (NotificationState.notifications)."""

    def __init__(self) -> None:
        self._items: dict[str, Item] = {}

    @property
    def items(self) -> list[Item]:
        return _newest_first(self._items)

    def apply(self, event: dict[str, Any]) -> list[Item]:
        kind, payload = event["type"], event["payload"]
        if kind == "notif.sync":
            self._items = {n["doc_id"]: n for n in payload.get("notifications", []) if "doc_id" in n}
        elif kind in ("notif.add", "notif.update") and "doc_id" in payload:
            self._items[payload["doc_id"]] = payload
        elif kind == "notif.remove":
            self._items.pop(payload.get("doc_id", ""), None)
        return self.items


class DirectMessages:
    """`msg.*` -> `{messages, new_message, has_new_messages, count}` (MessengerState)."""

    def __init__(self) -> None:
        self._items: dict[str, Item] = {}
        self.new_message: Item | None = None
        self.has_new_messages = False

    @property
    def view(self) -> dict[str, Any]:
        messages = _newest_first(self._items)
        return {
            "messages": messages,
            "count": len(messages),
            "new_message": self.new_message,
            "has_new_messages": self.has_new_messages,
        }

    def apply(self, event: dict[str, Any]) -> dict[str, Any]:
        kind, payload = event["type"], event["payload"]
        if kind == "msg.sync":
            self._items = {m["doc_id"]: m for m in payload.get("messages", []) if "doc_id" in m}
            self.new_message = payload.get("new_message")
            self.has_new_messages = bool(payload.get("has_new_messages", bool(self._items)))
        elif kind == "msg.add" and "doc_id" in payload:
            self._items[payload["doc_id"]] = payload
            self.new_message, self.has_new_messages = payload, True
        elif kind == "msg.update" and "doc_id" in payload:
            self._items[payload["doc_id"]] = payload
        elif kind == "msg.remove":
            self._items.pop(payload.get("doc_id", ""), None)
            if self.new_message and self.new_message.get("doc_id") == payload.get("doc_id"):
                self.new_message = None
            self.has_new_messages = bool(self._items)
        return self.view


class ChatThreads:
    """`chat.*` -> the messages of each thread, in order, each id once."""

    def __init__(self) -> None:
        self._threads: dict[tuple[str, str], dict[str, Item]] = {}

    def messages(self, space_code: str, thread_key: str) -> list[Item]:
        return list(self._threads.get((space_code, thread_key), {}).values())

    def apply(self, event: dict[str, Any]) -> list[Item]:
        kind, payload = event["type"], event["payload"]
        if kind not in ("chat.sync", "chat.message"):
            return []
        key = (str(payload.get("space_code", "")), str(payload.get("thread_key", "")))
        incoming = [m for m in payload.get("raw_messages", []) if isinstance(m, dict) and "id" in m]
        if kind == "chat.sync":
            known = self._threads.get(key, {})
            # A sync holds the recent unread messages: keep what was shown, add what is new.
            self._threads[key] = {**known, **{m["id"]: m for m in incoming}}
        else:
            thread = self._threads.setdefault(key, {})
            for message in incoming:
                thread.setdefault(message["id"], message)
        return self.messages(*key)
