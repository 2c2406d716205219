"""Where a connection's events go: Server-Sent Events or NDJSON.

Both write the same event objects, taken from the stream's log already
encoded, and every batch of events (what one upstream read brought) goes out
in one write. SSE responses are aiohttp-sse's: its headers, keep-alive
comments, TCP user timeout and lifecycle; the ``id`` of each event is
``<stream-id>:<seq>``, and the event with ``seq`` 1 carries ``retry:``.

Each event costs the relay a socket write, and on loopback or a VM a write
is among the dearest things it does, so a stream spends as few as it can:
its headers leave with its first events (when these are about to be
written), and its last event (``done`` or ``error``) with the end of the
chunked body.

A client that went away surfaces as :class:`ClientGone`, whatever the
transport said. A client that stops reading blocks a write; the sinks carry
no timer per write for that (it is the hot path): each notes when its pending
write began, and the streams' watchdog aborts the connection once that is
longer ago than the stall timeout.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from .errors import ClientGone
from .stream_log import EVENT_TYPES, Events

__all__ = ["EventSink", "NDJSONSink", "SSESink", "open_sink"]

_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# The most one write hands the transport; the stall timeout applies to each.
_WRITE_SLICE = 64 * 1024
# The lines of an SSE event after its id.
_FIELDS = {kind: f"event: {kind}\ndata: ".encode() for kind in EVENT_TYPES}
# The events a stream's log ends with: nothing is written after them.
_LAST_KINDS = frozenset({"done", "error"})


class _HeldSSEResponse(EventSourceResponse):
    """aiohttp-sse's response, whose headers wait for the first write and go out with it.

    aiohttp sends a streaming response's headers at ``prepare`` unless the
    class says otherwise (its ``Response`` holds them the same way).
    """

    _send_headers_immediately = False


class _HeldResponse(web.StreamResponse):
    """A streaming response whose headers go out with its first write."""

    _send_headers_immediately = False


class EventSink:
    """The writing half both formats share: one write per batch, and stall bookkeeping."""

    def __init__(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        self.response = response
        self._request = request
        self._loop = asyncio.get_running_loop()
        # When the write now pending began (loop time), or None when no write is pending.
        self.write_started: float | None = None

    async def send_events(self, events: Events) -> None:
        """Send events from the log, in order, in one write."""
        raise NotImplementedError

    async def send(self, event: dict[str, Any]) -> None:
        """Send an event that is not in the log (it has no ``id``)."""
        raise NotImplementedError

    async def close(self) -> None:
        return None

    def ready(self, size: int) -> bool:
        """Whether a write of ``size`` bytes would go out now, without waiting for the client.

        True when no write is pending and the connection's send buffer is
        empty: the bytes then go straight to the socket, and what the kernel
        does not take stays below the transport's high-water mark (64 KiB),
        so nothing pauses and nothing waits.
        """
        transport = self._request.transport
        return (
            self.write_started is None
            and size <= _WRITE_SLICE
            and transport is not None
            and not transport.is_closing()
            and not transport.get_write_buffer_size()
        )

    @property
    def gone(self) -> bool:
        """Whether the client's connection has closed."""
        transport = self._request.transport
        return transport is None or transport.is_closing()

    def stalled(self, now: float, limit: float) -> bool:
        """Whether one write has been waiting for the client to read for more than ``limit`` seconds."""
        started = self.write_started
        return started is not None and now - started > limit

    def abort(self) -> None:
        """Drop the connection: a stalled peer never drains its buffer, so a graceful close would hang."""
        transport = self._request.transport
        if transport is not None:
            transport.abort()

    async def _write(self, data: bytes, last: bool = False) -> None:
        """Write ``data``; with ``last``, end the response's body in the same write."""
        response = self.response
        size = len(data)
        try:
            # In slices, so that a client that keeps reading a long backlog never looks stalled.
            for start in range(0, size, _WRITE_SLICE):
                chunk = data if size <= _WRITE_SLICE else data[start : start + _WRITE_SLICE]
                self.write_started = self._loop.time()
                if last and start + _WRITE_SLICE >= size:
                    await response.write_eof(chunk)
                else:
                    await response.write(chunk)
        except (ConnectionError, RuntimeError) as exc:
            # RuntimeError: aiohttp refuses writes once the connection is closed.
            raise ClientGone() from exc
        finally:
            self.write_started = None


class SSESink(EventSink):
    """Events as ``text/event-stream`` on an aiohttp-sse response.

    Log events are framed here and written through the response's ``write``,
    a batch at a time: aiohttp-sse's ``send`` writes one event per call, each
    inside its own timeout. Events outside the log go through ``send``.
    """

    def __init__(self, request: web.BaseRequest, response: EventSourceResponse, stream_id: str, retry_ms: int) -> None:
        super().__init__(request, response)
        self._sse = response
        self._prefix = f"id: {stream_id}:".encode()
        self._retry = f"\nretry: {retry_ms}\n".encode()

    async def send_events(self, events: Events) -> None:
        # The fields are safe to write as they are: ids are "<stream-id>:<seq>", types are the
        # contract's names, and the data is compact JSON, which never holds a CR or LF.
        prefix = self._prefix
        frames: list[bytes] = []
        for seq, (kind, data) in enumerate(events.items, events.first):
            frames += (prefix, str(seq).encode(), b"\n", _FIELDS[kind], data, b"\n\n")
        if events.first == 1:
            frames[2] = self._retry  # the line after the stream's first id
        await self._write(b"".join(frames), events.items[-1][0] in _LAST_KINDS)

    async def send(self, event: dict[str, Any]) -> None:
        try:
            await self._sse.send(orjson.dumps(event).decode(), event=event["type"])
        except (ConnectionError, TimeoutError) as exc:
            raise ClientGone() from exc

    async def close(self) -> None:
        # Stops aiohttp-sse's keep-alive task; aiohttp finishes the body.
        self._sse.stop_streaming()
        await self._sse.wait()


class NDJSONSink(EventSink):
    """Events as ``application/x-ndjson``: one JSON object per line."""

    async def send_events(self, events: Events) -> None:
        items = events.items
        await self._write(b"".join([data + b"\n" for _, data in items]), items[-1][0] in _LAST_KINDS)

    async def send(self, event: dict[str, Any]) -> None:
        await self._write(orjson.dumps(event) + b"\n")


async def open_sink(
    request: web.Request,
    *,
    ndjson: bool,
    stream_id: str,
    retry_ms: int,
    keepalive: float,
    stall_timeout: float,
    events_due: bool,
) -> EventSink:
    """Start the response and return the sink to write events to.

    With ``events_due`` (events are about to be written, e.g. a new stream's
    ``meta``) the headers wait to leave with them; otherwise they go now, so
    a client that resumed a quiet stream learns at once that it is connected.
    """
    response: web.StreamResponse
    if ndjson:
        response = _HeldResponse(headers=_STREAM_HEADERS)
        response.content_type = "application/x-ndjson"
        await response.prepare(request)
        sink: EventSink = NDJSONSink(request, response)
    else:
        # send_timeout bounds aiohttp-sse's keep-alive writes and sets the socket's TCP user timeout.
        sse = _HeldSSEResponse(sep="\n", allow_all_methods=True, ping_interval=keepalive, send_timeout=stall_timeout)
        await sse.prepare(request)
        sink = SSESink(request, sse, stream_id, retry_ms)
        response = sse
    if not events_due:
        await response.write(b"")  # an empty write sends the held headers
    return sink
