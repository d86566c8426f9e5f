"""The stand-in's WebSocket (the Firebase wire protocol) against the official JS SDK.

`@firebase/database` (pinned in package-lock.json) runs in Node (`tests/rtdb_sdk_driver.mjs`)
against the stand-in, which shares its data with the REST side: writes made over REST reach
the SDK's listens and the SDK's writes reach REST reads. Listens, child events, a limitToLast
window that a child leaves, a dropped connection, a token refreshed on the open connection and
a revoked one all go through the SDK's own code.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from listeners.source.rtdb import RtdbClient
from listeners_testkit.rtdb_server import RtdbStandin
from tests.rtdb_sdk import Sdk, needs_sdk

pytestmark = needs_sdk

TOKEN = "standin-token-1"


@pytest.fixture(scope="module")
def standin() -> Iterator[RtdbStandin]:
    with RtdbStandin(keepalive=5.0, token=TOKEN) as server:
        yield server


@pytest.fixture
def ns() -> str:
    return f"sdk-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def rest(standin: RtdbStandin, ns: str) -> AsyncIterator[RtdbClient]:
    async def token(*, refresh: bool = False) -> str:
        return standin.token or TOKEN

    client = RtdbClient(standin.url, namespace=ns, tokens=token)
    yield client
    await client.aclose()


@pytest.fixture
async def sdk(standin: RtdbStandin, ns: str) -> AsyncIterator[Sdk]:
    app = await Sdk(f"{standin.url}?ns={ns}", TOKEN).start()
    yield app
    await app.stop()


def children(sdk: Sdk, listen_id: str) -> list[tuple[str, str, Any]]:
    return [(e["ev"], e["key"], e["value"]) for e in sdk.events if e.get("id") == listen_id and "key" in e]


async def test_listen_sees_rest_writes_and_rest_sees_sdk_writes(
    sdk: Sdk, rest: RtdbClient, standin: RtdbStandin, ns: str
) -> None:
    await rest.set("clients/u1/direct_message_notif", {"m1": {"text": "one"}})
    await sdk.call("listen", id="dm", path="clients/u1/direct_message_notif")
    await sdk.wait(lambda: sdk.value("dm") == {"m1": {"text": "one"}})
    assert sdk.connected()

    await rest.push("clients/u1/direct_message_notif", {"text": "two"})
    await rest.update("clients/u1/direct_message_notif/m1", {"text": "one, edited"})
    await rest.delete("clients/u1/direct_message_notif/m1")
    await sdk.wait(lambda: len(children(sdk, "dm")) == 4)
    seen = children(sdk, "dm")
    assert seen[0] == ("added", "m1", {"text": "one"})
    assert seen[1][0] == "added" and seen[1][2] == {"text": "two"}
    assert seen[2:] == [
        ("changed", "m1", {"text": "one, edited"}),
        ("removed", "m1", {"text": "one, edited"}),
    ]

    # a write over the wire lands in the shared store: REST reads it back
    await sdk.call("set", path="clients/u1/direct_message_notif/m3", value={"text": "three"})
    await sdk.call("update", path="clients/u1/direct_message_notif/m3", value={"read": True})
    assert await rest.get("clients/u1/direct_message_notif/m3") == {"text": "three", "read": True}
    stats = await standin.wire(ns)
    assert stats["connections"] == 1 and stats["listens"] == 1


async def test_limit_to_last_window(sdk: Sdk, rest: RtdbClient) -> None:
    path = "S1/chats/t1/messages"
    await rest.set(path, {"k1": {"n": 1}, "k2": {"n": 2}, "k3": {"n": 3}})
    await sdk.call("listen", id="chat", path=path, last=2)
    await sdk.wait(lambda: sdk.value("chat") == {"k2": {"n": 2}, "k3": {"n": 3}})

    await rest.set(f"{path}/k4", {"n": 4})  # k2 leaves the window
    await sdk.wait(lambda: sdk.value("chat") == {"k3": {"n": 3}, "k4": {"n": 4}})
    await rest.delete(f"{path}/k4")  # k2 comes back into it
    await sdk.wait(lambda: sdk.value("chat") == {"k2": {"n": 2}, "k3": {"n": 3}})
    await rest.set(f"{path}/k0", {"n": 0})  # before the window: nothing
    await rest.update(f"{path}/k3", {"n": 33})
    await sdk.wait(lambda: sdk.value("chat") == {"k2": {"n": 2}, "k3": {"n": 33}})
    assert children(sdk, "chat") == [
        ("added", "k2", {"n": 2}),
        ("added", "k3", {"n": 3}),
        ("removed", "k2", {"n": 2}),
        ("added", "k4", {"n": 4}),
        ("removed", "k4", {"n": 4}),
        ("added", "k2", {"n": 2}),
        ("changed", "k3", {"n": 33}),
    ]


async def test_reconnect_after_a_drop(sdk: Sdk, rest: RtdbClient, standin: RtdbStandin, ns: str) -> None:
    path = "clients/u2/direct_message_notif"
    await sdk.call("listen", id="dm", path=path)
    await sdk.wait(sdk.connected)
    await sdk.wait(lambda: len(sdk.of("value", "dm")) == 1)
    connects = (await standin.wire())["connects"]

    await standin.drop()
    await sdk.wait(lambda: not sdk.connected())
    await rest.set(f"{path}/m1", {"text": "while away"})  # written while the SDK is reconnecting
    await sdk.wait(sdk.connected)
    await sdk.wait(lambda: sdk.value("dm") == {"m1": {"text": "while away"}})
    assert (await standin.wire())["connects"] > connects
    assert (await standin.wire(ns))["listens"] == 1  # listened again on the new connection

    await rest.set(f"{path}/m2", {"text": "after"})
    await sdk.wait(lambda: sdk.value("dm") == {"m1": {"text": "while away"}, "m2": {"text": "after"}})


async def wire_cred(standin: RtdbStandin, token: str, timeout: float = 30.0) -> dict[str, Any]:
    """The stand-in's counters once `token` is the last credential it accepted."""
    async with asyncio.timeout(timeout):
        while True:
            stats = await standin.wire()
            if stats["creds"] and stats["creds"][-1] == token:
                return stats
            await asyncio.sleep(0.05)


