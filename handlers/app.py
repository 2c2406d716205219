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
from .keys import client_session_key, config_key
from .stream import DEMO_ROUTE, stream

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


def create_app(config: Config) -> web.Application:
    """The relay, its demo model and its page, configured by ``config``."""
    app = web.Application(middlewares=[_json_errors])
    app[config_key] = config
    app.cleanup_ctx.append(_client_session)
    app.on_response_prepare.append(_nosniff)
    app.add_routes(
        [
            web.get("/", page.index, name="index"),
            web.get("/stream", stream, name="stream", allow_head=False),
            web.post("/stream", stream),
            web.get("/demo/v1/models", demo.models, name="demo-models"),
            web.post("/demo/v1/chat/completions", demo.chat_completions, name=DEMO_ROUTE),
            web.static("/static", page.STATIC_DIR, name="static"),
        ]
    )
    return app


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    """One pooled ``ClientSession`` for every upstream request of this app."""
    config = app[config_key]
    timeout = aiohttp.ClientTimeout(total=None, connect=config.connect_timeout, sock_read=config.read_timeout)
    # limit=0: the number of concurrent streams is bounded by the relay, not by the pool.
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, raise_for_status=False) as session:
        app[client_session_key] = session
        yield


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
