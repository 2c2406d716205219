"""Typed keys for the state an application holds.

Handlers read them through ``request.config_dict`` so that they find their
own application's values when it is mounted as a sub-application.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from .config import Config
from .provider.providers import ProviderTable
from .routes.access import Access
from .routes.origins import Origins
from .streams.generation import Streams

if TYPE_CHECKING:
    # Imported only when a Redis URL is configured: one process in memory never loads the client.
    from redis.asyncio import Redis

__all__ = ["access_key", "client_session_key", "config_key", "origins_key", "providers_key", "redis_key", "streams_key"]

config_key = web.AppKey("config_key", Config)
client_session_key = web.AppKey("client_session_key", aiohttp.ClientSession)
streams_key = web.AppKey("streams_key", Streams)
access_key = web.AppKey("access_key", Access)
origins_key = web.AppKey("origins_key", Origins)
redis_key: web.AppKey[Redis] = web.AppKey("redis_key")
providers_key = web.AppKey("providers_key", ProviderTable)
