"""Cheap refusals before the WebSocket handshake (deliver.admission, issue 28), over the wire:
raw HTTP upgrade requests against the served app, answered 401/429/503 with no
`Sec-WebSocket-Accept` (and no deflate), per client address as `X-Forwarded-For` names it
behind a trusted proxy, and a forged header that does not help."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import os
import urllib.parse
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from listeners.config import Settings, WebSocketSettings
from listeners.deliver.admission import Admission, Refusal, Ticket
from listeners.deliver.clients import client_address, networks
from listeners.deliver.httpprotocol import GuardedHttpProtocol
from listeners.deliver.wsprotocol import DirectWebSocketProtocol
from listeners.metrics import Metrics
from listeners_testkit.auth import LocalIssuer
from tests.conftest import wait_until
from tests.test_websocket import serving, ws_settings

pytestmark = pytest.mark.asyncio

PROXY = "127.0.0.0/8"  # the tests' "ALB": the peer address of every connection here
# Where the refusal is made: in deliver.wsprotocol (UVICORN_WS alone), or already in
# deliver.httpprotocol (UVICORN_HTTP too), before any WebSocket protocol object.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "direct": {"ws": DirectWebSocketProtocol},
    "guarded": {"ws": DirectWebSocketProtocol, "http": GuardedHttpProtocol},
}


class Answer:
    def __init__(self, status: int, headers: dict[str, str], writer: asyncio.StreamWriter) -> None:
        self.status = status
        self.headers = headers
        self.writer = writer


async def send_upgrade(
    url: str, *headers: str, query: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw upgrade request (deflate offered), sent; its answer not read yet."""
    parts = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {parts.path}{'?' + query if query else ''} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        *headers,
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    return reader, writer


@contextlib.asynccontextmanager
async def upgrade(url: str, *headers: str, query: str = "") -> AsyncIterator[Answer]:
    """A raw upgrade request and its answer; the connection stays open until the block ends."""
    reader, writer = await send_upgrade(url, *headers, query=query)
    try:
        async with asyncio.timeout(30):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *header_lines = head.strip().split("\r\n")
        fields = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        yield Answer(int(status_line.split()[1]), fields, writer)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def refused(answer: Answer, status: int) -> None:
    assert answer.status == status, (answer.status, answer.headers)
    assert "sec-websocket-accept" not in answer.headers
    assert "sec-websocket-extensions" not in answer.headers  # no deflate set up
    if status != 401:
        assert int(answer.headers["retry-after"]) >= 1


def refusals(app: Any, reason: str) -> float:
    metrics: Metrics = app.state.service.metrics
    return metrics.registry.get_sample_value("listeners_ws_refusals_total", {"reason": reason}) or 0.0


def settings_with(settings: Settings, certs_url: str, **overrides: Any) -> Settings:
    return ws_settings(settings, certs_url, **overrides)


@pytest.mark.parametrize("protocol", ["direct", "guarded", "uvicorn"])
async def test_no_token_is_401_before_the_upgrade(
    settings: Settings, issuer: LocalIssuer, issuer_and_url: Any, protocol: str
) -> None:
    """deliver.httpprotocol and deliver.wsprotocol refuse in the protocol; uvicorn's own
    through the ASGI extension."""
    options: dict[str, Any] = PROTOCOLS.get(protocol, {})
    async with serving(settings_with(settings, issuer_and_url[1]), **options) as (url, app):
        gateway = app.state.gateway
        async with upgrade(url) as answer:
            refused(answer, 401)
        async with upgrade(url, query="token=") as answer:  # an empty token is none
            refused(answer, 401)
        async with upgrade(url, "Sec-WebSocket-Protocol: bearer, " + issuer.mint("ann")) as answer:
            assert answer.status == 101
            await wait_until(lambda: gateway.authenticated == 1)
        assert refusals(app, "no_token") == 2
        assert gateway.admission.pending == 0


