"""Reflex States fed by the listeners service in Bridge mode.

`NotificationState` and `MessengerState` keep the public attributes the UI already binds
to; only the source of their events changes (from the in-process queue to Redis). Each
State runs one background task per signed-in user: it iterates `Bridge.events(uid)` and
applies every event under `async with self`, through `_on_event`, which holds all the
mutations (so a test can drive it without a running app).

Migrated to ordered events (issue 14): the service publishes deltas alone, and the bridge
hands over only events that move the lists forward — in `seq` order, after a sync of their
epoch, duplicates and anything older than the last sync dropped, a resync asked on every gap
— so the reducers hold the service's state without a sync after each change. The service
needs no `LISTENERS_SYNC_EACH_CHANGE` for these States. `new_message` comes from the newest
`msg.add` (a sync alone carries none).

Wire-up in the app (after sign-in has set `uid`):

    rx.button("…", on_click=[NotificationState.listen, MessengerState.listen])
    # or: app.add_page(index, on_load=[NotificationState.listen, MessengerState.listen])

listeners_example/listeners_example.py is such an app: sign-in, presence, and the page. Marking
an item read is a Firestore write (`mark_read`); the item leaves the lists when the service's
event for that write comes back through the bridge, in every tab of the user.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import reflex as rx
from google.cloud import firestore

from listeners_bridge import (
    Bridge,
    ChatThread,
    ChatThreads,
    DirectMessages,
    Notifications,
    Presence,
    load_redis_settings,
)


@functools.cache
def bridge() -> Bridge:
    """One per backend process; settings from the same secret / LISTENERS_REDIS_* as the service."""
    return Bridge(load_redis_settings())


@functools.cache
def database() -> firestore.AsyncClient:
    """The web app's Firestore client (FIREBASE_PROJECT_ID, as the service; the emulator when
    FIRESTORE_EMULATOR_HOST is set)."""
    return firestore.AsyncClient(project=os.environ.get("FIREBASE_PROJECT_ID") or None)


@functools.cache
def presence() -> Presence:
    """The registry documents of the users signed in here: `online` while a tab of theirs is open."""
    return Presence(database())


class NotificationState(rx.State):
    uid: str = ""
    notifications: list[dict[str, Any]] = []  # newest first, the item shape of docs/events.md
    unread_count: int = 0

    def _on_event(self, reducer: Notifications, event: dict[str, Any]) -> None:
        if event["type"].startswith("notif."):
            self.notifications = reducer.apply(event)
            self.unread_count = len(self.notifications)

    @rx.event
    async def mark_read(self, doc_id: str) -> None:
        """The web app's own write; the list changes when the service's event comes back.
        Only an item on the list: the id comes from the browser."""
        if self.uid and any(n["doc_id"] == doc_id for n in self.notifications):
            await database().document(f"clients/{self.uid}/notifications/{doc_id}").update({"read": True})

    @rx.event(background=True)
    async def listen(self) -> None:
        async with self:
            uid = self.uid
        if not uid:
            return
        reducer = Notifications()
        async for event in bridge().events(uid):
            async with self:
                self._on_event(reducer, event)


class MessengerState(rx.State):
    uid: str = ""
    direct_messages: list[dict[str, Any]] = []  # newest first
    new_message: dict[str, Any] = {}
    has_new_messages: bool = False
    open_threads: list[dict[str, str]] = []  # [{space_code, thread_key, mode}]
    chat_messages: dict[str, list[dict[str, Any]]] = {}  # "space_code:thread_key" -> messages in order

    def _threads(self) -> list[ChatThread]:
        return [ChatThread(t["space_code"], t["thread_key"], t["mode"]) for t in self.open_threads]

    def _on_event(self, reducers: tuple[DirectMessages, ChatThreads], event: dict[str, Any]) -> None:
        direct, chats = reducers
        kind = event["type"]
        if kind.startswith("msg."):
            view = direct.apply(event)
            self.direct_messages = view["messages"]
            self.new_message = view["new_message"] or {}
            self.has_new_messages = view["has_new_messages"]
        elif kind.startswith("chat."):
            payload = event["payload"]
            key = f"{payload.get('space_code', '')}:{payload.get('thread_key', '')}"
            self.chat_messages = {**self.chat_messages, key: chats.apply(event)}

    @rx.event
    def mark_seen(self) -> None:
        self.has_new_messages = False

    @rx.event(background=True)
    async def listen(self) -> None:
        async with self:
            uid, threads = self.uid, self._threads()
        if not uid:
            return
        reducers = (DirectMessages(), ChatThreads())
        async for event in bridge().events(uid, threads):
            async with self:
                self._on_event(reducers, event)
