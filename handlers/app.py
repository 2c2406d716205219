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
import aiohttp_cors
from aiohttp import web
from aiohttp.typedefs import Handler

from .config import Config
from .errors import ProtocolLog, RelayError, error_response, http_error_response
from .keys import access_key, client_session_key, config_key, origins_key, providers_key, redis_key, streams_key
from .provider import demo
from .provider.providers import ProviderTable
from .routes import ops, page
from .routes.access import Access, client_key
from .routes.origins import Origins
from .routes.stream import DEMO_ROUTE, cancel_stream, resume_stream, start_stream
from .stores.log import StreamStore
from .stores.memory import MemoryStreamStore
from .streams.generation import Streams

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


# Routes anyone may use: the page, probes and the demo model (which costs nothing).
_PUBLIC = frozenset({"index", "static", "healthz", "readyz", "demo-models", DEMO_ROUTE})


def create_app(config: Config) -> web.Application:
    """The relay, its demo model and its page, configured by ``config``."""
    app = web.Application(middlewares=[_json_errors, _hosts, _access], handler_args={"logger": ProtocolLog()})
    app[config_key] = config
    app[origins_key] = Origins(config)
    app[providers_key] = ProviderTable(config)
    app.cleanup_ctx.append(_client_session)
    app.cleanup_ctx.append(_redis)
    app.cleanup_ctx.append(_streams)
    app.cleanup_ctx.append(_access_control)
    app.on_shutdown.append(_drain_streams)
    app.on_response_prepare.append(_nosniff)
    api = app.add_routes(
        [
            web.get("/stream", start_stream, name="stream", allow_head=False),
            web.post("/stream", start_stream),
            web.get("/stream/{id}", resume_stream, name="resume", allow_head=False),
            web.delete("/stream/{id}", cancel_stream),
            web.post("/stream/{id}/cancel", cancel_stream, name="cancel"),
            web.get("/models", ops.models, name="models"),
            web.get("/metrics", ops.metrics, name="metrics"),
        ]
    )
    app.add_routes(
        [
            web.get("/", page.index, name="index"),
            web.get("/healthz", ops.healthz, name="healthz"),
            web.get("/readyz", ops.readyz, name="readyz"),
            web.get("/static/{path:.+}", page.asset, name="static"),
        ]
    )
    if config.uses_demo:
        # Only while it is the relay's provider: with a real one it would be an open, unlimited route.
        app.add_routes(
            [
                web.get("/demo/v1/models", demo.models, name="demo-models"),
                web.post("/demo/v1/chat/completions", demo.chat_completions, name=DEMO_ROUTE),
            ]
        )
    if config.cors_origins:
        _allow_cross_origin(app, config, api)
    return app


def _allow_cross_origin(app: web.Application, config: Config, routes: list[web.AbstractRoute]) -> None:
    """CORS for the API routes, through aiohttp-cors, for the configured origins only."""
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]  # aiohttp-cors ships no types
        allow_credentials=config.cors_credentials,
        allow_headers=("Content-Type", "Authorization", "Last-Event-ID", "Accept"),
        allow_methods=("GET", "POST", "DELETE"),
        # Pages must be able to read how long to wait after a 429 or 503.
        expose_headers=("Retry-After",),
        max_age=600,
    )
    cors = aiohttp_cors.setup(app, defaults=dict.fromkeys(config.cors_origins, options))
    for route in routes:
        cors.add(route)


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


async def _redis(app: web.Application) -> AsyncIterator[None]:
    """With a Redis URL, one Redis client (and its connection pool) for the app's shared state."""
    config = app[config_key]
    if config.redis_url is None:
        yield
        return
    from .stores.redis import connect

    client = connect(config.redis_url)
    app[redis_key] = client
    try:
        yield
    finally:
        await client.aclose()


def _store(app: web.Application) -> StreamStore:
    """The memory store, or with a Redis URL the store that every process shares."""
    config = app[config_key]
    # The same limits, whichever store holds them.
    limits = {
        "stream_bytes": config.stream_buffer_bytes,
        "total_bytes": config.buffer_total_bytes,
        "max_streams": config.max_streams,
        "client_streams": config.client_streams,
    }
    if config.redis_url is None:
        return MemoryStreamStore(**limits)
    from .stores.redis import RedisStreamStore

    store = RedisStreamStore(app[redis_key], prefix=config.redis_prefix, retention=config.retention, **limits)
    store.start()
    return store


async def _streams(app: web.Application) -> AsyncIterator[None]:
    """The registry of generations; closed after the client session is no longer needed by them."""
    config = app[config_key]
    streams = Streams(config, _store(app))
    app[streams_key] = streams
    streams.start_watchdog()
    try:
        yield
    finally:
        await streams.close()


async def _access_control(app: web.Application) -> AsyncIterator[None]:
    access = Access(app[config_key], app.get(redis_key))
    app[access_key] = access
    try:
        yield
    finally:
        await access.close()


async def _drain_streams(app: web.Application) -> None:
    """On shutdown: let running streams finish up to the deadline, then end them."""
    await app[streams_key].drain()


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place that turns errors raised before a stream starts into JSON answers."""
    try:
        return await handler(request)
    except RelayError as exc:
        request.config_dict[streams_key].metrics.rejections.labels(exc.code).inc()
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_error_response(exc)
    except asyncio.CancelledError:
        raise
    except Exception:
        # Quoted: the decoded path may hold a newline, and a crafted URL would forge log lines.
        logger.exception("unhandled error on %s %r", request.method, request.path)
        return error_response(RelayError("the server failed unexpectedly; see its log"))


@web.middleware
async def _hosts(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route: a Host this relay answers to (see routes/origins.py)."""
    request.config_dict[origins_key].check_host(request)
    return await handler(request)


@web.middleware
async def _access(request: web.Request, handler: Handler) -> web.StreamResponse:
    """API routes: a page of an allowed origin, a valid token when tokens are set, and the client's request rate."""
    resource = request.match_info.route.resource
    if resource is None or resource.name in _PUBLIC or request.method == "OPTIONS":
        # No such route (a 404 follows), a public one, or a CORS preflight, which carries no credentials.
        return await handler(request)
    request.config_dict[origins_key].check_origin(request)
    access = request.config_dict[access_key]
    try:
        client = access.client(request)
    except RelayError:
        # Wrong tokens count against the address's rate, so guessing is as slow as the limit.
        await access.check_rate(access.address(request))
        raise
    await access.check_rate(client)
    request[client_key] = client
    return await handler(request)


async def _nosniff(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
