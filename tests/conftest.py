"""Fixtures: the fake provider (a real aiohttp server) and relays built from settings."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import REDIS_SERVER, FakeProvider, RedisServer, RelayFactory, serve_provider

from handlers.app import create_app
from handlers.config import Config


@pytest.fixture
async def provider(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeProvider:
    fake = FakeProvider()
    fake.base_url = await serve_provider(aiohttp_server, fake.chat_completions)
    return fake


@pytest.fixture
def serve(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Callable[..., Awaitable[TestServer]]:
    """``await serve(app)`` or ``await serve(**settings)``: a relay (or any app) on a real port."""

    async def make(app: web.Application | None = None, **settings: Any) -> TestServer:
        if app is None:
            settings.setdefault("demo_delay", 0.0)
            app = create_app(Config(**settings))
        return await aiohttp_server(app)

    return make


@pytest.fixture
def fake(provider: FakeProvider) -> FakeProvider:
    """The fake provider, by the name the page tests give it: ``fake.reply`` is what it answers next."""
    return provider


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


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a closed network: no background calls home, no first-run work.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Debian's Chromium driven by Playwright. Skipped without it, except in CI, where it must be there."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it with apt-get")
        pytest.skip("browser tests need Debian's chromium (apt-get install chromium)")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        instance = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            await instance.close()


def _running_redis() -> Iterator[RedisServer]:
    """A started ``redis-server``, stopped afterwards. Skipped without one, except in CI, where it must be there."""
    if REDIS_SERVER is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; .ci/run installs it with apt-get")
        pytest.skip("these tests need Debian's redis-server (apt-get install redis-server)")
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisServer]:
    """One ``redis-server`` for the whole run; tests keep apart by key prefix (see ``redis_settings``)."""
    yield from _running_redis()


@pytest.fixture
def redis_settings(shared_redis: RedisServer) -> dict[str, Any]:
    """Settings that put a relay on the shared Redis, under a prefix of this test's own."""
    return {"redis_url": shared_redis.url, "redis_prefix": f"test-{secrets.token_hex(4)}"}


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A ``redis-server`` of this test's own, which it may stop and start again."""
    yield from _running_redis()
