"""The contract in one place (issue 14): the JSON Schemas, the bridge and the browser module
know the same event types, and the bridge and the browser module make the same lists from
the same events.

The events are made by the service's own code (normalisers, `StreamOrder`) and validated
against the schemas; the browser module (`deliver/static/listeners-client.js`) runs in Node,
as an ES module, exactly as served.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from listeners.normalise.messages import normalise_message
from listeners.normalise.notifications import normalise_notification
from listeners.publish.tails import position_of
from listeners.schemas import VERSION_KEYWORD, render, validate
from listeners.streams.order import StreamOrder
from listeners_bridge import parse_event
from listeners_bridge.events import (
    ACCEPTED_VERSIONS,
    CONTRACT_VERSION,
    EVENT_MODELS,
    KNOWN_TYPES,
    POSITION_TYPES,
    SYNC_TYPES,
    UnsupportedVersion,
    check_version,
    event_version,
)
from listeners_bridge.ordering import Follower
from listeners_bridge.reducers import ChatThreads, DirectMessages, Notifications
from listeners_bridge.timestamps import newest_first

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "src" / "listeners" / "deliver" / "static" / "listeners-client.js"
SCHEMAS = ROOT / "docs" / "schemas"

node = pytest.mark.skipif(shutil.which("node") is None, reason="Node.js runs the browser module")


def run_module(script: str, stdin: str = "") -> Any:
    """Runs `script` in Node with the module imported as `m`; returns its printed JSON."""
    program = f"import * as m from {json.dumps(MODULE.as_uri())};\n{script}"
    done = subprocess.run(
        ["node", "--input-type=module", "-e", program],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def events() -> list[dict[str, Any]]:
    """Every event type, with the order cases: a duplicate, a gap healed by a sync, a foreign
    epoch's copy of a change, a stale sync, and chat on two threads."""
    notif, other, msg = StreamOrder("contract-a"), StreamOrder("contract-b"), StreamOrder("contract-a")
    chat, chat2 = StreamOrder("contract-a"), StreamOrder("contract-a")
    n1 = normalise_notification("n1", {"file_name": "a.pdf", "timestamp": "2025-01-02 10:00:00"})
    n2 = normalise_notification("n2", {"file_name": "b.pdf", "timestamp": "2025-01-03 10:00:00"})
    n3 = normalise_notification("n3", {"file_name": "c.pdf"})  # no timestamp: last
    m1 = normalise_message("m1", {"file_name": "x", "sender_id": "s", "timestamp": "2025-01-01 09:00:00"})
    m2 = normalise_message("m2", {"file_name": "y", "timestamp": "2025-01-05 09:00:00", "message": "hi"})
    thread = {"space_code": "acme", "thread_key": "t1"}
    made = [
        notif.stamp(
            "notif.sync", "u", {"notifications": [n1], "count": 1, "timestamp": "2025-01-01T00:00:00Z"}
        ),
        notif.stamp("notif.add", "u", dict(n2), identity="n2@1"),
        notif.stamp("notif.update", "u", {**n1, "status": "error"}, identity="n1@2"),
        other.stamp("notif.add", "u", dict(n2), identity="n2@1"),  # the handover's copy
        msg.stamp(
            "msg.sync",
            "u",
            {"messages": [m1], "count": 1, "timestamp": "", "new_message": None, "has_new_messages": True},
        ),
        msg.stamp("msg.add", "u", dict(m2), identity="m2@x"),
        msg.stamp("msg.update", "u", {**m1, "status": "done"}, identity="m1@y"),
        chat.stamp("chat.sync", "u", {**thread, "raw_messages": [{"id": "-a", "content": "one"}]}),
        chat.stamp("chat.message", "u", {**thread, "raw_messages": [{"id": "-b", "content": "two"}]}),
        chat2.stamp("chat.sync", "u", {"space_code": "acme", "thread_key": "t2", "raw_messages": []}),
    ]
    # Tail positions at what the consumer holds: dropped.
    made += [position_of(made[6]), position_of(made[8]), position_of(made[2])]
    lost = notif.stamp("notif.add", "u", dict(n3), identity="n3@1")  # never delivered: a gap
    made += [
        position_of(lost),  # the stream's tail, ahead of what the consumer holds: the gap shows
        notif.stamp("notif.remove", "u", {"doc_id": "n1"}, identity="n1@2#removed"),  # after the gap
        msg.stamp("msg.remove", "u", {"doc_id": "m1"}, identity="m1@y#removed"),
        other.stamp("notif.remove", "u", {"doc_id": "n2"}, identity="n2@9#removed"),  # unknown epoch
        notif.stamp("notif.sync", "u", {"notifications": [n2, n3], "count": 2, "timestamp": "x"}),
        notif.stamp("notif.update", "u", {**n3, "status": "ok"}, identity="n3@2"),
    ]
    assert lost.seq + 1 == made[-5].seq
    out = [json.loads(e.to_json()) for e in made]
    out.insert(3, out[2])  # a duplicate
    out.append(out[0])  # a stale sync
    for event in out:
        validate(event)
    return out


