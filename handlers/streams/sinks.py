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
write began, and the streams' watchdog aborts the connection once the write
has gone without progress (the client taking none of its bytes) for longer
than the stall timeout.

Every write holds whole events, so that aiohttp-sse's keep-alive comment,
which may go out while a write waits for a slow client, always falls between
two events; and the keep-alive stops before the write that ends the body.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from ..errors import ClientGone
from ..stores.log import EVENT_TYPES, LAST_KINDS, Events

__all__ = ["EventSink", "NDJSONSink", "SSESink", "open_sink"]

_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# The most the generation writes to a reader's connection itself (see ``EventSink.ready``).
_DIRECT_WRITE_BYTES = 64 * 1024
# The lines of an SSE event after its id.
_FIELDS = {kind: f"event: {kind}\ndata: ".encode() for kind in EVENT_TYPES}
# The events a stream's log ends with: nothing is written after them.


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
        # When the write now pending began, or last made progress (loop time); None when no write is pending.
        self.write_started: float | None = None
        # When the last write began (loop time).
        self.last_write = self._loop.time()
        # The transport's unsent bytes when the watchdog last looked at the pending write.
        self._unsent: int | None = None

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
            and size <= _DIRECT_WRITE_BYTES
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
        """Whether the pending write has waited more than ``limit`` seconds without the client taking any of it.

        Called by the watchdog every tick: a client that keeps reading a long
        backlog, however slowly, is not stalled.
        """
        if self.write_started is None:
            return False
        transport = self._request.transport
        unsent = transport.get_write_buffer_size() if transport is not None else 0
        if self._unsent is not None and unsent < self._unsent:
            self.write_started = now
        self._unsent = unsent
        return now - self.write_started > limit

    async def send_headers(self) -> None:
        """Send the response's headers now, ahead of any event."""
        await self._write(b"")

    def abort(self) -> None:
        """Drop the connection: a stalled peer never drains its buffer, so a graceful close would hang."""
        transport = self._request.transport
        if transport is not None:
            transport.abort()

    async def _write(self, data: bytes, last: bool = False) -> None:
        """Write ``data`` (whole events) in one write; with ``last``, end the response's body in the same write."""
        self.write_started = self.last_write = self._loop.time()
        self._unsent = None
        try:
            if last:
                await self.response.write_eof(data)
            else:
                await self.response.write(data)
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
        last = events.items[-1][0] in LAST_KINDS
        if last:
            # No keep-alive comment may follow the body's end while that write waits for the client.
            self._sse.stop_streaming()
        await self._write(b"".join(frames), last)

    async def send(self, event: dict[str, Any]) -> None:
        try:
            await self._sse.send(orjson.dumps(event).decode(), event=event["type"])
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            # RuntimeError: aiohttp refuses writes once the connection is closed or the body has ended.
            raise ClientGone() from exc

    async def close(self) -> None:
        # Stops aiohttp-sse's keep-alive task; aiohttp finishes the body.
        self._sse.stop_streaming()
        await self._sse.wait()


class NDJSONSink(EventSink):
    """Events as ``application/x-ndjson``: one JSON object per line, and an empty line to keep it alive.

    A proxy with an idle timeout cuts a stream that says nothing while a
    model thinks before its first token; SSE has its ``: ping`` comment for
    this, NDJSON an empty line (readers skip them). It goes out only after
    ``keepalive`` seconds without a write, from one timer re-armed as it fires.
    """

    def __init__(self, request: web.BaseRequest, response: web.StreamResponse, keepalive: float) -> None:
        super().__init__(request, response)
        self._keepalive = keepalive
        self._ended = False
        self._timer = self._loop.call_later(keepalive, self._tick) if keepalive > 0 else None
        self._pinging: asyncio.Task[None] | None = None  # held: the loop keeps only a weak reference

    def _tick(self) -> None:
        due = self.last_write + self._keepalive
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._tick)
            return
        self._timer = self._loop.call_later(self._keepalive, self._tick)
        self._pinging = self._loop.create_task(self._ping())

    async def _ping(self) -> None:
        # Checked in the task itself: between the timer and this step an event write may have begun. When
        # the connection's buffer is empty, the write below is done before this step ends.
        if self._ended or not self.ready(1):
            return
        with contextlib.suppress(ClientGone):
            await self._write(b"\n")

    def _stop_pings(self) -> None:
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def send_events(self, events: Events) -> None:
        items = events.items
        last = items[-1][0] in LAST_KINDS
        if last:
            self._stop_pings()
        await self._write(b"".join([data + b"\n" for _, data in items]), last)

    async def send(self, event: dict[str, Any]) -> None:
        await self._write(orjson.dumps(event) + b"\n")

    async def close(self) -> None:
        self._stop_pings()


async def open_sink(
    request: web.Request,
    *,
    ndjson: bool,
    stream_id: str,
    retry_ms: int,
    keepalive: float,
    stall_timeout: float,
) -> EventSink:
    """Start the response and return the sink to write events to.

    The headers wait to leave with the first write; a caller with no events
    to send at once calls :meth:`EventSink.send_headers`.
    """
    if ndjson:
        response = _HeldResponse(headers=_STREAM_HEADERS)
        response.content_type = "application/x-ndjson"
        await response.prepare(request)
        return NDJSONSink(request, response, keepalive)
    # send_timeout bounds aiohttp-sse's keep-alive writes and sets the socket's TCP user timeout.
    sse = _HeldSSEResponse(sep="\n", allow_all_methods=True, ping_interval=keepalive, send_timeout=stall_timeout)
    await sse.prepare(request)
    return SSESink(request, sse, stream_id, retry_ms)
