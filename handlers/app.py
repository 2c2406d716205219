"""``create_app(config)``: build the whole relay as one ``web.Application``.

All state lives under ``web.AppKey``s on the application and is set up and
torn down through ``cleanup_ctx``; nothing is kept at module level, so
several instances with different providers can share a process, and the app
can be mounted under a prefix with ``parent.add_subapp("/chat/", app)``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from . import demo, page
from .config import Config
from .errors import RelayError, error_response, http_error_response
from .generation import Streams
from .keys import client_session_key, config_key, streams_key
from .stream import DEMO_ROUTE, cancel_stream, resume_stream, start_stream
from .stream_log import MemoryStreamStore

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


def create_app(config: Config) -> web.Application:
    """The relay, its demo model and its page, configured by ``config``."""
    app = web.Application(middlewares=[_json_errors])
    app[config_key] = config
    app.cleanup_ctx.append(_client_session)
    app.cleanup_ctx.append(_streams)
    app.on_shutdown.append(_drain_streams)
    app.on_response_prepare.append(_nosniff)
    app.add_routes(
        [
            web.get("/", page.index, name="index"),
            web.get("/stream", start_stream, name="stream", allow_head=False),
            web.post("/stream", start_stream),
            web.get("/stream/{id}", resume_stream, name="resume", allow_head=False),
            web.delete("/stream/{id}", cancel_stream),
            web.post("/stream/{id}/cancel", cancel_stream, name="cancel"),
            web.get("/demo/v1/models", demo.models, name="demo-models"),
            web.post("/demo/v1/chat/completions", demo.chat_completions, name=DEMO_ROUTE),
            web.static("/static", page.STATIC_DIR, name="static"),
        ]
    )
    return app


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    """One pooled ``ClientSession`` for every upstream request of this app."""
    config = app[config_key]
    # Only the connect timeout is aiohttp's: the first-byte and idle timeouts are the
    # upstream reader's own (see stream_chat).
    timeout = aiohttp.ClientTimeout(total=None, connect=config.connect_timeout)
    # limit=0: the number of concurrent streams is bounded by the relay, not by the pool.
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, raise_for_status=False) as session:
        app[client_session_key] = session
        yield


async def _streams(app: web.Application) -> AsyncIterator[None]:
    """The registry of generations; closed after the client session is no longer needed by them."""
    config = app[config_key]
    store = MemoryStreamStore(stream_bytes=config.stream_buffer_bytes, total_bytes=config.buffer_total_bytes)
    streams = Streams(config, store)
    app[streams_key] = streams
    streams.start_watchdog()
    try:
        yield
    finally:
        await streams.close()


async def _drain_streams(app: web.Application) -> None:
    """On shutdown: let running streams finish up to the deadline, then end them."""
    await app[streams_key].drain()


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place that turns errors raised before a stream starts into JSON answers."""
    try:
        return await handler(request)
    except RelayError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_error_response(exc)
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(RelayError("the server failed unexpectedly; see its log"))


async def _nosniff(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
