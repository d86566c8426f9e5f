"""Revoked ID tokens (deliver.revocation, LISTENERS_TOKEN_CHECK_REVOKED) against a local
stand-in of the Identity Toolkit's `accounts:lookup`: at connect, at `auth.refresh`, cached
per uid, failing closed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect

from listeners.config import Settings
from listeners.deliver.revocation import LOOKUP_UNAVAILABLE, TOKEN_REVOKED, RevocationCheck
from listeners.deliver.tokens import TokenRejected
from listeners_testkit.auth import LocalIssuer
from listeners_testkit.identity_toolkit import IdentityToolkit
from tests.test_websocket import closed_with, next_event, serving, ws_settings

pytestmark = pytest.mark.asyncio


@pytest.fixture
def toolkit() -> Iterator[tuple[IdentityToolkit, str]]:
    standin = IdentityToolkit()
    url = standin.serve()
    yield standin, url
    standin.close()


async def test_lookups_decide_and_are_cached_per_uid(toolkit: tuple[IdentityToolkit, str]) -> None:
    standin, url = toolkit
    now = time.time()
    standin.add("ann", valid_since=now - 100)
    standin.add("bob", valid_since=now - 100)
    standin.revoke("bob", at=now - 10)
    standin.add("cat", disabled=True)
    check = RevocationCheck("p", base_url=url, ttl_seconds=300)
    try:
        await asyncio.gather(*(check.check("ann", now - 50) for _ in range(5)))  # one lookup shared
        assert standin.lookups == 1
        await check.check("ann", now)  # cached
        assert standin.lookups == 1
        await check.check("bob", now - 5)  # issued after the revocation
        for uid, issued in (("bob", now - 50), ("cat", now), ("nobody", now)):
            with pytest.raises(TokenRejected) as refused:
                await check.check(uid, issued)
            assert refused.value.code == TOKEN_REVOKED, uid
        standin.fail = True
        with pytest.raises(TokenRejected) as unavailable:
            await check.check("dan", now)
        assert unavailable.value.code == LOOKUP_UNAVAILABLE  # fail closed, try again later
        await check.check("ann", now)  # still cached
    finally:
        await check.aclose()


async def test_revoked_tokens_close_at_connect_and_at_refresh(
    settings: Settings, issuer: LocalIssuer, issuer_and_url: Any, toolkit: tuple[IdentityToolkit, str]
) -> None:
    standin, url = toolkit
    checked = ws_settings(
        settings, issuer_and_url[1], check_revoked=True, revocation_url=url, revocation_ttl_seconds=1
    )
    now = int(time.time())
    standin.add("ann", valid_since=now - 1000)
    standin.revoke("bob", at=now + 5)  # every token of bob's issued until now + 5 s
    async with serving(checked) as (ws_url, _):
        async with connect(f"{ws_url}?token={issuer.mint('bob')}") as bob:
            assert await closed_with(bob) == TOKEN_REVOKED
        async with connect(f"{ws_url}?token={issuer.mint('ann')}") as ann:
            await next_event(ann, "auth.ok")
            standin.revoke("ann", at=now - 10)  # tokens issued before now - 10 s are revoked
            await ann.send(json.dumps({"type": "auth.refresh", "token": issuer.mint("ann")}))
            await next_event(ann, "auth.ok")  # a token issued after the revocation is fine
            await asyncio.sleep(1.5)  # past the cache's TTL (1 s)
            stale = issuer.mint("ann", iat=now - 100, auth_time=now - 100)
            await ann.send(json.dumps({"type": "auth.refresh", "token": stale}))
            assert await closed_with(ann) == TOKEN_REVOKED


async def test_a_malformed_valid_since_fails_closed_and_is_not_cached(
    toolkit: tuple[IdentityToolkit, str],
) -> None:
    standin, url = toolkit
    check = RevocationCheck("p", base_url=url, ttl_seconds=300)
    try:
        for i, value in enumerate(("nan", [1], "-5", True, "soon")):
            standin.users[f"u{i}"] = {"localId": f"u{i}", "validSince": value}
            with pytest.raises(TokenRejected) as refused:
                await check.check(f"u{i}", time.time())
            assert refused.value.code == LOOKUP_UNAVAILABLE, value
        standin.add("u0")  # repaired: asked again, not answered from a cache
        await check.check("u0", time.time())
    finally:
        await check.aclose()


async def test_a_failing_token_provider_refuses_with_try_again_later(
    toolkit: tuple[IdentityToolkit, str],
) -> None:
    _, url = toolkit

    async def broken() -> str:
        raise RuntimeError("metadata server unreachable")

    check = RevocationCheck("p", base_url=url, access_token=broken)
    try:
        with pytest.raises(TokenRejected) as refused:
            await check.check("ann", time.time())
        assert refused.value.code == LOOKUP_UNAVAILABLE
    finally:
        await check.aclose()


async def test_a_cancelled_lookup_is_not_passed_on_to_the_sockets_sharing_it(
    toolkit: tuple[IdentityToolkit, str],
) -> None:
    standin, url = toolkit
    standin.add("ann")
    asked, release = asyncio.Event(), asyncio.Event()

    async def slow_token() -> str:
        asked.set()
        await release.wait()
        return "token"

    check = RevocationCheck("p", base_url=url, access_token=slow_token)
    try:
        first = asyncio.create_task(check.check("ann", time.time()))  # its lookup is shared
        await asyncio.sleep(0)
        await asked.wait()
        second = asyncio.create_task(check.check("ann", time.time()))
        await asyncio.sleep(0)
        first.cancel()  # as its socket's auth timeout does
        with pytest.raises(TokenRejected) as refused:
            await second
        assert refused.value.code == LOOKUP_UNAVAILABLE
        assert first.cancelled()
    finally:
        release.set()
        await check.aclose()
