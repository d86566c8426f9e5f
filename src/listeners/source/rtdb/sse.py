"""Server-sent events (EventSource): an incremental parser with a bound on one event's size."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_MAX_EVENT_BYTES = 32 * 1024 * 1024
_LINE_END = re.compile(rb"[\r\n]")
_BOM = b"\xef\xbb\xbf"


class EventTooLarge(Exception):
    """One server-sent event is larger than the configured bound."""


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    data: str


class SseParser:
    """Incremental EventSource parser: bytes in, complete events out.

    Lines may end in CRLF, LF or CR, and may be split anywhere between chunks. Memory is
    bounded: the fields of the event being read plus the unterminated line never exceed
    `max_event_bytes`, else `EventTooLarge`.
    """

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._buffer = bytearray()
        self._scanned = 0  # no line end in the buffer before this index
        self._started = False
        self._event = ""
        self._data: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[SseEvent]:
        buffer = self._buffer
        buffer += chunk
        if not self._started:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                return []
            self._started = True
            if buffer.startswith(_BOM):
                del buffer[: len(_BOM)]
        events: list[SseEvent] = []
        start = 0
        while True:
            match = _LINE_END.search(buffer, max(start, self._scanned))
            if match is None:
                self._scanned = len(buffer)
                break
            end = match.start()
            if buffer[end] == 0x0D:
                if end + 1 == len(buffer):  # CR last: wait for the next chunk to see if LF follows
                    self._scanned = end
                    break
                following = end + 2 if buffer[end + 1] == 0x0A else end + 1
            else:
                following = end + 1
            self._line(bytes(buffer[start:end]), events)
            start = following
        del buffer[:start]
        self._scanned = max(0, self._scanned - start)
        if self._size + len(buffer) > self.max_event_bytes:
            raise EventTooLarge(f"a server-sent event is larger than {self.max_event_bytes} bytes")
        return events

    def _line(self, line: bytes, events: list[SseEvent]) -> None:
        if not line:
            if self._data or self._event:
                data = b"\n".join(self._data).decode("utf-8", errors="replace")
                events.append(SseEvent(self._event or "message", data))
            self._event, self._data, self._size = "", [], 0
            return
        if line.startswith(b":"):  # a comment
            return
        self._size += len(line) + 1
        if self._size > self.max_event_bytes:
            raise EventTooLarge(f"a server-sent event is larger than {self.max_event_bytes} bytes")
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"event":
            self._event = value.decode("utf-8", errors="replace")
        elif name == b"data":
            self._data.append(value)
        # `id` and `retry` carry nothing in this protocol
