"""An incremental decoder for ``text/event-stream``, with no I/O.

It follows the WHATWG HTML "Server-sent events" parsing rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
lines end in CRLF, LF or a lone CR; a leading BOM is dropped; lines starting
with ``:`` are comments; one space after the colon is dropped; ``data`` lines
are joined with ``\\n``; a blank line dispatches the event.

Bytes are split into lines *before* UTF-8 decoding: CR and LF never occur
inside a multi-byte UTF-8 sequence, so a character split across network
chunks is simply reassembled with the rest of its line.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LineTooLong", "SSEDecoder", "ServerSentEvent"]

_BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event, as an EventSource would see it."""

    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None


class LineTooLong(ValueError):
    """A line grew past the decoder's limit without ending."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"an upstream line is longer than {limit} bytes")
        self.limit = limit


class SSEDecoder:
    """Feed it bytes as they arrive; it returns the events they complete.

    ``max_line`` bounds the length of a line, so a misbehaving upstream cannot
    grow the process without limit. A longer line stops the decoder: the
    events before it are still returned, and ``error`` says what happened.
    """

    __slots__ = (
        "_buffer",
        "_data",
        "_event",
        "_has_data",
        "_last_id",
        "_max_line",
        "_retry",
        "_skip_lf",
        "_started",
        "error",
    )

    def __init__(self, max_line: int = 1 << 20) -> None:
        self._max_line = max_line
        self._buffer = b""
        # A chunk that ended on CR may be the first half of a CRLF.
        self._skip_lf = False
        self._started = False
        self._event = ""
        self._data: list[str] = []
        self._has_data = False
        # The last event ID persists across events, as in the spec.
        self._last_id = ""
        self._retry: int | None = None
        self.error: LineTooLong | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Decode ``chunk`` and return the events it completes, in order."""
        if self.error is not None:
            return []
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[ServerSentEvent] = []
        if b"\r" not in buffer:
            # Fast path: LF-only streams are by far the most common.
            lines = buffer.split(b"\n")
            self._buffer = lines.pop()
        else:
            lines = buffer.splitlines(keepends=True)
            self._buffer = b""
            if lines and not lines[-1].endswith((b"\n", b"\r")):
                self._buffer = lines.pop()
            # Only a CR that ends the chunk can be half of a CRLF split across chunks.
            self._skip_lf = buffer.endswith(b"\r")
            lines = [_strip_eol(line) for line in lines]
        limit = self._max_line
        for raw in lines:
            if len(raw) > limit:
                self.error = LineTooLong(limit)
                return events
            event = self._line(raw)
            if event is not None:
                events.append(event)
        if len(self._buffer) > limit:
            self.error = LineTooLong(limit)
        return events

    def close(self) -> list[ServerSentEvent]:
        """End of stream: an unterminated last line is processed, but per the
        spec an event not followed by a blank line is never dispatched."""
        if self._buffer and self.error is None:
            self._line(self._buffer)
            self._buffer = b""
        return []

    def _line(self, raw: bytes) -> ServerSentEvent | None:
        line = raw.decode("utf-8", "replace")
        if not self._started:
            self._started = True
            if line.startswith(_BOM):
                line = line[1:]
        if not line:
            return self._dispatch()
        if line[0] == ":":
            return None
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        event, retry = self._event, self._retry
        self._event = ""
        self._retry = None
        if not self._has_data:
            return None
        data = "\n".join(self._data)
        self._data = []
        self._has_data = False
        return ServerSentEvent(data, event or "message", self._last_id, retry)


def _strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith((b"\n", b"\r")):
        return line[:-1]
    return line
