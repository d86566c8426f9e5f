"""The demo writer says what the company filter hides (issue 29): each terminal line names the
item's company and whether the user's page shows it, and every demo user gets items its page
shows (a user authorised for one company of three used to see about a third of its items,
and an empty page for a while, with nothing saying why)."""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from google.cloud import firestore

from listeners_testkit import demo
from listeners_testkit.rtdb_server import RtdbStandin


def shown(uid: str, company: str) -> bool:
    """The service's rule (docs/events.md): an empty company list is no filter."""
    return not demo.USERS[uid] or company in demo.USERS[uid]


def test_the_line_says_who_sees_the_item() -> None:
    assert demo.who_sees("demo-alice", "acme") == "acme: visible to demo-alice"
    assert demo.who_sees("demo-alice", "initech") == "initech: hidden, demo-alice sees acme only"
    assert demo.who_sees("demo-carol", "initech") == "initech: hidden, demo-carol sees acme, globex only"
    assert demo.who_sees("demo-bob", "initech") == "initech: visible, demo-bob has no company filter"
    for uid in demo.USERS:
        for company in demo.COMPANIES:
            assert ("hidden" not in demo.who_sees(uid, company)) == shown(uid, company)


def test_every_user_gets_visible_items_and_some_hidden_ones() -> None:
    rng = random.Random(29)
    for uid, companies in demo.USERS.items():
        picked = [demo.choose_company(uid, made, rng) for made in range(1, 13)]
        assert all(shown(uid, c) for c in picked[:3])  # a user's first items are all shown
        hidden = [c for c in picked if not shown(uid, c)]
        assert len(hidden) == (12 // demo.HIDDEN_EVERY if companies else 0), picked


def test_the_banner_says_who_sees_what() -> None:
    assert demo.audience() == [
        "  demo-alice: acme",
        "  demo-bob: every company (no filter)",
        "  demo-carol: acme, globex",
    ]


@pytest.fixture
def rtdb() -> Iterator[httpx.Client]:
    with RtdbStandin() as server, httpx.Client(base_url=server.url, params={"ns": "demo-writer"}) as client:
        yield client


def test_the_writer_lines_match_what_it_wrote(
    db: firestore.Client, rtdb: httpx.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """The writer's own steps against the Firestore emulator and the database stand-in: each
    `+` line's company and verdict are those of the item written, and every user ends with
    unread items its page shows."""
    rng, made = random.Random(7), Counter[str]()
    for n in range(1, 41):
        if n % 4 == 0:
            demo._direct_message(rtdb, n, made, rng)
        else:
            demo._step(db, n, made, rng)
    lines = capsys.readouterr().out.splitlines()
    added = [
        re.fullmatch(r"demo: (\S+) \+ (job-\d+|direct message \S+) \((\w+): (visible|hidden).*\)", line)
        for line in lines
    ]
    assert sum(1 for m in added if m) >= 10, lines
    for match in filter(None, added):
        uid, item, company, verdict = match.groups()
        assert (verdict == "visible") == shown(uid, company), match.group(0)
        if item.startswith("job-"):
            stored: dict[str, Any] = db.document(f"clients/{uid}/notifications/{item}").get().to_dict() or {}
        else:
            key = item.removeprefix("direct message ")
            stored = rtdb.get(f"/clients/{uid}/direct_message_notif/{key}.json").json() or {
                "collection_id": company
            }
        assert stored["collection_id"] == company
    assert all(re.search(r"\((\w+): (visible|hidden)", line) for line in lines), lines
    for uid in demo.USERS:
        unread = db.collection(f"clients/{uid}/notifications").where(
            filter=firestore.FieldFilter("read", "==", False)
        )
        assert any(shown(uid, (d.to_dict() or {})["collection_id"]) for d in unread.stream()), uid
