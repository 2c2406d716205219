"""Fixtures: the fake provider (a real aiohttp server) and relays built from settings."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import FakeProvider, RelayFactory

from handlers.app import create_app
from handlers.config import Config


@pytest.fixture
async def provider(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeProvider:
    fake = FakeProvider()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat_completions)
    server = await aiohttp_server(app)
    fake.base_url = str(server.make_url("/v1"))
    return fake


@pytest.fixture
def relay(aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]]) -> RelayFactory:
    """``await relay(**settings)``: a client of a relay built with those settings."""

    async def make(**settings: Any) -> TestClient[web.Request, web.Application]:
        settings.setdefault("demo_delay", 0.0)
        return await aiohttp_client(create_app(Config(**settings)))

    return make


@pytest.fixture
def relay_to(relay: RelayFactory, provider: FakeProvider) -> RelayFactory:
    """``await relay_to(**settings)``: a relay pointed at the fake provider."""

    async def make(**settings: Any) -> TestClient[web.Request, web.Application]:
        settings.setdefault("base_url", provider.base_url)
        settings.setdefault("model", "test-model")
        return await relay(**settings)

    return make