async def test_token_refresh_on_the_open_connection_then_a_revocation(ns: str) -> None:
    with RtdbStandin(token=TOKEN) as standin:  # its own: the revocation changes the token
        sdk = await Sdk(f"{standin.url}?ns={ns}", TOKEN).start()
        rest = RtdbClient(standin.url, namespace=ns, tokens=lambda refresh=False: _const(standin))
        try:
            path = "clients/u3/direct_message_notif"
            await sdk.call("listen", id="dm", path=path)
            await sdk.wait(lambda: len(sdk.of("value", "dm")) == 1)
            before = await wire_cred(standin, TOKEN)

            # Auth announces a new token: the SDK authenticates again on the same connection
            await standin.wire_accept("standin-token-2")
            await sdk.call("token", token="standin-token-2")
            stats = await wire_cred(standin, "standin-token-2")
            assert stats["connects"] == before["connects"]  # no new connection for a refresh

            # the server revokes the credential (`ac`) and wants token 3 from now on: the SDK
            # closes, asks Auth for a forced refresh, is refused until Auth has token 3, then
            # listens again
            await standin.revoke("standin-token-3")
            await sdk.wait(lambda: any(e["force"] for e in sdk.of("getToken")))
            await sdk.call("token", token="standin-token-3")
            await rest.set(f"{path}/m1", {"text": "after the revocation"})
            await sdk.wait(lambda: sdk.value("dm") == {"m1": {"text": "after the revocation"}}, timeout=60)
            stats = await wire_cred(standin, "standin-token-3")
            assert stats["connects"] > before["connects"]
        finally:
            await sdk.stop()
            await rest.aclose()


async def _const(standin: RtdbStandin) -> str:
    return standin.token or TOKEN
