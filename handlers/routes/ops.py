"""What an operator and a client ask besides streams: health, readiness, models, metrics."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..errors import RelayError
from ..keys import client_session_key, config_key, providers_key, streams_key
from ..metrics import render_processes
from ..provider.providers import Provider
from ..provider.upstream import endpoint, provider_headers

__all__ = ["healthz", "metrics", "models", "readyz"]

logger = logging.getLogger(__name__)

# How long /readyz waits for the provider when asked to check it.
_READY_TIMEOUT = 5.0


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: the process is up and serving."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: ready for streams: a provider is configured and, with ``--ready-check``, answers."""
    config = request.config_dict[config_key]
    streams = request.config_dict[streams_key]
    if not streams.accepting:
        return web.json_response({"status": "shutting_down"}, status=503)
    trouble = await streams.store.unavailable()
    if trouble is not None:
        return web.json_response({"status": "unavailable", "reason": trouble}, status=503)
    if config.uses_demo:
        return web.json_response({"status": "ok", "provider": "demo"})
    if not config.ready_check:
        return web.json_response({"status": "ok", "provider": "configured"})
    session = request.config_dict[client_session_key]
    providers = request.config_dict[providers_key].providers
    problems = [p for p in await asyncio.gather(*(_check(session, p, len(providers) > 1) for p in providers)) if p]
    if problems:
        return web.json_response({"status": "unavailable", "reason": "; ".join(problems)}, status=503)
    return web.json_response({"status": "ok", "provider": "reachable"})


async def _check(session: aiohttp.ClientSession, provider: Provider, named: bool) -> str | None:
    """What is wrong with the provider's ``GET /models`` (None: nothing)."""
    which = f"provider {provider.name}" if named else "the provider"
    headers = provider_headers(provider.headers, provider.api_key)
    url = endpoint(provider.base_url, "models")
    try:
        async with asyncio.timeout(_READY_TIMEOUT), session.get(url, headers=headers) as response:
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        logger.warning("readiness check: %s is unreachable: %s", which, type(exc).__name__)
        return f"{which} is unreachable"
    if status >= 400:
        return f"{which} answered HTTP {status}"
    return None


async def models(request: web.Request) -> web.Response:
    """``GET /models``: the models a client may choose, each with its provider's name, the default first."""
    return web.json_response({"object": "list", "data": request.config_dict[providers_key].listing()})


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format."""
    streams = request.config_dict[streams_key]
    metrics = streams.metrics
    if not streams.store.shared:
        body = metrics.render()
    else:
        # Whichever process is scraped answers for every process that shares the store.
        own = metrics.snapshot()
        try:
            snapshots = await streams.store.gather_metrics(own)
        except RelayError:
            snapshots = None
        body = render_processes(snapshots or {streams.store.process: own})
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
