"""Token verification when the certificates cannot be had, and where they may come from.

Unit checks of the verifier with a controlled clock, and over the wire: the app under
uvicorn, with its certificate URL pointed at a local server that fails on demand."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from websockets.asyncio.client import connect

from listeners.config import Settings
from listeners.deliver.tokens import CERTIFICATES_UNAVAILABLE, TokenRejected, TokenVerifier
from listeners_testkit.auth import LocalIssuer
from tests.test_websocket import closed_with, next_event, serving, ws_settings


class Certs:
    """Serves the issuer's certificate JSON, or 503 while `failing`; counts the requests."""

    def __init__(self, issuer: LocalIssuer) -> None:
        self.failing = True
        self.hits = 0
        certs = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                certs.hits += 1
                status, body = (503, b"down") if certs.failing else (200, certs.body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "public, max-age=3600")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.issuer = issuer
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/certs"

    @property
    def body(self) -> bytes:
        return json.dumps({self.issuer.kid: self.issuer.certificate_pem}).encode()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def certs(issuer: LocalIssuer) -> Iterator[Certs]:
    server = Certs(issuer)
    yield server
    server.close()


async def test_a_failed_fetch_backs_off_and_refuses_meanwhile(certs: Certs, issuer: LocalIssuer) -> None:
    verifier = TokenVerifier(issuer.project_id, certs_url=certs.url)
    token, now = issuer.mint("u1"), time.time()
    try:
        for _ in range(20):
            with pytest.raises(TokenRejected) as refused:
                await verifier.verify(token, now=now)
            assert refused.value.code == CERTIFICATES_UNAVAILABLE and "certificates" in refused.value.reason
        assert certs.hits == 1  # one fetch, then refusals from memory
        with pytest.raises(TokenRejected):
            await verifier.verify(token, now=now + 1.01)  # the first step (at most 1 s) has passed
        assert certs.hits == 2
        for _ in range(10):  # each failure doubles the wait, up to a cap
            with contextlib.suppress(TokenRejected):
                await verifier.verify(token, now=now + 1.01)
        assert certs.hits == 2
        certs.failing = False
        assert (await verifier.verify(token, now=now + 60)).uid == "u1"  # past the cap: fetched again
        assert certs.hits == 3
        assert (await verifier.verify(token, now=now + 61)).uid == "u1"  # cached now
        assert certs.hits == 3
    finally:
        await verifier.aclose()


async def test_connections_are_refused_quickly_while_certificates_are_down(
    settings: Settings, certs: Certs, issuer: LocalIssuer
) -> None:
    async with serving(ws_settings(settings, certs.url)) as (url, _):
        started = time.monotonic()
        for n in range(12):
            async with connect(f"{url}?token={issuer.mint(f'u{n}')}") as ws:
                assert await closed_with(ws) == CERTIFICATES_UNAVAILABLE
        elapsed = time.monotonic() - started
        # Not one fetch per connection: after the first failure the waits are at least 0.5 s,
        # 1 s, 2 s...: within `elapsed` seconds, at most 1 + log2(2 * elapsed + 1) fetches.
        assert certs.hits <= 1 + math.log2(2 * elapsed + 1), (certs.hits, elapsed)
        assert certs.hits < 12
        certs.failing = False
        deadline = time.monotonic() + 60  # the backoff step passes; then the next socket works
        while True:
            async with connect(f"{url}?token={issuer.mint('u9')}") as ws:
                with contextlib.suppress(Exception):
                    if (await next_event(ws, "auth.ok", timeout=5))["uid"] == "u9":
                        break
            assert time.monotonic() < deadline, "never recovered"
            await asyncio.sleep(0.5)


@pytest.mark.parametrize(
    "url",
    [
        "https://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com",
        "http://127.0.0.1:9099/certs",
        "http://127.8.9.10/certs",
        "http://localhost:8080/certs",
        "http://[::1]:8080/certs",
    ],
)
async def test_certificate_urls_that_are_allowed(url: str) -> None:
    await TokenVerifier("p", certs_url=url).aclose()


@pytest.mark.parametrize(
    "url",
    [
        "http://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com",
        "http://10.0.0.5/certs",
        "http://127.0.0.1.example.com/certs",
        "http://localhost.example.com/certs",
        "http://127.0.0.1@example.com/certs",
        "ftp://127.0.0.1/certs",
        "file:///etc/certs.json",
        "https:///certs",
        "certs.json",
    ],
)
def test_certificate_urls_that_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="https"):
        TokenVerifier("p", certs_url=url)