async def test_first_message_auth_is_per_origin(
    settings: Settings, issuer: LocalIssuer, issuer_and_url: Any
) -> None:
    opted = settings_with(settings, issuer_and_url[1], first_message_auth_origins=("https://app.example",))
    async with serving(dataclass_origins(opted), ws=DirectWebSocketProtocol) as (url, app):
        async with upgrade(url, "Origin: https://app.example") as answer:
            assert answer.status == 101
        async with upgrade(url, "Origin: https://other.example") as answer:
            refused(answer, 401)
        async with upgrade(url) as answer:  # no Origin: not a listed origin either
            refused(answer, 401)
        await wait_until(lambda: app.state.gateway.admission.pending == 0)


def dataclass_origins(settings: Settings) -> Settings:
    """Both origins pass the Origin check; only one may authenticate by a first message."""
    origins = ("https://app.example", "https://other.example")
    return dataclasses.replace(
        settings, service=dataclasses.replace(settings.service, allowed_origins=origins)
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_handshake_rate_per_address_behind_a_trusted_proxy(
    settings: Settings, issuer_and_url: Any, protocol: str
) -> None:
    limited = settings_with(
        settings, issuer_and_url[1], handshake_burst_per_address=2, handshakes_per_second_per_address=0.1,
        trusted_proxy_cidrs=(PROXY,),
    )  # fmt: skip
    async with serving(limited, **PROTOCOLS[protocol]) as (url, app):
        attacker = "X-Forwarded-For: 203.0.113.7"
        for _ in range(2):  # the burst: past the rate, refused for want of a token
            async with upgrade(url, attacker) as answer:
                refused(answer, 401)
        async with upgrade(url, attacker) as answer:
            refused(answer, 429)
        # A forged left part changes nothing: the proxy's hop is the right-most one.
        async with upgrade(url, "X-Forwarded-For: 198.51.100.1, 203.0.113.7") as answer:
            refused(answer, 429)
        # Another caller behind the same proxy has a budget of its own.
        async with upgrade(url, "X-Forwarded-For: 203.0.113.8") as answer:
            refused(answer, 401)
        assert refusals(app, "rate") == 2


async def test_forwarded_for_is_ignored_without_trusted_proxies(
    settings: Settings, issuer_and_url: Any
) -> None:
    limited = settings_with(
        settings, issuer_and_url[1], handshake_burst_per_address=2, handshakes_per_second_per_address=0.1
    )
    async with serving(limited, ws=DirectWebSocketProtocol) as (url, app):
        for n in range(2):
            async with upgrade(url, f"X-Forwarded-For: 203.0.113.{n}") as answer:
                refused(answer, 401)
        async with upgrade(url, "X-Forwarded-For: 203.0.113.99") as answer:  # still 127.0.0.1
            refused(answer, 429)
        assert refusals(app, "rate") == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_unauthenticated_sockets_per_address(
    settings: Settings, issuer_and_url: Any, protocol: str
) -> None:
    limited = settings_with(
        settings, issuer_and_url[1], max_unauthenticated_per_address=1, first_message_auth_origins=("*",),
        unauthenticated_timeout_seconds=60, auth_timeout_seconds=60, trusted_proxy_cidrs=(PROXY,),
    )  # fmt: skip
    async with serving(limited, **PROTOCOLS[protocol]) as (url, app):
        gateway = app.state.gateway
        async with upgrade(url, "X-Forwarded-For: 203.0.113.7") as silent:
            assert silent.status == 101
            await wait_until(lambda: gateway.unauthenticated == 1)
            async with upgrade(url, "X-Forwarded-For: 203.0.113.7") as answer:
                refused(answer, 429)
            async with upgrade(url, "X-Forwarded-For: 10.9.9.9, 203.0.113.7") as answer:  # forged
                refused(answer, 429)
            async with upgrade(url, "X-Forwarded-For: 203.0.113.8") as other:
                assert other.status == 101
        # the silent socket's place is given back when its connection ends
        await wait_until(lambda: gateway.admission.pending == 0 and gateway.unauthenticated == 0)
        async with upgrade(url, "X-Forwarded-For: 203.0.113.7") as again:
            assert again.status == 101
        assert refusals(app, "address_unauthenticated") == 2


async def test_client_address_is_the_right_most_untrusted_hop() -> None:
    alb = networks(["10.0.0.0/16"])
    assert client_address("10.0.3.4", "198.51.100.9", alb) == "198.51.100.9"
    assert client_address("10.0.3.4", "1.2.3.4, 198.51.100.9", alb) == "198.51.100.9"
    assert client_address("10.0.3.4", "198.51.100.9, 10.0.1.1", alb) == "198.51.100.9"
    assert client_address("10.0.3.4", "10.0.1.1", alb) == "10.0.1.1"  # every hop ours
    assert client_address("198.51.100.9", "1.2.3.4", alb) == "198.51.100.9"  # peer not a proxy
    assert client_address("10.0.3.4", "garbage", alb) == "invalid:garbage"
    assert client_address("10.0.3.4", None, alb) == "10.0.3.4"
    assert client_address("2001:db8::1", None, ()) == "2001:db8::/64"
    assert client_address("::ffff:192.0.2.1", None, ()) == "192.0.2.1"
    assert client_address("10.0.3.4", "[2001:db8::5]:443", alb) == "2001:db8::/64"


async def test_the_bound_on_addresses_holds_while_the_oldest_have_sockets_authenticating() -> None:
    """64 (the eviction scan) of the oldest addresses hold a ticket, then a flood of new ones:
    the table stays at its bound, and the held tickets still release cleanly."""
    settings = WebSocketSettings(tracked_addresses=100, max_unauthenticated_sockets=1000)
    admission = Admission(settings, SimpleNamespace(closing=False, authenticated=0))
    held = [admission.admit(f"192.0.2.{i}", None, None, True) for i in range(64)]
    assert all(isinstance(ticket, Ticket) for ticket in held)
    for i in range(5000):
        ticket = admission.admit(f"2001:db8:{i:x}::1", None, None, True)
        assert isinstance(ticket, Ticket)
        ticket.release()
    assert admission.tracked <= 100
    for ticket in held:
        assert isinstance(ticket, Ticket)
        ticket.release()
    assert admission.pending == 0


async def test_addresses_remembered_are_bounded_and_tickets_release_once() -> None:
    settings = WebSocketSettings(tracked_addresses=100, max_unauthenticated_per_address=1)
    admission = Admission(settings, SimpleNamespace(closing=False, authenticated=0))
    for i in range(1000):
        ticket = admission.admit(f"198.51.{i // 256}.{i % 256}", None, None, True)
        assert isinstance(ticket, Ticket)
        ticket.release()
        ticket.release()  # idempotent: the gateway and the protocol may both release it
    assert admission.tracked <= 100 and admission.pending == 0
    held = admission.admit("203.0.113.1", None, None, True)
    refusal = admission.admit("203.0.113.1", None, None, True)
    assert isinstance(held, Ticket) and isinstance(refusal, Refusal)
    assert (refusal.status, refusal.reason) == (429, "address_unauthenticated")
    held.release()
    assert isinstance(admission.admit("203.0.113.1", None, None, True), Ticket)


async def test_an_upgrade_admitted_before_the_websocket_protocol_is_charged_once(
    settings: Settings, issuer: LocalIssuer, issuer_and_url: Any
) -> None:
    """deliver.httpprotocol admits it and hands the ticket over: deliver.wsprotocol does not
    take a second handshake from the address's budget, and the ticket is given back."""
    limited = settings_with(
        settings, issuer_and_url[1], handshake_burst_per_address=2, handshakes_per_second_per_address=0.1
    )
    async with serving(limited, **PROTOCOLS["guarded"]) as (url, app):
        gateway = app.state.gateway
        async with contextlib.AsyncExitStack() as held:
            for uid in ("ann", "bob"):
                bearer = "Sec-WebSocket-Protocol: bearer, " + issuer.mint(uid)
                answer = await held.enter_async_context(upgrade(url, bearer))
                assert answer.status == 101 and "sec-websocket-accept" in answer.headers
            await wait_until(lambda: gateway.authenticated == 2)
            assert gateway.admission.pending == 0  # released once the tokens were verified
            async with upgrade(url, "Sec-WebSocket-Protocol: bearer, " + issuer.mint("cy")) as answer:
                refused(answer, 429)
        assert refusals(app, "rate") == 1


async def read_response(reader: asyncio.StreamReader) -> int:
    """One HTTP response with a Content-Length; its status."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    length = int(head.split("content-length:", 1)[1].split("\r\n", 1)[0])
    await reader.readexactly(length)
    return int(head.split()[1])


async def cut_by_the_server(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection without answering (EOF, or a reset)."""
    try:
        return await reader.read() == b""
    except ConnectionResetError:
        return True


def header_timeouts(app: Any) -> float:
    metrics: Metrics = app.state.service.metrics
    return metrics.registry.get_sample_value("listeners_http_header_timeouts_total") or 0.0


async def test_a_request_head_that_does_not_arrive_is_cut(settings: Settings, issuer_and_url: Any) -> None:
    """deliver.httpprotocol: half a request, or nothing, is not kept for ever; a whole one is
    answered; on a kept-alive connection the next request has the same deadline."""
    quick = settings_with(settings, issuer_and_url[1])
    quick = dataclasses.replace(
        quick, service=dataclasses.replace(quick.service, http_header_timeout_seconds=1.0)
    )
    async with serving(quick, **PROTOCOLS["guarded"]) as (url, app):
        port = urllib.parse.urlsplit(url).port
        opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        (half, half_writer), (silent, _), (kept, kept_writer) = opened
        try:
            half_writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ")
            kept_writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            async with asyncio.timeout(30):
                assert await read_response(kept) in (200, 503)  # answered, and kept alive
                kept_writer.write(b"GET /healthz HTTP/1.1\r\nHost: 1")
                for reader in (half, silent, kept):
                    assert await cut_by_the_server(reader)
            assert header_timeouts(app) == 3
        finally:
            for _, writer in opened:
                writer.close()


async def test_an_answer_to_a_caller_over_its_rate_is_held_back_within_bounds(
    settings: Settings, issuer_and_url: Any
) -> None:
    """deliver.httpprotocol holds a rate refusal's answer back (a caller that reconnects at
    once is slowed), at most `max_delayed_refusals` at once: past that, answered at once; a
    held place is given back when its answer goes, or when the caller leaves first."""
    limited = settings_with(
        settings, issuer_and_url[1], handshake_burst_per_address=1, handshakes_per_second_per_address=0.1,
        rate_refusal_delay_seconds=60, max_delayed_refusals=1,
    )  # fmt: skip
    async with serving(limited, **PROTOCOLS["guarded"]) as (url, app):
        admission = app.state.gateway.admission
        async with upgrade(url) as answer:  # the burst: refused for want of a token, at once
            refused(answer, 401)
        _, held_writer = await send_upgrade(url)
        await wait_until(lambda: admission.held == 1)
        async with upgrade(url) as answer:  # no place left to hold it: answered at once
            refused(answer, 429)
            assert admission.held == 1  # the first one is still waiting for its answer
        held_writer.close()  # the caller leaves: its place is given back
        await wait_until(lambda: admission.held == 0)
        still_held, still_writer = await send_upgrade(url)
        await wait_until(lambda: admission.held == 1)
        assert refusals(app, "rate") == 3
    # The server's shutdown closes a connection whose answer is held back (and did not wait for it).
    assert await cut_by_the_server(still_held)
    still_writer.close()

    soon = settings_with(
        settings, issuer_and_url[1], handshake_burst_per_address=1, handshakes_per_second_per_address=0.1,
        rate_refusal_delay_seconds=0.2,
    )  # fmt: skip
    async with serving(soon, **PROTOCOLS["guarded"]) as (url, app):
        async with upgrade(url) as answer:
            refused(answer, 401)
        async with upgrade(url) as answer:  # held back, then answered as ever
            refused(answer, 429)
            assert app.state.gateway.admission.held == 0
