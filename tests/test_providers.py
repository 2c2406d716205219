"""Several providers in one relay: a request's model picks its provider, and each key goes to its provider only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import FakeProvider, RelayFactory, Reply, chunk, collect, serve_provider, sse, text_of
from prometheus_client.parser import text_string_to_metric_families

from handlers.app import create_app
from handlers.config import Config, ConfigError, load_config

Client = TestClient[web.Request, web.Application]
ServerFactory = Callable[..., Awaitable[TestServer]]

ANSWER = Reply(sse(chunk(content="Okay.</think>Hi"), chunk(finish="stop"), "[DONE]"))


async def no_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": []})


async def fake_provider(aiohttp_server: ServerFactory, *, models_route: bool = False) -> FakeProvider:
    """A real provider server; with ``models_route`` it also answers ``GET /v1/models``."""
    fake = FakeProvider(reply=ANSWER)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat_completions)
    if models_route:
        app.router.add_get("/v1/models", no_models)
    server = await aiohttp_server(app)
    fake.base_url = str(server.make_url("/v1"))
    return fake


@pytest.fixture
async def alpha(aiohttp_server: ServerFactory) -> FakeProvider:
    return await fake_provider(aiohttp_server, models_route=True)


@pytest.fixture
async def beta(aiohttp_server: ServerFactory) -> FakeProvider:
    return await fake_provider(aiohttp_server)


def two_providers(alpha: FakeProvider, beta: FakeProvider) -> str:
    return f"""
model = "beta-chat"

[[providers]]
name = "alpha"
base_url = "{alpha.base_url}"
api_key_env = "ALPHA_KEY"
models = ["alpha-reasoner", {{ id = "alpha-qwq", think = "open" }}]

