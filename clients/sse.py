"""An incremental parser for Server-Sent Events (the subset a completion stream uses).

Bytes arrive in arbitrary pieces: an event, a line, a CRLF pair or a multi-byte UTF-8 character may be split
across reads. `SSEParser.feed` keeps every incomplete part until the rest arrives and returns only the data of
complete events, in order. Comment lines (": ping" keep-alives) and fields other than `data` are ignored; an
event made only of comments yields nothing. Several `data:` lines of one event are joined with "\\n". As the
SSE spec says, an event the stream ends in the middle of (before its blank line) is never dispatched.
"""

from __future__ import annotations

import codecs
import re

DONE = "[DONE]"
_LINE_END = re.compile(r"\r\n|\r|\n")


class SSEParser:
    """Turns a byte stream into the data payloads of its events. Feed bytes in the order they arrive."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        """Returns the data of every event completed by `chunk` (possibly none)."""
        self._buffer += self._decoder.decode(chunk)
        return self._drain()

    def _drain(self) -> list[str]:
        """Consumes every complete line. A trailing \\r waits: its \\n may come in the next read."""
        payloads: list[str] = []
        position = 0
        for match in _LINE_END.finditer(self._buffer):
            if match.group() == "\r" and match.end() == len(self._buffer):
                break
            line = self._buffer[position : match.start()]
            position = match.end()
            if line:
                self._field(line)
            elif self._data:
                payloads.append("\n".join(self._data))
                self._data = []
        self._buffer = self._buffer[position:]
        return payloads

    def _field(self, line: str) -> None:
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