def python_side(stream: list[dict[str, Any]]) -> dict[str, Any]:
    follower = Follower()
    notifications, direct, chats = Notifications(), DirectMessages(), ChatThreads()
    verdicts = []
    for event in stream:
        applied = follower.admit(event)
        verdicts.append(applied)
        if applied:
            for reducer in (notifications, direct, chats):
                reducer.apply(event)
    view = direct.view
    return {
        "verdicts": verdicts,
        "needsResync": follower.needs_resync,
        "notifications": notifications.items,
        "messages": view["messages"],
        "count": view["count"],
        "newMessage": view["new_message"],
        "hasNewMessages": view["has_new_messages"],
        "chats": {f"{s}:{t}": chats.messages(s, t) for s, t in (("acme", "t1"), ("acme", "t2"))},
    }


def test_every_event_type_has_its_schema() -> None:
    assert sorted(p.stem for p in SCHEMAS.glob("*.json")) == sorted(EVENT_MODELS)
    for event_type in EVENT_MODELS:
        assert (SCHEMAS / f"{event_type}.json").read_text() == render(event_type)
        schema = json.loads((SCHEMAS / f"{event_type}.json").read_text())
        assert {"epoch", "seq", "event_id"} <= set(schema["required"])


# `v` values and whether a consumer of ACCEPTED_VERSIONS == (1, 1) applies them: absent is a
# service older than the field (version 1); anything but an integer in range is refused.
VERSION_CASES: list[tuple[dict[str, Any], bool]] = [
    ({}, True),
    ({"v": 1}, True),
    ({"v": 2}, False),
    ({"v": 0}, False),
    ({"v": "1"}, False),
    ({"v": None}, False),
    ({"v": True}, False),
    ({"v": 1.5}, False),
]


def test_the_schemas_and_the_envelope_state_the_contract_version() -> None:
    for event_type in EVENT_MODELS:
        schema = json.loads((SCHEMAS / f"{event_type}.json").read_text())
        assert schema[VERSION_KEYWORD] == CONTRACT_VERSION
        assert schema["properties"]["v"]["const"] == CONTRACT_VERSION and "v" in schema["required"]
    for event in events():  # every type, made by the service's own code
        assert event["v"] == CONTRACT_VERSION
        check_version(event)


def test_the_bridge_accepts_its_range_and_refuses_other_versions_clearly() -> None:
    low, high = ACCEPTED_VERSIONS
    assert low <= CONTRACT_VERSION <= high
    event = events()[0]
    for fields, accepted in VERSION_CASES:
        case = {k: v for k, v in event.items() if k != "v"} | fields
        if accepted:
            check_version(case)
            assert event_version(case) == 1
        else:
            with pytest.raises(UnsupportedVersion) as refused:
                check_version(case)
            # says what it met, what it accepts and what to do
            assert "contract version" in str(refused.value) and "upgrade" in str(refused.value)
            assert f"{low} to {high}" in str(refused.value) and repr(case["v"]) in str(refused.value)
    # a consumer that accepts 1 to 2 applies a version 2 event
    check_version({**event, "v": 2}, accepted=(1, 2))


