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
