"""Where a stream's events go: Server-Sent Events or NDJSON.

Both write the same event objects. SSE goes out only through aiohttp-sse; the
``id`` of each event is ``<stream-id>:<seq>`` with ``seq`` counting from 1,
and the first event carries ``retry:``. A client that went away surfaces as
:class:`ClientGone`, whatever the transport said.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from .errors import ClientGone

__all__ = ["EventSink", "NDJSONSink", "SSESink", "open_sink"]

_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventSink(Protocol):
    @property
    def response(self) -> web.StreamResponse: ...

    async def send(self, event: dict[str, Any]) -> None: ...

    async def close(self) -> None: ...


class SSESink:
    """Events as ``text/event-stream``, written by aiohttp-sse."""

    def __init__(self, response: EventSourceResponse, stream_id: str, retry_ms: int) -> None:
        self.response = response
        self._prefix = stream_id + ":"
        self._seq = 0
        self._retry = retry_ms

    async def send(self, event: dict[str, Any]) -> None:
        self._seq += 1
        retry = self._retry if self._seq == 1 else None
        data = orjson.dumps(event).decode()
        try:
            await self.response.send(data, id=f"{self._prefix}{self._seq}", event=event["type"], retry=retry)
        except (ConnectionError, TimeoutError) as exc:
            # aiohttp-sse raises TimeoutError for a client that stopped reading.
            raise ClientGone() from exc

    async def close(self) -> None:
        # Stops aiohttp-sse's keep-alive task; aiohttp finishes the body.
        self.response.stop_streaming()
        await self.response.wait()


class NDJSONSink:
    """Events as ``application/x-ndjson``: one JSON object per line."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    async def send(self, event: dict[str, Any]) -> None:
        try:
            await self.response.write(orjson.dumps(event) + b"\n")
        except ConnectionError as exc:
            raise ClientGone() from exc

    async def close(self) -> None:
        return None


async def open_sink(
    request: web.Request, *, ndjson: bool, stream_id: str, retry_ms: int, keepalive: float
) -> EventSink:
    """Send the response headers and return the sink to write events to."""
    if ndjson:
        response = web.StreamResponse(headers=_STREAM_HEADERS)
        response.content_type = "application/x-ndjson"
        await response.prepare(request)
        return NDJSONSink(response)
    sse = EventSourceResponse(sep="\n", allow_all_methods=True, ping_interval=keepalive)
    await sse.prepare(request)
    return SSESink(sse, stream_id, retry_ms)
