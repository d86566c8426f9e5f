"""What goes wrong talking to the database: its error answers (`RtdbError`, read by
`read_error`) and what the protocol does not allow (`ProtocolError`).

A module of their own because the client and the mirrors both raise them, and the mirrors
import nothing of the client.
"""

from __future__ import annotations

import json

import httpx

_MAX_ERROR_BODY = 64 * 1024


class RtdbError(Exception):
    """The server answered with an error status; `message` is its `{"error": ...}` text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class ProtocolError(Exception):
    """The server sent something this protocol does not allow; a mirror reconnects on it."""


async def read_error(response: httpx.Response) -> RtdbError:
    """The error an unsuccessful response says: its `{"error": ...}` text, else its body (at
    most 64 KiB read), else its reason phrase."""
    body = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > _MAX_ERROR_BODY:
                break
    except (httpx.HTTPError, OSError):
        pass
    text = body[:_MAX_ERROR_BODY].decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    message = parsed["error"] if isinstance(parsed, dict) and isinstance(parsed.get("error"), str) else text
    return RtdbError(response.status_code, message or response.reason_phrase)
