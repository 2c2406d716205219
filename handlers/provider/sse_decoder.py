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

__all__ = ["EventTooLong", "LineTooLong", "SSEDecoder", "ServerSentEvent"]

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

    def __init__(self, limit: int, message: str | None = None) -> None:
        super().__init__(message or f"an upstream line is longer than {limit} bytes")
        self.limit = limit


class EventTooLong(LineTooLong):
    """The data lines of one event together grew past the decoder's limit before a blank line ended it."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit, f"an upstream event's data lines add up to more than {limit} bytes")


class SSEDecoder:
    """Feed it bytes as they arrive; it returns the events they complete.

    ``max_line`` bounds the length of a line, and the data lines of the event
    being assembled together, so a misbehaving upstream cannot grow the
    process without limit (at most about twice ``max_line`` is held: the
    event's data and the line being read). Going past it stops the decoder:
    the events before are still returned, ``error`` says what happened, and
    what was held is let go.
    """

    __slots__ = (
        "_buffer",
        "_data",
        "_event",
        "_has_data",
        "_held",
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
        # Bytes of the data lines in ``_data``.
        self._held = 0
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
        try:
            for raw in lines:
                if len(raw) > limit:
                    raise LineTooLong(limit)
                event = self._line(raw)
                if event is not None:
                    events.append(event)
            if len(self._buffer) > limit:
                raise LineTooLong(limit)
        except LineTooLong as exc:
            self._fail(exc)
        return events

    def close(self) -> list[ServerSentEvent]:
        """End of stream: an unterminated last line is processed, but per the
        spec an event not followed by a blank line is never dispatched."""
        if self._buffer and self.error is None:
            try:
                self._line(self._buffer)
            except LineTooLong as exc:
                self._fail(exc)
            self._buffer = b""
        return []

    def _fail(self, error: LineTooLong) -> None:
        """Stop for good, letting go of the event and the line held so far."""
        self.error = error
        self._buffer = b""
        self._data = []
        self._held = 0

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
            if self._has_data:
                self._held += len(raw)
                if self._held > self._max_line:
                    raise EventTooLong(self._max_line)
            else:
                # The first line is within the line limit already.
                self._has_data = True
                self._held = len(raw)
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit() and len(value) <= 19:
            # Past 4,300 digits Python would refuse to read it at all; no sane retry needs 20.
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
