"""Differential: the official JS SDK, our wire client and our REST client, on one stand-in and the
same writes, report the same child events.

Each listens to a direct-message node (no query) and a chat thread (`orderByKey().limitToLast(3)`).
Our clients hand out trees; the events they imply are the children that each change added,
changed or removed (`last_changed` names them; None means look at every child). The SDK reports
`child_added` / `child_changed` / `child_removed` itself. After each step (a write through REST,
the SDK or the wire client, a dropped connection) every client must reach the stand-in's own
answer for the node, and the three sets of events of the step must be equal.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from listeners.source.rtdb import RtdbClient
from listeners.source.rtdb_wire import WireClient
from listeners_bridge.backoff import Backoff
from listeners_testkit.rtdb_server import RtdbStandin
from tests.rtdb_sdk import Sdk, needs_sdk

pytestmark = needs_sdk

TOKEN = "differential-token"
DM = "clients/d1/direct_message_notif"
CHAT = "acme/chats/t1/messages"
WINDOW = 3
LAST = {"orderBy": '"$key"', "limitToLast": str(WINDOW)}
Event = tuple[str, str, Any]


@pytest.fixture(scope="module")
def standin() -> Iterator[RtdbStandin]:
    with RtdbStandin(keepalive=5.0, token=TOKEN) as server:
        yield server


class Recorder:
    """The child events a stream's successive trees imply."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.tree: Any = None
        self.stream: Any = None

    def on_change(self, tree: Any) -> None:
        before = self.tree if isinstance(self.tree, dict) else {}
        after = tree if isinstance(tree, dict) else {}
        changed = self.stream.last_changed if self.stream is not None else None
        for key in sorted(before.keys() | after.keys() if changed is None else changed):
            if key in before and key not in after:
                self.events.append(("removed", key, before[key]))
            elif key in after and key not in before:
                self.events.append(("added", key, after[key]))
            elif key in after and before[key] != after[key]:
                self.events.append(("changed", key, after[key]))
        self.tree = tree


def sdk_events(sdk: Sdk, listen_id: str) -> list[Event]:
    return [(e["ev"], e["key"], e["value"]) for e in sdk.events if e.get("id") == listen_id and "key" in e]


async def test_the_sdk_and_our_clients_report_the_same_events(standin: RtdbStandin) -> None:
    ns = f"diff-{uuid.uuid4().hex[:10]}"

    async def token(*, refresh: bool = False) -> str:
        return TOKEN

    rest = RtdbClient(standin.url, namespace=ns, tokens=token)
    wire = WireClient(standin.url, namespace=ns, tokens=token, backoff=Backoff(0.05, 0.5))
    await rest.set(DM, {"m1": {"text": "one"}, "m2": {"text": "two"}})
    await rest.set(CHAT, {f"-{c}": {"n": i} for i, c in enumerate("abcde")})
    sdk = await Sdk(f"{standin.url}?ns={ns}", TOKEN).start()
    ours: dict[str, dict[str, Recorder]] = {"wire": {}, "rest": {}}
    streams = []
    try:
        for name, client in (("wire", wire), ("rest", rest)):
            for path, query in ((DM, None), (CHAT, LAST)):
                recorder = ours[name][path] = Recorder()
                recorder.stream = client.stream(path, recorder.on_change, query=query)
                streams.append(recorder.stream)
        await sdk.call("listen", id=DM, path=DM)
        await sdk.call("listen", id=CHAT, path=CHAT, last=WINDOW)
        marks = {path: {"sdk": 0, "wire": 0, "rest": 0} for path in (DM, CHAT)}
        steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("the first reads", _nothing),
            ("REST push", lambda: rest.set(f"{DM}/m3", {"text": "three"})),
            ("REST update a child", lambda: rest.update(f"{DM}/m1", {"read": True})),
            ("REST delete a child", lambda: rest.delete(f"{DM}/m2")),
            ("SDK set", lambda: sdk.call("set", path=f"{DM}/m4", value={"text": "four"})),
            ("SDK update", lambda: sdk.call("update", path=f"{DM}/m3", value={"read": True})),
            ("wire update", lambda: wire.update(f"{DM}/m4", {"read": True, "by/uid": "x"})),
            ("a message enters the window, another leaves", lambda: rest.set(f"{CHAT}/-f", {"n": 5})),
            ("it is deleted: the other comes back", lambda: rest.delete(f"{CHAT}/-f")),
            ("one in the window changes", lambda: rest.update(f"{CHAT}/-d", {"read": True})),
            ("before the window, then one in it", lambda: _both(rest.set(f"{CHAT}/-0", 1), rest.set(f"{CHAT}/-e/n", 9))),  # noqa: E501
            ("SDK writes into the window", lambda: sdk.call("set", path=f"{CHAT}/-g", value={"n": 7})),
            ("a merge above the node", lambda: rest.update("clients/d1", {"direct_message_notif/n1": {"a": 1}})),  # noqa: E501
            ("the node replaced whole", lambda: rest.set(DM, {"z": {"text": "zed"}})),
            ("the thread's messages replaced", lambda: rest.set(CHAT, {"-x": 1, "-y": 2})),
            ("a cut, a write while away", lambda: _cut(standin, rest)),
            ("the node deleted", lambda: rest.delete(DM)),
        ]  # fmt: skip
        for name, step in steps:
            await step()
            for path, query in ((DM, None), (CHAT, LAST)):
                expected = await rest.get(path, query=query)
                await _converged(sdk, ours, path, expected, name)
                got = {
                    "sdk": sdk_events(sdk, path)[marks[path]["sdk"] :],
                    "wire": ours["wire"][path].events[marks[path]["wire"] :],
                    "rest": ours["rest"][path].events[marks[path]["rest"] :],
                }
                for who in got:
                    marks[path][who] += len(got[who])
                assert sorted(got["wire"]) == sorted(got["sdk"]), f"{name} at {path}: wire {got}"
                assert sorted(got["rest"]) == sorted(got["sdk"]), f"{name} at {path}: rest {got}"
        total = sum(len(sdk_events(sdk, path)) for path in (DM, CHAT))
        assert total >= 30  # the steps above did produce events
    finally:
        for stream in streams:
            await stream.close()
        await sdk.stop()
        await wire.aclose()
        await rest.aclose()


async def _nothing() -> None:
    return None


async def _both(*writes: Awaitable[Any]) -> None:
    for write in writes:
        await write


async def _cut(standin: RtdbStandin, rest: RtdbClient) -> None:
    """Every stream and socket dropped; a message written before they are back."""
    await standin.drop()
    await rest.set(f"{CHAT}/-z", {"n": 26})


async def _converged(
    sdk: Sdk, ours: dict[str, dict[str, Recorder]], path: str, expected: Any, step: str
) -> None:
    def done() -> bool:
        return sdk.value(path) == expected and all(ours[who][path].tree == expected for who in ours)

    try:
        await sdk.wait(done, timeout=30)
    except TimeoutError:
        trees = {who: ours[who][path].tree for who in ours}
        raise AssertionError(
            f"{step}: {path} expected {expected}, sdk {sdk.value(path)}, ours {trees}"
        ) from None
    await asyncio.sleep(0.1)  # anything after convergence would be an extra event: give it a moment
