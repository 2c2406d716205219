"""``/stream``: validate the request, call the provider, relay its events.

Bad input is refused with a JSON error before any stream starts. Once the
response has begun, every outcome ends the stream with exactly one last
event: ``done`` on success, ``error`` otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from aiohttp import web

from .chat_request import ChatRequest, read_chat_request
from .config import Config
from .errors import ClientGone, RelayError, RequestError
from .keys import client_session_key, config_key
from .sinks import EventSink, open_sink
from .upstream import Upstream, stream_chat

__all__ = ["DEMO_ROUTE", "stream"]

logger = logging.getLogger(__name__)

# The route name of the embedded demo model's chat endpoint.
DEMO_ROUTE = "demo-chat-completions"
_DEMO_SUFFIX = "/chat/completions"


async def stream(request: web.Request) -> web.StreamResponse:
    """``GET /stream?prompt=…`` or ``POST /stream`` with ``{"messages": […]}``."""
    config = request.config_dict[config_key]
    chat = await read_chat_request(request, config)
    ndjson = _wants_ndjson(request)
    upstream = _upstream(request, config)
    stream_id = secrets.token_urlsafe(12)
    sink = await open_sink(
        request, ndjson=ndjson, stream_id=stream_id, retry_ms=config.retry_ms, keepalive=config.keepalive
    )
    try:
        await _relay(sink, request, upstream, chat, stream_id)
    finally:
        await sink.close()
    return sink.response


async def _relay(sink: EventSink, request: web.Request, upstream: Upstream, chat: ChatRequest, stream_id: str) -> None:
    config = request.config_dict[config_key]
    session = request.config_dict[client_session_key]
    loop = asyncio.get_running_loop()
    started = loop.time()
    ttft_ms: float | None = None
    outcome = "done"
    try:
        await sink.send({"type": "meta", "stream": stream_id, "model": chat.model})
        events = stream_chat(session, upstream, chat.payload(config.include_usage), max_line=config.max_line_bytes)
        async with contextlib.aclosing(events):
            async for batch in events:
                now = loop.time()
                for event in batch:
                    if event["type"] == "done":
                        event["ttft_ms"] = ttft_ms
                        event["duration_ms"] = round((now - started) * 1000, 1)
                    elif ttft_ms is None:
                        ttft_ms = round((now - started) * 1000, 1)
                    await sink.send(event)
    except ClientGone:
        outcome = "client_gone"
    except RelayError as exc:
        outcome = exc.code
        await _send_last(sink, exc)
    except Exception:
        outcome = "internal_error"
        logger.exception("stream %s failed", stream_id)
        await _send_last(sink, RelayError("the relay failed unexpectedly; see the server log"))
    finally:
        logger.info(
            "stream %s ended: %s (model %s, first token %s ms, %.0f ms)",
            stream_id,
            outcome,
            chat.model,
            ttft_ms,
            (loop.time() - started) * 1000,
        )


async def _send_last(sink: EventSink, error: RelayError) -> None:
    with contextlib.suppress(ClientGone):
        await sink.send(error.event())


def _wants_ndjson(request: web.Request) -> bool:
    fmt = request.query.get("format")
    if fmt is None:
        return "application/x-ndjson" in request.headers.get("Accept", "")
    if fmt not in ("sse", "ndjson"):
        raise RequestError("format must be 'sse' or 'ndjson'", code="invalid_parameter")
    return fmt == "ndjson"


def _upstream(request: web.Request, config: Config) -> Upstream:
    if config.base_url is not None:
        return Upstream(config.base_url, config.api_key)
    return Upstream(_demo_base_url(request))


def _demo_base_url(request: web.Request) -> str:
    """This very server's demo model, reached over loopback HTTP like any provider.

    The socket the request came in on is used rather than the Host header, so
    the relay never calls out through a proxy's public name.
    """
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(sockname, tuple):
        raise RelayError("the embedded demo model needs a TCP listener; configure a provider instead")
    host, port = sockname[0], sockname[1]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    path = request.app.router[DEMO_ROUTE].url_for().path
    return f"http://{host}:{port}{path.removesuffix(_DEMO_SUFFIX)}"
