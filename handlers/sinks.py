"""Where a connection's events go: Server-Sent Events or NDJSON.

Both write the same event objects, taken from the stream's log already
encoded. SSE goes out only through aiohttp-sse; the ``id`` of each event is
``<stream-id>:<seq>``, and the event with ``seq`` 1 carries ``retry:``. A
client that went away, or stopped reading for longer than the stall timeout,
surfaces as :class:`ClientGone`, whatever the transport said.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from .errors import ClientGone
from .stream_log import Entry

__all__ = ["EventSink", "NDJSONSink", "SSESink", "open_sink"]

_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventSink(Protocol):
    @property
    def response(self) -> web.StreamResponse: ...

    async def send_entries(self, entries: Sequence[Entry]) -> None:
        """Send events from the log, in order."""

    async def send(self, event: dict[str, Any]) -> None:
        """Send an event that is not in the log (it has no ``id``)."""

    async def close(self) -> None: ...


class SSESink:
    """Events as ``text/event-stream``, written by aiohttp-sse."""

    def __init__(self, response: EventSourceResponse, stream_id: str, retry_ms: int) -> None:
        self.response = response
        self._prefix = stream_id + ":"
        self._retry = retry_ms

    async def send_entries(self, entries: Sequence[Entry]) -> None:
        send, prefix = self.response.send, self._prefix
        try:
            for entry in entries:
                retry = self._retry if entry.seq == 1 else None
                await send(entry.data, id=f"{prefix}{entry.seq}", event=entry.type, retry=retry)
        except (ConnectionError, TimeoutError) as exc:
            # aiohttp-sse raises TimeoutError (and aborts) for a client that stopped reading.
            raise ClientGone() from exc

    async def send(self, event: dict[str, Any]) -> None:
        try:
            await self.response.send(orjson.dumps(event).decode(), event=event["type"])
        except (ConnectionError, TimeoutError) as exc:
            raise ClientGone() from exc

    async def close(self) -> None:
        # Stops aiohttp-sse's keep-alive task; aiohttp finishes the body.
        self.response.stop_streaming()
        await self.response.wait()


class NDJSONSink:
    """Events as ``application/x-ndjson``: one JSON object per line."""

    def __init__(self, request: web.BaseRequest, response: web.StreamResponse, stall_timeout: float) -> None:
        self.response = response
        self._request = request
        self._stall_timeout = stall_timeout

    async def send_entries(self, entries: Sequence[Entry]) -> None:
        await self._write("".join(f"{entry.data}\n" for entry in entries).encode())

    async def send(self, event: dict[str, Any]) -> None:
        await self._write(orjson.dumps(event) + b"\n")

    async def _write(self, data: bytes) -> None:
        try:
            async with asyncio.timeout(self._stall_timeout):
                await self.response.write(data)
        except TimeoutError as exc:
            # A stalled peer never drains its buffer, so a graceful close would hang: abort.
            if self._request.transport is not None:
                self._request.transport.abort()
            raise ClientGone() from exc
        except ConnectionError as exc:
            raise ClientGone() from exc

    async def close(self) -> None:
        return None


async def open_sink(
    request: web.Request,
    *,
    ndjson: bool,
    stream_id: str,
    retry_ms: int,
    keepalive: float,
    stall_timeout: float,
) -> EventSink:
    """Send the response headers and return the sink to write events to."""
    if ndjson:
        response = web.StreamResponse(headers=_STREAM_HEADERS)
        response.content_type = "application/x-ndjson"
        await response.prepare(request)
        return NDJSONSink(request, response, stall_timeout)
    sse = EventSourceResponse(sep="\n", allow_all_methods=True, ping_interval=keepalive, send_timeout=stall_timeout)
    await sse.prepare(request)
    return SSESink(sse, stream_id, retry_ms)