[[providers]]
name = "beta"
base_url = "{beta.base_url}"
api_key_env = "BETA_KEY"
models = ["beta-chat"]
headers = {{ "HTTP-Referer" = "https://chat.example.com", "X-Title" = "thinkstream" }}
"""


KEYS = {"ALPHA_KEY": "sk-alpha-111111", "BETA_KEY": "sk-beta-222222"}


@pytest.fixture
def relay_from_file(
    tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]]
) -> Callable[..., Awaitable[Client]]:
    """``await relay_from_file(text, env, *args)``: a client of the relay that config file makes."""

    async def make(text: str, env: dict[str, str], *args: str) -> Client:
        path = tmp_path / "relay.toml"
        path.write_text(text)
        return await aiohttp_client(create_app(load_config(["--config", str(path), *args], env)))

    return make


async def ask(client: Client, model: str | None = None) -> list[Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    if model is not None:
        body["model"] = model
    return await collect(client, "POST", "/stream", json=body)


async def test_each_model_goes_to_its_own_provider_with_only_that_providers_key_and_headers(
    relay_from_file: Callable[..., Awaitable[Client]], alpha: FakeProvider, beta: FakeProvider
) -> None:
    client = await relay_from_file(two_providers(alpha, beta), KEYS)

    await ask(client, "alpha-reasoner")
    await ask(client, "beta-chat")

    assert [r["model"] for r in alpha.requests] == ["alpha-reasoner"]
    assert [r["model"] for r in beta.requests] == ["beta-chat"]
    [alpha_headers], [beta_headers] = alpha.headers, beta.headers
    assert alpha_headers["Authorization"] == "Bearer sk-alpha-111111"
    assert beta_headers["Authorization"] == "Bearer sk-beta-222222"
    assert "sk-beta" not in repr(alpha_headers) and "sk-alpha" not in repr(beta_headers)
    assert (beta_headers["HTTP-Referer"], beta_headers["X-Title"]) == ("https://chat.example.com", "thinkstream")
    assert "X-Title" not in alpha_headers and "HTTP-Referer" not in alpha_headers


async def test_a_request_without_a_model_goes_to_the_default_models_provider(
    relay_from_file: Callable[..., Awaitable[Client]], alpha: FakeProvider, beta: FakeProvider
) -> None:
    client = await relay_from_file(two_providers(alpha, beta), KEYS)

    await ask(client)

    assert (len(alpha.requests), [r["model"] for r in beta.requests]) == (0, ["beta-chat"])


async def test_a_model_no_provider_lists_is_refused_before_any_provider_is_called(
    relay_from_file: Callable[..., Awaitable[Client]], alpha: FakeProvider, beta: FakeProvider
) -> None:
    client = await relay_from_file(two_providers(alpha, beta), KEYS)

    async with client.post("/stream", json={"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "model_not_allowed"
    assert alpha.requests == [] and beta.requests == []


async def test_a_provider_without_a_key_variable_gets_no_authorization_header(
    relay_from_file: Callable[..., Awaitable[Client]], alpha: FakeProvider, beta: FakeProvider
) -> None:
    client = await relay_from_file(two_providers(alpha, beta).replace('api_key_env = "ALPHA_KEY"\n', ""), KEYS)

    await ask(client, "alpha-reasoner")

    assert "Authorization" not in alpha.headers[0]


async def test_each_model_is_read_with_its_own_think_setting(
    relay_from_file: Callable[..., Awaitable[Client]], alpha: FakeProvider, beta: FakeProvider
) -> None:
    client = await relay_from_file(two_providers(alpha, beta), KEYS)

    opened = await ask(client, "alpha-qwq")
    plain = await ask(client, "alpha-reasoner")

    assert (text_of(opened, "reasoning"), text_of(opened, "content")) == ("Okay.", "Hi")
    assert (text_of(plain, "reasoning"), text_of(plain, "content")) == ("", "Okay.</think>Hi")


async def test_models_lists_every_model_with_its_providers_name_and_never_a_url_or_key(
    relay_from_file: Callable[..., Awaitable[Client]], alpha: FakeProvider, beta: FakeProvider
) -> None:
    # A URL may carry secrets of its own (a user and password, a key in the query).
    text = two_providers(alpha, beta).replace(beta.base_url, beta.base_url.replace("//", "//user:pw-333@") + "?k=q-444")
    # One Authorization header carries the URL's user and password or a key, not both.
    text = text.replace('api_key_env = "BETA_KEY"\n', "")
    client = await relay_from_file(text, {"ALPHA_KEY": KEYS["ALPHA_KEY"]})

    async with client.get("/models") as response:
        body = await response.text()
        listing = await response.json()

    assert listing == {
        "object": "list",
        "data": [
            {"id": "beta-chat", "default": True, "provider": "beta"},
            {"id": "alpha-reasoner", "default": False, "provider": "alpha"},
            {"id": "alpha-qwq", "default": False, "provider": "alpha"},
        ],
    }
    for secret in ("sk-alpha", "sk-beta", "pw-333", "q-444", "127.0.0.1"):
        assert secret not in body


async def test_the_single_provider_settings_list_their_models_under_the_providers_host(
    aiohttp_client: Callable[..., Awaitable[Client]], alpha: FakeProvider
) -> None:
    env = {"LLM_BASE_URL": alpha.base_url, "LLM_MODEL": "m", "THINKSTREAM_MODELS": "n"}
    client = await aiohttp_client(create_app(load_config([], env)))

    async with client.get("/models") as response:
        listing = await response.json()

    assert listing["data"] == [
        {"id": "m", "default": True, "provider": "127.0.0.1"},
        {"id": "n", "default": False, "provider": "127.0.0.1"},
    ]


async def test_metrics_tell_the_providers_apart_in_tokens_failures_and_retries(
    relay_from_file: Callable[..., Awaitable[Client]], alpha: FakeProvider, beta: FakeProvider
) -> None:
    overloaded = Reply.error(503, {"error": {"message": "overloaded", "type": "server_error"}}, {"Retry-After": "0"})
    alpha.reply = Reply(
        sse(
            chunk(content="Hi"),
            chunk(finish="stop"),
            {"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
            "[DONE]",
        )
    )
    beta.script = [overloaded]
    beta.reply = overloaded
    client = await relay_from_file(two_providers(alpha, beta), KEYS, "--upstream-retries", "1")

    await ask(client, "alpha-reasoner")
    await ask(client, "beta-chat")
    async with client.get("/metrics") as response:
        samples = {
            (sample.name, *sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(await response.text())
            for sample in family.samples
            if "provider" in sample.labels and sample.name.endswith("_total")
        }

    assert samples == {
        ("thinkstream_tokens_total", ("kind", "prompt"), ("provider", "alpha")): 3,
        ("thinkstream_tokens_total", ("kind", "completion"), ("provider", "alpha")): 2,
        ("thinkstream_upstream_retries_total", ("provider", "beta"), ("reason", "503")): 1,
        ("thinkstream_upstream_errors_total", ("provider", "beta"), ("status", "503")): 1,
    }


async def test_the_demo_lists_every_model_it_accepts(aiohttp_client: Callable[..., Awaitable[Client]]) -> None:
    client = await aiohttp_client(create_app(load_config(["--models", "x,y"], {})))

    async with client.get("/models") as response:
        listing = await response.json()

    assert [(model["id"], model["provider"]) for model in listing["data"]] == [
        ("demo", "demo"),
        ("x", "demo"),
        ("y", "demo"),
    ]


async def test_readiness_with_a_check_asks_every_provider_and_names_the_one_that_fails(
    relay_from_file: Callable[..., Awaitable[Client]], alpha: FakeProvider, beta: FakeProvider
) -> None:
    # alpha answers GET /v1/models; beta does not (404).
    client = await relay_from_file(two_providers(alpha, beta), KEYS, "--ready-check", "true")

    async with client.get("/readyz") as response:
        assert response.status == 503
        assert await response.json() == {"status": "unavailable", "reason": "provider beta answered HTTP 404"}


async def test_the_pages_model_picker_groups_the_models_under_their_providers(
    tmp_path: Path, aiohttp_server: ServerFactory, alpha: FakeProvider, beta: FakeProvider, browser: Any
) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(two_providers(alpha, beta))
    server = await aiohttp_server(create_app(load_config(["--config", str(path)], KEYS)))
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        await page.goto(str(server.make_url("/")))
        await page.wait_for_selector("#model optgroup", state="attached", timeout=20_000)
        groups = await page.evaluate(
            """() => [...document.querySelectorAll('#model optgroup')].map(
                (group) => [group.label, [...group.querySelectorAll('option')].map((o) => [o.value, o.textContent])])"""
        )
    finally:
        await page.close()

    assert groups == [
        ["beta", [["", "beta-chat (default)"]]],
        ["alpha", [["alpha-reasoner", "alpha-reasoner"], ["alpha-qwq", "alpha-qwq"]]],
    ]
    assert errors == []


async def test_a_base_url_with_a_query_keeps_it_on_every_call(
    aiohttp_server: Callable[..., Awaitable[Any]], relay_to: RelayFactory
) -> None:
    # Azure's api-version, a gateway's key: the query belongs after /chat/completions, not inside it.
    seen: list[str] = []

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        seen.append(request.path_qs)
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(chunk(content="Hi"), chunk(finish="stop"), "[DONE]"))
        return response

    base = await serve_provider(aiohttp_server, chat_completions)
    client = await relay_to(base_url=base + "?api-version=2024-10-21", model="m")

    events = await collect(client, params={"prompt": "hi"})

    assert text_of(events, "content") == "Hi"
    assert seen == ["/v1/chat/completions?api-version=2024-10-21"]


def test_a_base_url_with_a_user_and_password_and_a_key_too_is_refused_at_start_up() -> None:
    with pytest.raises(ConfigError) as refused:
        Config(base_url="https://user:pw-333@gateway.example/v1", model="m", api_key="sk-key-1234567")

    assert "user:password@" in str(refused.value)
    assert "pw-333" not in str(refused.value)


async def test_a_failed_request_tells_neither_client_nor_log_the_base_urls_query(
    aiohttp_server: Callable[..., Awaitable[Any]], relay_to: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async def redirects_forever(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(location=str(request.rel_url))

    base = await serve_provider(aiohttp_server, redirects_forever)
    client = await relay_to(base_url=base + "?key=q-444", model="m")

    events = await collect(client, params={"prompt": "hi"})

    assert events[-1].event == "error"
    assert "redirected" in events[-1].data["message"]
    assert "q-444" not in str(events[-1].data) and "q-444" not in caplog.text
