"""The example as a Reflex app: sign in as a user, then one page bound to NotificationState and
MessengerState (../states.py), fed by the listeners service through the bridge.

    /        sign-in: a uid and, optionally, the companies it may see (left empty, the registry
             keeps what it has). It stands in for the web app's own sign-in; kept in a
             cookie, so every tab of the browser is signed in
    /inbox   the user's unread notifications (each with "Mark read") and direct messages

Opening /inbox starts, for that tab, three background tasks chained from its `on_load`: the
user's presence (`Presence.online`, so the service watches the user while a tab is open) and
each State's `listen`. Reflex cancels a page-load chain when its tab disconnects, and starts a
new one when the tab connects again.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import reflex as rx
from states import MessengerState, NotificationState, presence

VALID_UID = re.compile(r"[A-Za-z0-9_-]{1,128}")


class Session(rx.State):
    uid: str = rx.Cookie("", name="listeners_example_uid")
    companies: str = rx.Cookie("", name="listeners_example_companies")  # comma-separated
    problem: str = ""

    @rx.event
    def sign_in(self, form: dict[str, Any]) -> Any:
        uid = str(form.get("uid", "")).strip()
        if not VALID_UID.fullmatch(uid):
            self.problem = "A uid is 1 to 128 letters, digits, '-' or '_'."
            return None
        self.uid, self.problem = uid, ""
        self.companies = ",".join(c.strip() for c in str(form.get("companies", "")).split(",") if c.strip())
        return rx.redirect("/inbox")

    @rx.event
    def sign_out(self) -> Any:
        self.uid = ""
        return rx.redirect("/")

    @rx.event
    async def open_inbox(self) -> Any:
        if not self.uid:
            return rx.redirect("/")
        for state in (NotificationState, MessengerState):
            (await self.get_state(state)).uid = self.uid
        return [Session.stay_online, NotificationState.listen, MessengerState.listen]

    @rx.event(background=True)
    async def stay_online(self) -> None:
        async with self:
            uid, companies = self.uid, [c for c in self.companies.split(",") if c]
        async with presence().online(uid, companies or None):
            await asyncio.Event().wait()  # until Reflex cancels the task: the tab has gone


def sign_in_page() -> rx.Component:
    return rx.el.main(
        rx.el.h1("Sign in"),
        rx.el.form(
            rx.el.label("uid ", rx.el.input(name="uid", id="uid", required=True)),
            rx.el.label(
                " companies ", rx.el.input(name="companies", id="companies", placeholder="as registered")
            ),
            rx.el.button("Sign in", type="submit", id="sign-in"),
            on_submit=Session.sign_in,
        ),
        rx.el.p(Session.problem, id="problem"),
    )


def notification(item: rx.Var[dict[str, Any]]) -> rx.Component:
    return rx.el.li(
        rx.el.strong(item["file_name"]),
        " ",
        rx.el.span(item["status"], class_name="status"),
        " ",
        rx.el.span(item["collection_name"]),
        " ",
        rx.el.time(item["timestamp"]),
        " ",
        rx.el.button("Mark read", on_click=NotificationState.mark_read(item["doc_id"])),
        custom_attrs={"data-doc-id": item["doc_id"]},
    )


def direct_message(item: rx.Var[dict[str, Any]]) -> rx.Component:
    return rx.el.li(
        rx.el.span(item["message"]),
        " ",
        rx.el.span(item["collection_name"]),
        custom_attrs={"data-doc-id": item["doc_id"]},
    )


def inbox_page() -> rx.Component:
    return rx.el.main(
        rx.el.header(
            rx.el.span("Signed in as ", rx.el.b(Session.uid, id="user")),
            " ",
            rx.el.button("Sign out", on_click=Session.sign_out),
        ),
        rx.el.section(
            rx.el.h2("Notifications (", rx.el.span(NotificationState.unread_count, id="unread"), ")"),
            rx.el.ul(rx.foreach(NotificationState.notifications, notification), id="notifications"),
        ),
        rx.el.section(
            rx.el.h2(
                "Direct messages ",
                rx.cond(
                    MessengerState.has_new_messages,
                    rx.el.button("new: mark seen", on_click=MessengerState.mark_seen, id="new-messages"),
                ),
            ),
            rx.el.ul(rx.foreach(MessengerState.direct_messages, direct_message), id="messages"),
        ),
    )


app = rx.App()
app.add_page(sign_in_page, route="/", title="listeners: sign in")
app.add_page(inbox_page, route="/inbox", title="listeners: inbox", on_load=Session.open_inbox)
