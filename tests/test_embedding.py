"""The app works mounted inside another aiohttp application, twice if need be."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import TestClient
from helpers import FakeProvider, Reply, parse_sse, text_of, transcript

from handlers.config import Config
from server import create_app

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


async def test_mounted_under_a_prefix_the_page_and_its_assets_are_served(aiohttp_client: ClientFactory) -> None:
    parent = web.Application()
    parent.add_subapp("/chat/", create_app(Config(demo_delay=0)))
    client = await aiohttp_client(parent)

    async with client.get("/chat/") as page:
        assert page.status == 200
        html = await page.text()
    assert 'src="static/js/app.js"' in html, "assets are linked relatively"
    async with client.get("/chat/static/js/app.js") as script:
        assert script.status == 200
    async with client.get("/chat/static/js/api.js") as script:
        assert 'fetch("stream?format=ndjson"' in await script.text(), "API calls are relative too"


async def test_mounted_under_a_prefix_the_demo_model_answers_through_stream(aiohttp_client: ClientFactory) -> None:
    parent = web.Application()
    parent.add_subapp("/chat/", create_app(Config(demo_delay=0)))
    client = await aiohttp_client(parent)

    async with client.get("/chat/stream", params={"prompt": "hello"}) as response:
        events = parse_sse(await response.read())

    assert events[-1].event == "done"
    assert text_of(events, "content").startswith("## ")


async def test_two_instances_with_different_providers_share_one_process(
    aiohttp_client: ClientFactory, provider: FakeProvider
) -> None:
    provider.reply = Reply(transcript("openai_content.sse"))
    parent = web.Application()
    parent.add_subapp("/demo-chat/", create_app(Config(demo_delay=0)))
    parent.add_subapp("/real-chat/", create_app(Config(base_url=provider.base_url, model="test-model")))
    client = await aiohttp_client(parent)

    async with client.get("/demo-chat/stream", params={"prompt": "hi"}) as response:
        demo = parse_sse(await response.read())
    async with client.get("/real-chat/stream", params={"prompt": "hi"}) as response:
        real = parse_sse(await response.read())

    assert demo[0].data["model"] == "demo"
    assert real[0].data["model"] == "test-model"
    assert text_of(real, "content") == "The capital of France is **Paris**."
    assert len(provider.requests) == 1


async def test_errors_inside_the_mounted_app_are_json(aiohttp_client: ClientFactory) -> None:
    parent = web.Application()
    parent.add_subapp("/chat/", create_app(Config()))
    client = await aiohttp_client(parent)

    async with client.get("/chat/stream") as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "missing_prompt"