def test_the_bridge_knows_and_reduces_every_event_type() -> None:
    stream = events()
    assert {e["type"] for e in stream} == set(EVENT_MODELS) == KNOWN_TYPES
    notifications, direct, chats = Notifications(), DirectMessages(), ChatThreads()

    def views() -> list[str]:
        threads = {f"{s}:{t}": chats.messages(s, t) for s, t in (("acme", "t1"), ("acme", "t2"))}
        return [json.dumps(v, sort_keys=True) for v in (notifications.items, direct.view, threads)]

    moved: dict[str, set[int]] = {}
    for event in stream:
        assert parse_event(json.dumps(event), "u") == event
        before = views()
        for reducer in (notifications, direct, chats):
            reducer.apply(event)
        changed = {i for i, (b, a) in enumerate(zip(before, views(), strict=True)) if b != a}
        moved.setdefault(event["type"], set()).update(changed)
    # every type moves one reducer, and only one; a tail position moves none
    assert all(len(which) == (0 if t in POSITION_TYPES else 1) for t, which in moved.items()), moved
    assert SYNC_TYPES <= KNOWN_TYPES


@node
def test_the_browser_module_knows_every_event_type() -> None:
    exported = run_module("console.log(JSON.stringify({types: m.EVENT_TYPES}));")
    assert sorted(exported["types"]) == sorted(EVENT_MODELS)


@node
def test_the_browser_module_accepts_the_same_versions_as_the_bridge() -> None:
    """The module's range holds the version the service sends, and it judges every `v` as
    `events.check_version` does (its client on a refused one: tests/js/client.test.mjs)."""
    cases = [{"type": "notif.add", **fields} for fields, _ in VERSION_CASES]
    script = """
let data = "";
for await (const chunk of process.stdin) data += chunk;
const verdicts = JSON.parse(data).map((event) => m.acceptsVersion(event));
console.log(JSON.stringify({range: m.ACCEPTED_VERSIONS, verdicts}));
"""
    browser = run_module(script, json.dumps(cases))
    assert (browser["range"]["min"], browser["range"]["max"]) == ACCEPTED_VERSIONS
    assert browser["range"]["min"] <= CONTRACT_VERSION <= browser["range"]["max"]
    assert browser["verdicts"] == [accepted for _, accepted in VERSION_CASES]


@node
def test_the_browser_module_and_the_bridge_make_the_same_lists() -> None:
    stream = events()
    script = """
let data = "";
for await (const chunk of process.stdin) data += chunk;
const follower = new m.Follower(), reducers = new m.Reducers();
const verdicts = [];
for (const event of JSON.parse(data)) {
  const applied = follower.admit(event);
  verdicts.push(applied);
  if (applied) reducers.apply(event);
}
const s = reducers.state;
console.log(JSON.stringify({verdicts, needsResync: follower.needsResync, notifications: s.notifications,
  messages: s.messages, count: s.count, newMessage: s.newMessage, hasNewMessages: s.hasNewMessages,
  chats: s.chats}));
"""
    browser = run_module(script, json.dumps(stream))
    bridge = python_side(stream)
    assert browser == bridge
    # and the case is not trivial: drops, a gap, and a healed end state
    assert bridge["verdicts"].count(False) >= 4 and not bridge["needsResync"]
    assert [n["doc_id"] for n in bridge["notifications"]] == ["n2", "n3"]
    assert newest_first(bridge["notifications"]) == bridge["notifications"]


def test_the_bridge_skips_an_event_of_an_unknown_contract_version() -> None:
    event = events()[0]
    assert parse_event(json.dumps(event), "u") == event
    assert parse_event(json.dumps({**event, "v": 2}), "u") is None
    assert parse_event(json.dumps({**event, "v": "1"}), "u") is None
    old = {k: v for k, v in event.items() if k != "v"}  # a service older than the field
    assert parse_event(json.dumps(old), "u") == old
