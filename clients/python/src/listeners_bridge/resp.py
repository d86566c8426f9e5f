"""RESP on a raw connection: what a Pub/Sub reader needs, many replies per read.

redis-py's `PubSub.get_message` reads one message per call, each with its own timeout, retry
wrapper and push parsing: at 5,000 events a second it was a third of a saturated worker, and
a reader that falls 32 MB behind is cut by Redis (`client-output-buffer-limit pubsub`). Here
one `read` takes whatever the socket holds (up to `READ_BYTES`) and every complete reply in
it is parsed at once, by hiredis when it is installed (the lock pins it), else by the small
parser below. redis-py still makes the connection (TLS, AUTH, SELECT; HELLO 3 by default
from redis-py 8, so pub/sub messages come as RESP3 pushes): only the bytes that follow are
ours.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

READ_BYTES = 1 << 18  # 256 KiB a read: ~350 events of 700 bytes, a few ms of a busy channel


class ReplyError(Exception):
    """An error reply from Redis (`-ERR …`, `-NOPERM …`)."""


class Parser(Protocol):
    def feed(self, data: bytes) -> None: ...

    def gets(self) -> Any: ...  # a reply, or False while incomplete


class PyParser:
    """RESP replies from fed bytes: simple strings (bytes), errors (`ReplyError` instances),
    integers, bulk strings (bytes or None), arrays and RESP3 pushes (lists), RESP3 nulls. As
    hiredis.Reader: False while the next reply is incomplete."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0

    def feed(self, data: bytes) -> None:
        if self._start:
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    def gets(self) -> Any:
        parsed = self._parse(self._start)
        if parsed is None:
            return False
        reply, self._start = parsed
        return reply

    def _parse(self, at: int) -> tuple[Any, int] | None:
        buffer = self._buffer
        end = buffer.find(b"\r\n", at)
        if end < 0:
            return None
        kind, line, after = bytes(buffer[at : at + 1]), bytes(buffer[at + 1 : end]), end + 2
        if kind == b"+":
            return line, after
        if kind == b"-":
            return ReplyError(line.decode("utf-8", "replace")), after
        if kind == b":":
            return int(line), after
        if kind == b"$":
            size = int(line)
            if size < 0:
                return None, after
            if len(buffer) < after + size + 2:
                return None
            return bytes(buffer[after : after + size]), after + size + 2
        if kind == b"_":  # RESP3 null
            return None, after
        if kind in (b"*", b">"):  # an array, or a RESP3 push (what pub/sub sends after HELLO 3)
            count = int(line)
            if count < 0:
                return None, after
            items: list[Any] = []
            for _ in range(count):
                parsed = self._parse(after)
                if parsed is None:
                    return None
                item, after = parsed
                items.append(item)
            return items, after
        raise ValueError(f"unexpected RESP type {kind!r}")  # unusable: the caller reconnects


def parser() -> Parser:
    try:
        import hiredis
    except ImportError:  # redis-py without hiredis (bench.websocket --no-hiredis)
        return PyParser()
    return hiredis.Reader(replyError=ReplyError)


def command(*parts: bytes) -> bytes:
    """One command in RESP2, as Redis reads it."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n" % len(part))
        out.append(part)
        out.append(b"\r\n")
    return b"".join(out)


class Wire:
    """A connection in subscribed mode: commands written without waiting for their replies,
    replies read in bulk. `send` never raises; a closed connection shows in `read`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = parser()

    def send(self, *parts: bytes) -> None:
        if not self._writer.is_closing():  # else the read loop notices, and all is sent again
            self._writer.write(command(*parts))

    async def read(self, timeout: float) -> list[Any]:
        """Every complete reply that arrived within `timeout` (none: an empty list);
        ConnectionError once Redis has closed the connection."""
        replies = self._complete()
        if replies:
            return replies
        try:
            async with asyncio.timeout(timeout):
                data = await self._reader.read(READ_BYTES)
        except TimeoutError:
            return []
        if not data:
            raise ConnectionError("Connection closed by server.")
        self._parser.feed(data)
        return self._complete()

    def _complete(self) -> list[Any]:
        replies = []
        gets = self._parser.gets
        while (reply := gets()) is not False:
            replies.append(reply)
        return replies
