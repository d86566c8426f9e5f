"""Log lines never carry a secret, nor a token that came in a URL, and every line is valid
JSON: unit checks of the formatter, and uvicorn's own access lines over a real socket."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from websockets.asyncio.client import connect

from listeners import logs
from listeners_testkit.processes import free_port
from tests.conftest import wait_until
from tests.test_config import ADMIN, PRIVATE_KEY

# What a password may hold: quotes, backslashes, a newline; each is escaped in JSON text.
NASTY = 'pa"ss\\word-with-quote\nand-second-line'
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"


def line(message: str, **extra: object) -> str:
    record = logging.makeLogRecord({"msg": message, "levelname": "INFO", "name": "t", **extra})
    return logs.JsonFormatter().format(record)


def strings(value: Any) -> Iterator[str]:
    """Every string of a parsed JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def assert_hidden(text: str, *secrets: str) -> None:
    """`text` is one JSON object, and no secret shows, neither in its text nor in its values."""
    entry = json.loads(text)
    assert isinstance(entry, dict)
    for secret in secrets:
        escaped = json.dumps(secret)[1:-1]
        assert secret not in text and escaped not in text, secret
        assert all(secret not in s for s in strings(entry)), secret


def test_tokens_in_urls_are_masked() -> None:
    text = line('127.0.0.1:5 - "WebSocket /ws?token=eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl&v=1" [accepted]')
    assert "eyJ" not in text and "token=***&v=1" in json.loads(text)["message"]


def test_token_as_the_last_query_parameter_keeps_the_line_valid() -> None:
    # uvicorn's access line: the token is followed by the closing quote of the request line.
    text = line('%s - "%s %s HTTP/%s" %d', args=("127.0.0.1:5", "GET", f"/ws?v=1&token={JWT}", "1.1", 101))
    assert json.loads(text)["message"] == '127.0.0.1:5 - "GET /ws?v=1&token=*** HTTP/1.1" 101'
    text = line(f'127.0.0.1:5 - "WebSocket /ws?access_token={JWT}" [accepted]')
    assert json.loads(text)["message"] == '127.0.0.1:5 - "WebSocket /ws?access_token=***" [accepted]'


def test_registered_secrets_are_masked_everywhere() -> None:
    logs.register_secret("a-password-to-hide\nsecond-line-of-key")
    text = line("connect failed: a-password-to-hide", reason="second-line-of-key")
    assert "a-password-to-hide" not in text and "second-line-of-key" not in text


def test_secrets_with_quotes_backslashes_and_newlines() -> None:
    logs.register_secret(NASTY)
    lines = [
        line(f"auth failed for {NASTY}"),
        line("auth failed", reason=f"server said {NASTY!r}"),  # a repr escapes them too
        line("auth failed", detail={"password": NASTY, "nested": [NASTY]}),
        line("auth failed", reason=json.dumps({"password": NASTY})),  # JSON text inside a field
    ]
    try:
        raise ValueError(f"bad password {NASTY}")
    except ValueError:
        record = logging.makeLogRecord({"msg": "oops", "levelname": "ERROR", "name": "t"})
        record.exc_info = sys.exc_info()
        lines.append(logs.JsonFormatter().format(record))
    for text in lines:
        assert_hidden(text, NASTY, *NASTY.splitlines())
    assert json.loads(lines[-1])["error"].startswith("ValueError: bad password ")


def test_the_service_account_private_key_raw_and_escaped() -> None:
    logs.register_secret(json.dumps(ADMIN))  # what app.main registers: the whole JSON text
    key_body = PRIVATE_KEY.splitlines()[1]
    for text in (
        line(f"cannot sign with {PRIVATE_KEY}"),  # the key itself, real newlines
        line(f"bad credentials: {json.dumps(ADMIN)}"),  # the JSON text: newlines as \n
        line("bad credentials", reason=json.dumps({"private_key": ADMIN["private_key"]}, indent=2)),
        line(f"key line {key_body}"),
    ):
        assert_hidden(text, PRIVATE_KEY, json.dumps(PRIVATE_KEY)[1:-1], key_body)


def test_every_value_becomes_valid_json() -> None:
    class Odd:
        def __str__(self) -> str:
            return f"odd {JWT} token={JWT}"

    text = line("surrogate \udcff and nan", number=float("nan"), thing=Odd(), items=(1, {2: "x"}))
    entry = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert entry["thing"] == "odd " + JWT + " token=***"  # only the URL form is a known token
    assert entry["items"] == [1, {"2": "x"}] and entry["number"] is None


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The service's logging set-up (logs.configure) for one test, writing to a buffer
    instead of stdout; the previous set-up is restored afterwards."""
    root = logging.getLogger()
    names = ("uvicorn", "uvicorn.error", "uvicorn.access")
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).__dict__.copy() for n in names})
    logs.configure("INFO")
    buffer = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler) and isinstance(handler.formatter, logs.JsonFormatter)
    handler.setStream(buffer)
    root.handlers.extend(h for h in saved[0] if h not in root.handlers)  # pytest's own capture
    yield buffer
    root.handlers[:], root.level = saved[0], saved[1]
    for name, state in saved[2].items():
        logging.getLogger(name).__dict__.update(state)


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    elif scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})


@pytest.mark.asyncio
async def test_uvicorn_access_lines_over_the_wire(json_lines: io.StringIO) -> None:
    logs.register_secret(NASTY)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(asgi, host="127.0.0.1", port=port, log_config=None, lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started)
    try:
        async with httpx.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{port}/healthz?v=1&token={JWT}")
            await client.get(f"http://127.0.0.1:{port}/x?access_token={JWT}")
        async with connect(f"ws://127.0.0.1:{port}/ws?token={JWT}") as ws:
            await ws.wait_closed()
        logging.getLogger("listeners.test").warning("login refused: %s", NASTY, extra={"reason": NASTY})
    finally:
        server.should_exit = True
        await task
    output = json_lines.getvalue().splitlines()
    assert output, "no log line"
    for text in output:
        assert_hidden(text, JWT, NASTY, *NASTY.splitlines())
    messages = [json.loads(text)["message"] for text in output]
    assert any(m.endswith('"GET /healthz?v=1&token=*** HTTP/1.1" 204') for m in messages), messages
    assert any(m.endswith('"GET /x?access_token=*** HTTP/1.1" 204') for m in messages), messages
    assert any('"WebSocket /ws?token=***"' in m for m in messages), messages
