"""Who may use the relay, and how much (issue 5): tokens, limits, client identity, models, CORS.

A relay holds a paid API key, so everything here is about keeping the
provider's bill in the operator's hands. Every refusal is a JSON error with
the contract's code, and every one of them happens before the provider hears
of the request: the fake provider's ``requests`` list is the witness.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from helpers import FakeProvider, RelayFactory, Reply, collect, eventually, parse_sse, transcript, types

from handlers.app import create_app
from handlers.config import Config
from handlers.keys import streams_key

Client = TestClient[web.Request, web.Application]

HELLO = [{"role": "user", "content": "hello"}]
TOKENS = ("tok-a", "tok-b")
ELSEWHERE = "https://elsewhere.example"
APP = "https://app.example"

# Rate limits count in windows aligned to the clock; just after a window ends, the
# sliding-window approximation lets one more request through. Hour-long windows make
# a test that straddles a boundary (and so flakes) as unlikely as can be.
THREE_AN_HOUR = "3/hour"
TWO_AN_HOUR = "2/hour"


def bearer(token: str, scheme: str = "Bearer") -> dict[str, str]:
    return {"Authorization": f"{scheme} {token}"}


async def error_code(response: ClientResponse) -> str:
    """The ``code`` of a JSON error answer, checking its shape on the way."""
    assert response.content_type == "application/json", await response.text()
    body = await response.json()
    assert set(body) == {"error"} and body["error"]["message"].strip(), body
    code: str = body["error"]["code"]
    return code


def retry_after(response: ClientResponse) -> int:
    """The ``Retry-After`` header, which must be a whole number of seconds, at least 1."""
    value = response.headers.get("Retry-After", "")
    assert value.isascii() and value.isdigit(), f"Retry-After is {value!r}"
    assert int(value) >= 1
    return int(value)


async def first_event(response: ClientResponse) -> dict[str, Any]:
    """Read one SSE event from an open stream (the ``meta`` event, when it is the first read)."""
    block = await response.content.readuntil(b"\n\n")
    (event,) = parse_sse(block)
    return event.data


@contextlib.asynccontextmanager
async def running_stream(client: Client, headers: Mapping[str, str] | None = None) -> AsyncIterator[str]:
    """A ``POST /stream`` whose generation runs (and holds its slot) while the block runs; yields its id.

    The stream is cancelled on the way out, so that the slow provider is let go
    now rather than holding up the test's teardown until its answer ends.
    """
    async with client.post("/stream", json={"messages": HELLO}, headers=headers) as response:
        assert response.status == 200, await response.text()
        meta = await first_event(response)
        assert meta["type"] == "meta"
        try:
            yield meta["stream"]
        finally:
            async with client.post(f"/stream/{meta['stream']}/cancel", headers=headers) as cancel:
                assert cancel.status == 200


@pytest.fixture
def answers(provider: FakeProvider) -> FakeProvider:
    """The fake provider, answering every request at once with a short complete answer."""
    provider.reply = Reply(transcript("openai_content.sse"))
    return provider


@pytest.fixture
def slow(provider: FakeProvider) -> FakeProvider:
    """The fake provider, taking several seconds over every answer: long enough to outlast a test."""
    provider.reply = Reply(transcript("openai_content.sse"), chunks=[8] * 200, delay=0.05)
    return provider


# Tokens.


@dataclass(frozen=True)
class Route:
    """An API route, and how to make a request to it that succeeds given a valid token."""

    method: str
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def names_a_stream(self) -> bool:
        return "{id}" in self.path


API_ROUTES = [
    pytest.param(Route("GET", "/stream", {"params": {"prompt": "hi"}}), id="GET /stream"),
    pytest.param(Route("POST", "/stream", {"json": {"messages": HELLO}}), id="POST /stream"),
    pytest.param(Route("GET", "/stream/{id}"), id="GET /stream/{id}"),
    pytest.param(Route("POST", "/stream/{id}/cancel"), id="POST /stream/{id}/cancel"),
    pytest.param(Route("DELETE", "/stream/{id}"), id="DELETE /stream/{id}"),
    pytest.param(Route("GET", "/models"), id="GET /models"),
    pytest.param(Route("GET", "/metrics"), id="GET /metrics"),
]


async def path_to(client: Client, route: Route, owner: Mapping[str, str] | None = None) -> str:
    """The route's path; one that names a stream names a real (finished) one, made with a valid token."""
    if not route.names_a_stream:
        return route.path
    events = await collect(client, "POST", json={"messages": HELLO}, headers=owner or bearer("tok-a"))
    return route.path.replace("{id}", events[0].data["stream"])


async def call(client: Client, route: Route, headers: Mapping[str, str] | None = None) -> ClientResponse:
    """Make the request and read its whole answer (a stream included, made with the same credentials)."""
    path = await path_to(client, route, headers)
    async with client.request(route.method, path, headers=headers, **route.kwargs) as response:
        await response.read()
        return response


@pytest.mark.parametrize("route", API_ROUTES)
async def test_every_api_route_refuses_a_request_without_a_token(
    relay_to: RelayFactory, answers: FakeProvider, route: Route
) -> None:
    client = await relay_to(tokens=TOKENS)
    path = await path_to(client, route)
    asked = len(answers.requests)

    async with client.request(route.method, path, **route.kwargs) as response:
        assert response.status == 401
        assert await error_code(response) == "unauthorized"
    assert len(answers.requests) == asked


@pytest.mark.parametrize("route", API_ROUTES)
async def test_every_api_route_refuses_a_wrong_token(
    relay_to: RelayFactory, answers: FakeProvider, route: Route
) -> None:
    client = await relay_to(tokens=TOKENS)
    path = await path_to(client, route)
    asked = len(answers.requests)

    async with client.request(route.method, path, headers=bearer("tok-c"), **route.kwargs) as response:
        assert response.status == 401
        assert await error_code(response) == "unauthorized"
    assert len(answers.requests) == asked


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
@pytest.mark.parametrize("route", API_ROUTES)
async def test_every_api_route_accepts_any_configured_token_whatever_the_case_of_bearer(
    relay_to: RelayFactory, answers: FakeProvider, route: Route, scheme: str
) -> None:
    client = await relay_to(tokens=TOKENS)

    response = await call(client, route, bearer("tok-b", scheme))

    assert response.status == 200


@pytest.mark.parametrize("route", API_ROUTES)
async def test_without_tokens_every_api_route_is_open(
    relay_to: RelayFactory, answers: FakeProvider, route: Route
) -> None:
    client = await relay_to()

    response = await call(client, route)

    assert response.status == 200


WRONG_CREDENTIALS = [
    pytest.param(bearer("tok-c"), {}, id="an unknown token"),
    pytest.param(bearer("tok-"), {}, id="a prefix of a token"),
    pytest.param(bearer("tok-aa"), {}, id="a token with more after it"),
    pytest.param(bearer("TOK-A"), {}, id="a token in the wrong case"),
    pytest.param(bearer("tok-a,tok-b"), {}, id="the token list itself"),
    pytest.param(bearer("", scheme="Bearer"), {}, id="Bearer with no token"),
    pytest.param(bearer("tok-a", scheme="Basic"), {}, id="a token under another scheme"),
    pytest.param({"Authorization": "tok-a"}, {}, id="a token without a scheme"),
    pytest.param({"X-Api-Key": "tok-a"}, {}, id="a token in another header"),
    pytest.param({}, {"access_token": "tok-c"}, id="an unknown access_token"),
    pytest.param({}, {"token": "tok-a"}, id="a token in another query parameter"),
]


@pytest.mark.parametrize(("headers", "params"), WRONG_CREDENTIALS)
async def test_only_an_exact_configured_token_opens_the_api(
    relay_to: RelayFactory, answers: FakeProvider, headers: dict[str, str], params: dict[str, str]
) -> None:
    client = await relay_to(tokens=TOKENS)

    async with client.get("/stream", params={"prompt": "hi", **params}, headers=headers) as response:
        assert response.status == 401
        assert await error_code(response) == "unauthorized"
    assert answers.requests == []


async def test_an_eventsource_may_send_its_token_as_access_token(relay_to: RelayFactory, answers: FakeProvider) -> None:
    client = await relay_to(tokens=TOKENS)

    events = await collect(client, params={"prompt": "hi", "access_token": "tok-a"})

    assert types(events)[-1] == "done"
    assert len(answers.requests) == 1


async def test_an_eventsource_may_resume_with_its_token_as_access_token(
    relay_to: RelayFactory, answers: FakeProvider
) -> None:
    client = await relay_to(tokens=TOKENS)
    first = await collect(client, params={"prompt": "hi", "access_token": "tok-a"})
    stream_id = first[0].data["stream"]

    again = await collect(client, path=f"/stream/{stream_id}", params={"access_token": "tok-a"})

    assert again == first


async def test_a_401_names_the_bearer_scheme_in_www_authenticate(relay_to: RelayFactory) -> None:
    # RFC 9110 §11.6.1: a 401 MUST carry a WWW-Authenticate challenge; RFC 6750 §3 gives Bearer's.
    client = await relay_to(tokens=TOKENS)

    async with client.get("/models") as response:
        assert response.status == 401
        assert response.headers.get("WWW-Authenticate", "").lower().startswith("bearer")


DEMO_ROUTES = [
    pytest.param("GET", "/demo/v1/models", {}, id="the demo model's model list"),
    pytest.param(
        "POST",
        "/demo/v1/chat/completions",
        {"json": {"model": "demo", "messages": HELLO, "stream": True}},
        id="the demo model's chat completions",
    ),
]
PUBLIC_ROUTES = [
    pytest.param("GET", "/", {}, id="the page"),
    pytest.param("GET", "/healthz", {}, id="GET /healthz"),
    pytest.param("GET", "/readyz", {}, id="GET /readyz"),
    # The demo model's routes are served only while no provider is configured.
    *DEMO_ROUTES,
]


def relay_serving(path: str, relay: RelayFactory, relay_to: RelayFactory) -> RelayFactory:
    """A relay that serves ``path``: on the demo model for its routes, else on the fake provider."""
    return relay if path.startswith("/demo/") else relay_to


@pytest.mark.parametrize(("method", "path", "kwargs"), PUBLIC_ROUTES)
async def test_public_routes_need_no_token(
    relay: RelayFactory, relay_to: RelayFactory, provider: FakeProvider, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    client = await relay_serving(path, relay, relay_to)(tokens=TOKENS)

    async with client.request(method, path, **kwargs) as response:
        await response.read()
        assert response.status == 200


@pytest.mark.parametrize(("method", "path", "kwargs"), PUBLIC_ROUTES)
async def test_public_routes_are_not_rate_limited(
    relay: RelayFactory, relay_to: RelayFactory, provider: FakeProvider, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    client = await relay_serving(path, relay, relay_to)(rate_limit="1/hour")

    for _ in range(3):
        async with client.request(method, path, **kwargs) as response:
            await response.read()
            assert response.status == 200


@pytest.mark.parametrize(("method", "path", "kwargs"), DEMO_ROUTES)
async def test_with_a_provider_configured_the_demo_model_is_not_served(
    relay_to: RelayFactory, provider: FakeProvider, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    # It needs no token and has no limits: with a real provider it would be a way around both.
    client = await relay_to(tokens=TOKENS)

    async with client.request(method, path, **kwargs) as response:
        assert response.status == 404
        assert await error_code(response) == "not_found"


async def test_the_demo_model_streams_to_a_client_with_a_token(relay: RelayFactory) -> None:
    # The relay calls its own demo route as its provider: that call carries no token, and needs none.
    client = await relay(tokens=TOKENS, rate_limit="1/hour")

    events = await collect(client, params={"prompt": "hi"}, headers=bearer("tok-a"))

    assert types(events)[0] == "meta" and types(events)[-1] == "done"


async def assets_of_the_page(client: Client) -> list[str]:
    """Load the page (with no token) and return the paths of the scripts and stylesheets it links to."""
    async with client.get("/") as page:
        assert page.status == 200
        assert page.content_type == "text/html"
        html = await page.text()
    assets = re.findall(r'(?:src|href)="(static/[^"]+)"', html)
    assert assets, "the page links to no static file"
    return ["/" + asset for asset in assets]


async def test_the_page_and_its_assets_load_without_a_token(relay_to: RelayFactory) -> None:
    client = await relay_to(tokens=TOKENS)

    for asset in await assets_of_the_page(client):
        async with client.get(asset) as response:
            assert response.status == 200, asset


async def test_the_page_and_its_assets_are_not_rate_limited(relay_to: RelayFactory) -> None:
    client = await relay_to(rate_limit="1/hour")

    for _ in range(2):
        for asset in await assets_of_the_page(client):
            async with client.get(asset) as response:
                assert response.status == 200, asset


@pytest.mark.parametrize("route", API_ROUTES)
async def test_a_cors_preflight_needs_no_token(relay_to: RelayFactory, answers: FakeProvider, route: Route) -> None:
    client = await relay_to(tokens=TOKENS, cors_origins=(APP,))
    path = await path_to(client, route)
    preflight = {"Origin": APP, "Access-Control-Request-Method": route.method}

    async with client.options(
        path, headers={**preflight, "Access-Control-Request-Headers": "authorization"}
    ) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == APP


async def test_without_cors_a_preflight_is_refused_but_not_for_want_of_a_token(relay_to: RelayFactory) -> None:
    client = await relay_to(tokens=TOKENS)

    async with client.options("/stream", headers={"Origin": APP, "Access-Control-Request-Method": "POST"}) as response:
        assert response.status == 405


# A stream belongs to the token that started it.

STREAM_ROUTES = [r for r in API_ROUTES if r.values[0].names_a_stream]


@pytest.mark.parametrize("route", STREAM_ROUTES)
async def test_another_token_gets_404_for_a_stream_as_if_it_did_not_exist(
    relay_to: RelayFactory, answers: FakeProvider, route: Route
) -> None:
    client = await relay_to(tokens=TOKENS)
    path = await path_to(client, route, owner=bearer("tok-a"))
    stream_id = path.split("/")[2]
    missing = path.replace(stream_id, "A" * len(stream_id))

    async with client.request(route.method, path, headers=bearer("tok-b"), **route.kwargs) as response:
        assert response.status == 404
        refusal = (await response.json())["error"]
    async with client.request(route.method, missing, headers=bearer("tok-b"), **route.kwargs) as response:
        nothing = (await response.json())["error"]

    assert refusal["code"] == nothing["code"] == "stream_not_found"
    assert refusal["message"].replace(stream_id, "X") == nothing["message"].replace("A" * len(stream_id), "X")


async def test_another_token_cannot_cancel_a_running_stream(relay_to: RelayFactory, slow: FakeProvider) -> None:
    client = await relay_to(tokens=TOKENS)
    async with running_stream(client, bearer("tok-a")) as stream_id:
        async with client.post(f"/stream/{stream_id}/cancel", headers=bearer("tok-b")) as refused:
            assert refused.status == 404
        assert client.app[streams_key].get(stream_id).running


async def test_the_token_that_started_a_stream_resumes_it_with_last_event_id(
    relay_to: RelayFactory, answers: FakeProvider
) -> None:
    client = await relay_to(tokens=TOKENS)
    events = await collect(client, "POST", json={"messages": HELLO}, headers=bearer("tok-b"))

    async with client.get(
        f"/stream/{events[0].data['stream']}", headers={**bearer("tok-b"), "Last-Event-ID": events[1].id}
    ) as response:
        assert response.status == 200
        assert [e.id for e in parse_sse(await response.read())] == [e.id for e in events[2:]]


async def test_an_eventsource_reconnect_from_another_token_gets_404(
    relay_to: RelayFactory, answers: FakeProvider
) -> None:
    client = await relay_to(tokens=TOKENS)
    events = await collect(client, params={"prompt": "hi", "access_token": "tok-a"})

    async with client.get(
        "/stream", params={"prompt": "hi", "access_token": "tok-b"}, headers={"Last-Event-ID": events[1].id}
    ) as response:
        assert response.status == 404
    assert len(answers.requests) == 1, "a refused reconnect never becomes a new generation"


async def test_without_tokens_any_client_may_resume_and_cancel_a_stream(
    relay_to: RelayFactory, slow: FakeProvider
) -> None:
    # Behind a trusted proxy each forwarded address is its own client; without tokens, none owns a stream.
    client = await relay_to(trusted_proxies=("127.0.0.1",))
    started = await client.post("/stream", json={"messages": HELLO}, headers={"X-Forwarded-For": "192.0.2.1"})
    stream_id = (await first_event(started))["stream"]

    async with client.get(f"/stream/{stream_id}", headers={"X-Forwarded-For": "192.0.2.2"}) as resumed:
        assert resumed.status == 200
        assert (await first_event(resumed))["type"] == "meta"
    async with client.post(f"/stream/{stream_id}/cancel", headers={"X-Forwarded-For": "192.0.2.3"}) as cancel:
        assert await cancel.json() == {"stream": stream_id, "cancelled": True}
    started.close()


# Limits on what one request may ask for.


@dataclass(frozen=True)
class Ask:
    """One request against a relay with some limit set low."""

    settings: dict[str, Any]
    method: str
    kwargs: dict[str, Any]


def padded_body(size: int) -> bytes:
    """A valid chat request of exactly ``size`` bytes."""
    bare = orjson.dumps({"messages": [{"role": "user", "content": ""}]})
    return orjson.dumps({"messages": [{"role": "user", "content": "x" * (size - len(bare))}]})


def messages(count: int) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(count)]


def texts(*contents: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content} for content in contents]


def post(settings: dict[str, Any], body: Any) -> Ask:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return Ask(settings, "POST", {"data": data, "headers": {"Content-Type": "application/json"}})


def get(settings: dict[str, Any], **params: str) -> Ask:
    return Ask(settings, "GET", {"params": params})


OVER_A_LIMIT = [
    pytest.param(
        post({"max_body_bytes": 1024}, padded_body(1025)),
        413,
        "body_too_large",
        id="a body one byte over max_body_bytes",
    ),
    pytest.param(
        post({"max_messages": 3}, {"messages": messages(4)}),
        400,
        "too_many_messages",
        id="one message over max_messages",
    ),
    pytest.param(
        get({"max_messages": 1}, prompt="hi", system="be brief"),
        400,
        "too_many_messages",
        id="a GET's system prompt counts as a message",
    ),
    pytest.param(
        post({"max_chars": 10}, {"messages": texts("x" * 11)}), 400, "too_much_text", id="one message over max_chars"
    ),
    pytest.param(
        post({"max_chars": 10}, {"messages": texts("x" * 6, "x" * 5)}),
        400,
        "too_much_text",
        id="messages each under max_chars but together over it",
    ),
    pytest.param(get({"max_chars": 10}, prompt="x" * 11), 400, "too_much_text", id="a GET prompt over max_chars"),
    pytest.param(
        get({"max_chars": 10}, prompt="x" * 5, system="y" * 6),
        400,
        "too_much_text",
        id="a GET prompt and system together over max_chars",
    ),
]

AT_A_LIMIT = [
    pytest.param(post({"max_body_bytes": 1024}, padded_body(1024)), id="a body of exactly max_body_bytes"),
    pytest.param(post({"max_messages": 3}, {"messages": messages(3)}), id="exactly max_messages messages"),
    pytest.param(
        get({"max_messages": 2}, prompt="hi", system="be brief"), id="a GET prompt and system at max_messages"
    ),
    pytest.param(post({"max_chars": 10}, {"messages": texts("x" * 5, "x" * 5)}), id="exactly max_chars characters"),
    pytest.param(get({"max_chars": 10}, prompt="x" * 5, system="y" * 5), id="a GET prompt and system at max_chars"),
]


@pytest.mark.parametrize(("ask", "status", "code"), OVER_A_LIMIT)
async def test_a_request_over_a_size_limit_is_refused_before_the_provider_hears_of_it(
    relay_to: RelayFactory, answers: FakeProvider, ask: Ask, status: int, code: str
) -> None:
    client = await relay_to(**ask.settings)

    async with client.request(ask.method, "/stream", **ask.kwargs) as response:
        assert response.status == status
        assert await error_code(response) == code
    assert answers.requests == []


@pytest.mark.parametrize("ask", AT_A_LIMIT)
async def test_a_request_at_a_size_limit_is_relayed(relay_to: RelayFactory, answers: FakeProvider, ask: Ask) -> None:
    client = await relay_to(**ask.settings)

    events = await collect(client, ask.method, **ask.kwargs)

    assert types(events)[-1] == "done"
    assert len(answers.requests) == 1


# Limits on concurrent generations.


async def test_over_max_streams_the_server_is_busy_with_retry_after(relay_to: RelayFactory, slow: FakeProvider) -> None:
    client = await relay_to(tokens=("tok-a", "tok-b", "tok-c"), max_streams=2)

    async with running_stream(client, bearer("tok-a")), running_stream(client, bearer("tok-b")):
        await eventually(lambda: len(slow.requests) == 2, "both streams reached the provider")

        async with client.post("/stream", json={"messages": HELLO}, headers=bearer("tok-c")) as third:
            assert third.status == 503
            assert await error_code(third) == "server_busy"
            retry_after(third)
        assert len(slow.requests) == 2


async def test_a_client_over_client_streams_gets_429_with_retry_after(
    relay_to: RelayFactory, slow: FakeProvider
) -> None:
    client = await relay_to(tokens=TOKENS, client_streams=1)

    async with running_stream(client, bearer("tok-a")):
        await eventually(lambda: len(slow.requests) == 1, "the first stream reached the provider")

        async with client.post("/stream", json={"messages": HELLO}, headers=bearer("tok-a")) as second:
            assert second.status == 429
            assert await error_code(second) == "too_many_streams"
            retry_after(second)
        assert len(slow.requests) == 1


async def test_a_client_at_its_stream_limit_does_not_hold_back_another(
    relay_to: RelayFactory, slow: FakeProvider
) -> None:
    client = await relay_to(tokens=TOKENS, client_streams=1)

    async with running_stream(client, bearer("tok-a")), running_stream(client, bearer("tok-b")):
        await eventually(lambda: len(slow.requests) == 2, "both clients' streams reached the provider")


async def test_without_tokens_one_address_is_one_client_for_stream_limits(
    relay_to: RelayFactory, slow: FakeProvider
) -> None:
    client = await relay_to(client_streams=1)

    async with running_stream(client), client.post("/stream", json={"messages": HELLO}) as second:
        assert second.status == 429
        assert await error_code(second) == "too_many_streams"


@pytest.mark.parametrize(
    "limit", [{"client_streams": 1}, {"max_streams": 1}], ids=["client_streams=1", "max_streams=1"]
)
async def test_a_stream_that_ends_frees_its_slot(
    relay_to: RelayFactory, answers: FakeProvider, limit: dict[str, int]
) -> None:
    client = await relay_to(**limit)
    first = await collect(client, "POST", json={"messages": HELLO})
    assert types(first)[-1] == "done"

    second = await collect(client, "POST", json={"messages": HELLO})

    assert types(second)[-1] == "done"


@pytest.mark.parametrize(
    "limit", [{"client_streams": 1}, {"max_streams": 1}], ids=["client_streams=1", "max_streams=1"]
)
async def test_a_cancelled_stream_frees_its_slot(
    relay_to: RelayFactory, slow: FakeProvider, limit: dict[str, int]
) -> None:
    client = await relay_to(**limit)
    async with running_stream(client) as first:
        async with client.post(f"/stream/{first}/cancel") as cancel:
            assert await cancel.json() == {"stream": first, "cancelled": True}

        async with running_stream(client) as second:
            assert second != first


# The request rate.


async def test_a_client_over_its_rate_limit_gets_429_with_retry_after(
    relay_to: RelayFactory, answers: FakeProvider
) -> None:
    client = await relay_to(tokens=TOKENS, rate_limit=THREE_AN_HOUR)
    for _ in range(3):
        async with client.get("/models", headers=bearer("tok-a")) as response:
            assert response.status == 200

    async with client.post("/stream", json={"messages": HELLO}, headers=bearer("tok-a")) as fourth:
        assert fourth.status == 429
        assert await error_code(fourth) == "rate_limited"
        assert retry_after(fourth) <= 3600
    assert answers.requests == []


async def test_a_client_over_its_rate_limit_does_not_hold_back_another(
    relay_to: RelayFactory, answers: FakeProvider
) -> None:
    client = await relay_to(tokens=TOKENS, rate_limit=THREE_AN_HOUR)
    for _ in range(4):
        async with client.get("/models", headers=bearer("tok-a")):
            pass

    events = await collect(client, "POST", json={"messages": HELLO}, headers=bearer("tok-b"))

    assert types(events)[-1] == "done"


async def test_every_api_request_counts_towards_the_rate(relay_to: RelayFactory, answers: FakeProvider) -> None:
    client = await relay_to(rate_limit=THREE_AN_HOUR)
    stream_id = (await collect(client, params={"prompt": "hi"}))[0].data["stream"]
    async with client.get(f"/stream/{stream_id}") as resumed:
        await resumed.read()
    async with client.get("/metrics") as metrics:
        assert metrics.status == 200

    async with client.get("/models") as fourth:
        assert fourth.status == 429
        assert await error_code(fourth) == "rate_limited"


# Who the client is.


async def test_without_trusted_proxies_x_forwarded_for_is_ignored(
    relay_to: RelayFactory, answers: FakeProvider
) -> None:
    client = await relay_to(rate_limit=TWO_AN_HOUR)
    for i in (1, 2):
        async with client.get("/models", headers={"X-Forwarded-For": f"203.0.113.{i}"}) as response:
            assert response.status == 200

    async with client.get("/models", headers={"X-Forwarded-For": "203.0.113.3"}) as third:
        assert third.status == 429
        assert await error_code(third) == "rate_limited"


async def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(relay_to: RelayFactory, answers: FakeProvider) -> None:
    # The test client connects from 127.0.0.1, which is not among these proxies.
    client = await relay_to(rate_limit=TWO_AN_HOUR, trusted_proxies=("10.0.0.0/8",))
    for i in (1, 2):
        async with client.get("/models", headers={"X-Forwarded-For": f"203.0.113.{i}"}) as response:
            assert response.status == 200

    async with client.get("/models", headers={"X-Forwarded-For": "203.0.113.3"}) as third:
        assert third.status == 429


async def test_behind_a_trusted_proxy_each_forwarded_address_is_its_own_client(
    relay_to: RelayFactory, answers: FakeProvider
) -> None:
    client = await relay_to(rate_limit=TWO_AN_HOUR, trusted_proxies=("127.0.0.1",))
    one = {"X-Forwarded-For": "203.0.113.1"}
    for _ in range(2):
        async with client.get("/models", headers=one) as response:
            assert response.status == 200
    async with client.get("/models", headers=one) as third:
        assert third.status == 429

    async with client.get("/models", headers={"X-Forwarded-For": "203.0.113.2"}) as other:
        assert other.status == 200


@pytest.mark.parametrize(
    ("settings", "neighbour_limited"),
    [
        pytest.param({}, True, id="by their /64, by default"),
        pytest.param({"ipv6_prefix": 48}, True, id="by their /48"),
        pytest.param({"ipv6_prefix": 128}, False, id="by their whole address, with a prefix of 128"),
    ],
)
async def test_ipv6_clients_are_told_apart_by_their_network_prefix(
    relay_to: RelayFactory, answers: FakeProvider, settings: dict[str, Any], neighbour_limited: bool
) -> None:
    # One IPv6 host commonly has a whole /64 to itself: each of its addresses must not bring a fresh allowance.
    client = await relay_to(rate_limit=TWO_AN_HOUR, trusted_proxies=("127.0.0.1",), **settings)
    for address in ("2001:db8:0:1::1", "2001:db8:0:1:aaaa:bbbb:cccc:dddd"):
        async with client.get("/models", headers={"X-Forwarded-For": address}) as response:
            assert response.status == 200

    async with client.get("/models", headers={"X-Forwarded-For": "2001:db8:0:1::2"}) as neighbour:
        assert (neighbour.status == 429) is neighbour_limited
    async with client.get("/models", headers={"X-Forwarded-For": "2001:db8:ffff:2::1"}) as other_network:
        assert other_network.status == 200


async def test_an_ipv4_address_in_ipv6_form_is_the_ipv4_client(relay_to: RelayFactory, answers: FakeProvider) -> None:
    client = await relay_to(rate_limit=TWO_AN_HOUR, trusted_proxies=("127.0.0.1",))
    for address in ("203.0.113.7", "::ffff:203.0.113.7"):
        async with client.get("/models", headers={"X-Forwarded-For": address}) as response:
            assert response.status == 200

    async with client.get("/models", headers={"X-Forwarded-For": "::ffff:203.0.113.7"}) as third:
        assert third.status == 429
    async with client.get("/models", headers={"X-Forwarded-For": "203.0.113.8"}) as other:
        assert other.status == 200


async def test_a_trusted_proxy_in_ipv6_form_is_trusted_all_the_same(
    relay_to: RelayFactory, answers: FakeProvider
) -> None:
    # A proxy on a dual-stack socket shows as ::ffff:a.b.c.d, in the peer address and in the hops it adds.
    client = await relay_to(rate_limit=TWO_AN_HOUR, trusted_proxies=("127.0.0.1", "10.0.0.0/8"))
    for i in (1, 2):
        async with client.get("/models", headers={"X-Forwarded-For": f"203.0.113.{i}, ::ffff:10.0.0.2"}) as response:
            assert response.status == 200

    # Its second request: were the proxy's hop taken for the client, this would be the third of one client.
    async with client.get("/models", headers={"X-Forwarded-For": "203.0.113.1, ::ffff:10.0.0.2"}) as again:
        assert again.status == 200


async def test_a_trusted_proxy_reaching_a_dual_stack_socket_is_trusted(answers: FakeProvider) -> None:
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
    except OSError:
        pytest.skip("this machine has no dual-stack IPv6 sockets")
    app = create_app(Config(base_url=answers.base_url, model="m", trusted_proxies=("127.0.0.1",), rate_limit="1/hour"))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        async with aiohttp.ClientSession() as session:
            statuses = []
            for i in (1, 2):
                url = f"http://127.0.0.1:{sock.getsockname()[1]}/models"
                async with session.get(url, headers={"X-Forwarded-For": f"203.0.113.{i}"}) as response:
                    statuses.append(response.status)
    finally:
        await runner.cleanup()

    assert statuses == [200, 200], "two clients behind the proxy, one request each"


SPOOFED = [
    pytest.param(
        lambda spoof: {"X-Forwarded-For": f"{spoof}, 203.0.113.1"},
        id="a spoofed hop before the proxy's own",
    ),
    pytest.param(
        lambda spoof: {"X-Forwarded-For": f"{spoof}, 203.0.113.1, 10.0.0.2"},
        id="a spoofed hop before two trusted proxies' hops",
    ),
    pytest.param(
        lambda spoof: [("X-Forwarded-For", spoof), ("X-Forwarded-For", "203.0.113.1")],
        id="a spoofed hop in an earlier header line",
    ),
]


@pytest.mark.parametrize("forwarded", SPOOFED)
async def test_behind_trusted_proxies_the_right_most_untrusted_hop_is_the_client(
    relay_to: RelayFactory, answers: FakeProvider, forwarded: Callable[[str], Any]
) -> None:
    client = await relay_to(rate_limit=TWO_AN_HOUR, trusted_proxies=("127.0.0.1", "10.0.0.0/8"))
    for spoof in ("198.51.100.1", "198.51.100.2"):
        async with client.get("/models", headers=forwarded(spoof)) as response:
            assert response.status == 200

    async with client.get("/models", headers=forwarded("198.51.100.3")) as third:
        assert third.status == 429


async def test_with_tokens_the_token_is_the_client_wherever_it_comes_from(
    relay_to: RelayFactory, answers: FakeProvider
) -> None:
    client = await relay_to(tokens=TOKENS, rate_limit=TWO_AN_HOUR, trusted_proxies=("127.0.0.1",))
    for i in (1, 2):
        async with client.get("/models", headers={**bearer("tok-a"), "X-Forwarded-For": f"203.0.113.{i}"}) as response:
            assert response.status == 200

    async with client.get("/models", headers={**bearer("tok-a"), "X-Forwarded-For": "203.0.113.3"}) as third:
        assert third.status == 429


def client_in_log(caplog: pytest.LogCaptureFixture) -> str:
    """The ``client=`` of the one ``stream ended`` log line."""
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stream ended")]
    fields = dict(part.partition("=")[::2] for part in line.removeprefix("stream ended ").split(" "))
    return fields["client"]


async def test_the_stream_log_names_a_token_client_by_fingerprint_only(
    relay_to: RelayFactory, answers: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await relay_to(tokens=("tok-secret-1",))

    await collect(client, params={"prompt": "hi", "access_token": "tok-secret-1"})

    assert client_in_log(caplog) == "token:" + hashlib.sha256(b"tok-secret-1").hexdigest()[:12]
    # The test server's own access log (aiohttp.access) shows request lines; server.py turns it off.
    relay_lines = [r.getMessage() for r in caplog.records if r.name.startswith("handlers")]
    assert relay_lines and not any("tok-secret-1" in line for line in relay_lines)


@pytest.mark.parametrize(
    ("trusted", "forwarded", "expected"),
    [
        pytest.param((), "203.0.113.9", "127.0.0.1", id="the peer, when no proxy is trusted"),
        pytest.param(("127.0.0.1",), "203.0.113.9", "203.0.113.9", id="the forwarded address, from a trusted proxy"),
        pytest.param(("127.0.0.1",), "2001:db8:0:1::9", "2001:db8:0:1::/64", id="an IPv6 client, by its /64"),
    ],
)
async def test_the_stream_log_names_an_anonymous_client_by_address(
    relay_to: RelayFactory,
    answers: FakeProvider,
    caplog: pytest.LogCaptureFixture,
    trusted: tuple[str, ...],
    forwarded: str,
    expected: str,
) -> None:
    caplog.set_level(logging.INFO)
    client = await relay_to(trusted_proxies=trusted)

    await collect(client, params={"prompt": "hi"}, headers={"X-Forwarded-For": forwarded})

    assert client_in_log(caplog) == expected


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_an_undecodable_x_forwarded_for_from_a_trusted_proxy_names_the_proxy_and_the_stream_runs(
    relay_to: RelayFactory,
    answers: FakeProvider,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
    store: str,
) -> None:
    # Header text never names a client: it would reach the log and, with Redis, its keys.
    caplog.set_level(logging.INFO)
    shared = request.getfixturevalue("redis_settings") if store == "redis" else {}
    client = await relay_to(trusted_proxies=("127.0.0.1",), **shared)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            b"GET /stream?prompt=hi HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-For: \xff\xfe\xfd\r\n"
            b"Connection: close\r\n\r\n"
        )
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()

    assert answer.startswith(b"HTTP/1.1 200") and b"event: done" in answer
    assert client_in_log(caplog) == "127.0.0.1"


async def test_a_forwarded_address_with_a_port_is_that_address(
    relay_to: RelayFactory, answers: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    # Some gateways write "ip:port": each source port must not be a client of its own.
    caplog.set_level(logging.INFO)
    client = await relay_to(trusted_proxies=("127.0.0.1",))

    await collect(client, params={"prompt": "hi"}, headers={"X-Forwarded-For": "203.0.113.9:51234"})

    assert client_in_log(caplog) == "203.0.113.9"


async def test_an_authorization_header_that_is_not_utf8_is_a_401(relay_to: RelayFactory, answers: FakeProvider) -> None:
    client = await relay_to(tokens=TOKENS)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            b"GET /models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n"
        )
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()

    assert answer.startswith(b"HTTP/1.1 401")


# Models, and where the relay connects.


async def test_models_lists_the_default_first_then_the_extra_ones(relay_to: RelayFactory) -> None:
    client = await relay_to(model="test-model", models=("extra-1", "test-model", "extra-2"))

    async with client.get("/models") as response:
        listed = await response.json()

    assert listed == {
        "object": "list",
        "data": [
            {"id": "test-model", "default": True, "provider": "127.0.0.1"},
            {"id": "extra-1", "default": False, "provider": "127.0.0.1"},
            {"id": "extra-2", "default": False, "provider": "127.0.0.1"},
        ],
    }


async def test_the_demo_relay_offers_only_the_demo_model(relay: RelayFactory) -> None:
    client = await relay()

    async with client.get("/models") as response:
        assert await response.json() == {
            "object": "list",
            "data": [{"id": "demo", "default": True, "provider": "demo"}],
        }


CHOOSE_A_MODEL = [
    pytest.param(lambda model: get({}, prompt="hi", model=model), id="GET"),
    pytest.param(lambda model: post({}, {"messages": HELLO, "model": model}), id="POST"),
]


@pytest.mark.parametrize("model", ["gpt-5", "Extra-1", "extra-1 ", "http://evil.example/v1"])
@pytest.mark.parametrize("ask", CHOOSE_A_MODEL)
async def test_a_model_outside_the_allow_list_is_refused_before_the_provider_hears_of_it(
    relay_to: RelayFactory, answers: FakeProvider, ask: Callable[[str], Ask], model: str
) -> None:
    client = await relay_to(models=("extra-1",))
    request = ask(model)

    async with client.request(request.method, "/stream", **request.kwargs) as response:
        assert response.status == 400
        assert await error_code(response) == "model_not_allowed"
    assert answers.requests == []


@pytest.mark.parametrize("ask", CHOOSE_A_MODEL)
async def test_a_model_on_the_allow_list_is_forwarded(
    relay_to: RelayFactory, answers: FakeProvider, ask: Callable[[str], Ask]
) -> None:
    client = await relay_to(models=("extra-1", "extra-2"))
    request = ask("extra-2")

    events = await collect(client, request.method, **request.kwargs)

    assert events[0].data["model"] == "extra-2"
    assert [r["model"] for r in answers.requests] == ["extra-2"]


@pytest.mark.parametrize("name", ["base_url", "api_base", "api_key", "url", "endpoint"])
async def test_a_post_naming_where_to_connect_is_refused(
    relay_to: RelayFactory, answers: FakeProvider, name: str
) -> None:
    client = await relay_to()

    body = {"messages": HELLO, name: "http://127.0.0.1:9/v1"}
    async with client.post("/stream", json=body) as response:
        assert response.status == 400
        assert await error_code(response) == "invalid_request"
    assert answers.requests == []


async def test_a_get_naming_where_to_connect_still_goes_to_the_configured_provider(
    relay_to: RelayFactory,
    answers: FakeProvider,
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
) -> None:
    elsewhere = FakeProvider(reply=Reply(transcript("openai_content.sse")))
    app = web.Application()
    app.router.add_post("/v1/chat/completions", elsewhere.chat_completions)
    elsewhere.base_url = str((await aiohttp_server(app)).make_url("/v1"))
    client = await relay_to()

    params = {"prompt": "hi", "base_url": elsewhere.base_url, "api_base": elsewhere.base_url}
    events = await collect(client, params=params)

    assert types(events)[-1] == "done"
    assert (len(answers.requests), len(elsewhere.requests)) == (1, 0)


# CORS.


def preflight(origin: str, method: str = "POST", headers: str = "content-type, authorization") -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers}


def header_set(value: str) -> set[str]:
    return {part.strip().lower() for part in value.split(",") if part.strip()}


async def test_cors_is_off_by_default_so_a_preflight_is_refused(relay_to: RelayFactory) -> None:
    client = await relay_to()

    async with client.options("/stream", headers=preflight(ELSEWHERE)) as response:
        assert response.status >= 400
        assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize("origin", [APP, ELSEWHERE])
async def test_cors_is_off_by_default_so_pages_of_other_origins_are_refused_and_allowed_no_origin(
    relay_to: RelayFactory, answers: FakeProvider, origin: str
) -> None:
    client = await relay_to()

    async with client.get("/models", headers={"Origin": origin}) as listed:
        assert listed.status == 403
        assert "Access-Control-Allow-Origin" not in listed.headers
    async with client.post("/stream", json={"messages": HELLO}, headers={"Origin": origin}) as streamed:
        assert streamed.status == 403
        assert "Access-Control-Allow-Origin" not in streamed.headers
    assert answers.requests == []


async def test_a_listed_origin_may_post_a_stream_with_a_token(relay_to: RelayFactory, answers: FakeProvider) -> None:
    client = await relay_to(tokens=TOKENS, cors_origins=(APP,))

    async with client.options("/stream", headers=preflight(APP)) as allowed:
        assert allowed.status == 200
        assert allowed.headers["Access-Control-Allow-Origin"] == APP
        assert "post" in header_set(allowed.headers["Access-Control-Allow-Methods"])
        assert {"content-type", "authorization"} <= header_set(allowed.headers["Access-Control-Allow-Headers"])
    async with client.post("/stream", json={"messages": HELLO}, headers={"Origin": APP, **bearer("tok-a")}) as actual:
        events = parse_sse(await actual.read())
        assert actual.status == 200
        assert actual.headers["Access-Control-Allow-Origin"] == APP
    assert types(events)[-1] == "done"


@pytest.mark.parametrize("listed", ["https://App.Example/", "https://app.example:443"])
async def test_a_listed_origin_is_matched_as_browsers_send_it(
    relay_to: RelayFactory, answers: FakeProvider, listed: str
) -> None:
    client = await relay_to(cors_origins=(listed,))

    async with client.get("/models", headers={"Origin": APP, "Sec-Fetch-Site": "cross-site"}) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == APP


async def test_a_listed_origin_can_read_a_refusal(relay_to: RelayFactory, answers: FakeProvider) -> None:
    # Without Access-Control-Allow-Origin on the 401 the page could not tell its user what went wrong.
    client = await relay_to(tokens=TOKENS, cors_origins=(APP,))

    async with client.post("/stream", json={"messages": HELLO}, headers={"Origin": APP}) as refused:
        assert refused.status == 401
        assert refused.headers["Access-Control-Allow-Origin"] == APP


async def test_a_listed_origin_can_read_retry_after(relay_to: RelayFactory, answers: FakeProvider) -> None:
    # Retry-After is not a CORS-safelisted response header: a cross-origin page sees it only if exposed.
    client = await relay_to(cors_origins=(APP,), rate_limit="1/hour")
    async with client.get("/models", headers={"Origin": APP}):
        pass

    async with client.get("/models", headers={"Origin": APP}) as limited:
        assert limited.status == 429
        retry_after(limited)
        assert "retry-after" in header_set(limited.headers.get("Access-Control-Expose-Headers", ""))


async def test_an_unlisted_origin_is_refused(relay_to: RelayFactory, answers: FakeProvider) -> None:
    client = await relay_to(cors_origins=(APP,))

    async with client.options("/stream", headers=preflight(ELSEWHERE)) as refused:
        assert refused.status == 403
        assert "Access-Control-Allow-Origin" not in refused.headers
    async with client.post("/stream", json={"messages": HELLO}, headers={"Origin": ELSEWHERE}) as actual:
        assert actual.status == 403
        assert "Access-Control-Allow-Origin" not in actual.headers
    assert answers.requests == []


async def test_a_preflight_for_a_header_the_api_does_not_take_is_refused(relay_to: RelayFactory) -> None:
    client = await relay_to(cors_origins=(APP,))

    async with client.options("/stream", headers=preflight(APP, headers="content-type, x-provider-url")) as refused:
        assert refused.status == 403
        assert "Access-Control-Allow-Origin" not in refused.headers


@pytest.mark.parametrize(
    ("credentials", "expected"),
    [pytest.param(False, None, id="not allowed by default"), pytest.param(True, "true", id="allowed when asked for")],
)
async def test_cors_credentials_are_allowed_only_when_configured(
    relay_to: RelayFactory, answers: FakeProvider, credentials: bool, expected: str | None
) -> None:
    client = await relay_to(cors_origins=(APP,), cors_credentials=credentials)

    async with client.options("/stream", headers=preflight(APP)) as allowed:
        assert allowed.status == 200
        assert allowed.headers.get("Access-Control-Allow-Credentials") == expected
    async with client.post("/stream", json={"messages": HELLO}, headers={"Origin": APP}) as actual:
        await actual.read()
        assert actual.headers.get("Access-Control-Allow-Credentials") == expected


# A web page of another origin must not spend the key: neither by a request a browser sends without asking
# (a form's POST, a text/plain fetch, an <img>), nor by a name rebound to 127.0.0.1 (DNS rebinding).

CROSS_SITE = {"Origin": ELSEWHERE, "Sec-Fetch-Site": "cross-site"}


@pytest.mark.parametrize(
    "content_type",
    [
        pytest.param("text/plain", id="text/plain"),
        pytest.param("application/x-www-form-urlencoded", id="a form"),
        pytest.param("multipart/form-data; boundary=x", id="a multipart form"),
        pytest.param(None, id="no content type"),
    ],
)
async def test_a_post_stream_body_that_is_not_declared_json_is_refused_with_415(
    relay_to: RelayFactory, answers: FakeProvider, content_type: str | None
) -> None:
    client = await relay_to()
    headers = {"Content-Type": content_type} if content_type else {}
    # skip_auto_headers: without it aiohttp's client would call the bytes application/octet-stream.
    async with client.post(
        "/stream", data=orjson.dumps({"messages": HELLO}), headers=headers, skip_auto_headers=["Content-Type"]
    ) as response:
        assert response.status == 415
        assert await error_code(response) == "unsupported_media_type"
    assert answers.requests == []


async def test_a_json_content_type_with_a_charset_is_json(relay_to: RelayFactory, answers: FakeProvider) -> None:
    client = await relay_to()
    headers = {"Content-Type": "application/json; charset=utf-8"}

    events = await collect(client, "POST", data=orjson.dumps({"messages": HELLO}), headers=headers)

    assert types(events)[-1] == "done"


@pytest.mark.parametrize(
    ("method", "headers", "kwargs"),
    [
        pytest.param(
            "POST",
            {**CROSS_SITE, "Content-Type": "text/plain"},
            {"data": orjson.dumps({"messages": HELLO})},
            id="a text/plain POST from a modern browser",
        ),
        pytest.param("POST", CROSS_SITE, {"json": {"messages": HELLO}}, id="a JSON POST from a modern browser"),
        pytest.param(
            "GET", {"Sec-Fetch-Site": "cross-site"}, {"params": {"prompt": "hi"}}, id="an <img> GET (no Origin)"
        ),
        pytest.param(
            "GET", {"Sec-Fetch-Site": "same-site"}, {"params": {"prompt": "hi"}}, id="an <img> GET from a sibling site"
        ),
        pytest.param(
            "POST", {"Origin": ELSEWHERE}, {"json": {"messages": HELLO}}, id="a POST from a browser without Sec-Fetch"
        ),
        pytest.param("GET", {"Origin": "null"}, {"params": {"prompt": "hi"}}, id="a sandboxed page (Origin: null)"),
        pytest.param("GET", {"Origin": "http://["}, {"params": {"prompt": "hi"}}, id="an Origin that is no URL"),
        pytest.param("GET", {"Origin": "http://a:99999"}, {"params": {"prompt": "hi"}}, id="an Origin past port 65535"),
        pytest.param("GET", {"Origin": "http://xn--"}, {"params": {"prompt": "hi"}}, id="an Origin of a bad IDNA name"),
    ],
)
async def test_a_page_of_another_origin_is_refused_with_403_before_the_provider_hears_of_it(
    relay_to: RelayFactory, answers: FakeProvider, method: str, headers: dict[str, str], kwargs: dict[str, Any]
) -> None:
    client = await relay_to()

    async with client.request(method, "/stream", headers=headers, **kwargs) as response:
        assert response.status == 403
        assert await error_code(response) == "origin_not_allowed"
    assert answers.requests == []


@pytest.mark.parametrize("route", API_ROUTES)
async def test_every_api_route_refuses_a_page_of_another_origin(
    relay_to: RelayFactory, answers: FakeProvider, route: Route
) -> None:
    client = await relay_to(tokens=TOKENS)
    path = await path_to(client, route, bearer("tok-a"))

    async with client.request(
        route.method, path, headers={**CROSS_SITE, **bearer("tok-a")}, **route.kwargs
    ) as response:
        assert response.status == 403


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Sec-Fetch-Site": "same-origin"}, id="the relay's own page (Sec-Fetch-Site)"),
        pytest.param(
            {"Sec-Fetch-Site": "same-origin", "Origin": "https://chat.example.com"},
            id="its own page behind a proxy that sends another Host",
        ),
        pytest.param({"Sec-Fetch-Site": "none"}, id="typed in the address bar"),
        pytest.param({}, id="not a browser (no Origin)"),
    ],
)
async def test_the_relays_own_pages_and_other_clients_may_stream(
    relay_to: RelayFactory, answers: FakeProvider, headers: dict[str, str]
) -> None:
    events = await collect(await relay_to(), "POST", json={"messages": HELLO}, headers=headers)

    assert types(events)[-1] == "done"


async def test_a_browser_without_sec_fetch_is_judged_by_its_origin_against_the_host(
    relay_to: RelayFactory, answers: FakeProvider
) -> None:
    client = await relay_to()
    own = f"http://{client.host}:{client.port}"

    events = await collect(client, "POST", json={"messages": HELLO}, headers={"Origin": own})

    assert types(events)[-1] == "done"


async def test_a_listed_origin_is_not_refused_for_being_cross_site(
    relay_to: RelayFactory, answers: FakeProvider
) -> None:
    client = await relay_to(cors_origins=(ELSEWHERE,))

    events = await collect(client, "POST", json={"messages": HELLO}, headers=CROSS_SITE)

    assert types(events)[-1] == "done"


async def test_any_origin_may_call_when_cors_origins_is_star(relay_to: RelayFactory, answers: FakeProvider) -> None:
    client = await relay_to(cors_origins=("*",))

    events = await collect(client, params={"prompt": "hi"}, headers={"Sec-Fetch-Site": "cross-site"})

    assert types(events)[-1] == "done"


PUBLIC_AND_API = [
    pytest.param("GET", "/", id="the page"),
    pytest.param("GET", "/healthz", id="a probe"),
    pytest.param("GET", "/models", id="an API route"),
    pytest.param("POST", "/stream", id="POST /stream"),
]


@pytest.mark.parametrize(("method", "path"), PUBLIC_AND_API)
async def test_over_loopback_a_foreign_host_is_refused_with_421(
    relay_to: RelayFactory, answers: FakeProvider, method: str, path: str
) -> None:
    client = await relay_to()

    async with client.request(
        method, path, json={"messages": HELLO}, headers={"Host": "rebound.example:8080"}
    ) as response:
        assert response.status == 421
        assert await error_code(response) == "host_not_allowed"
    assert answers.requests == []


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:1234", "LOCALHOST:8080", "127.0.0.1", "127.0.0.1:8080", "[::1]:8080", "[::1]"]
)
async def test_over_loopback_the_loopback_names_are_accepted_on_any_port(
    relay_to: RelayFactory, answers: FakeProvider, host: str
) -> None:
    client = await relay_to()

    events = await collect(client, params={"prompt": "hi"}, headers={"Host": host})

    assert types(events)[-1] == "done"


async def test_allowed_hosts_adds_names(relay_to: RelayFactory, answers: FakeProvider) -> None:
    client = await relay_to(allowed_hosts=("chat.example.com",))

    async with client.get("/healthz", headers={"Host": "chat.example.com"}) as named:
        assert named.status == 200
    async with client.get("/healthz", headers={"Host": "Chat.Example.Com:443"}) as named_with_a_port:
        assert named_with_a_port.status == 200
    async with client.get("/healthz", headers={"Host": "other.example.com"}) as other:
        assert other.status == 421


async def test_allowed_hosts_takes_an_ipv6_address_with_or_without_brackets(
    relay_to: RelayFactory, answers: FakeProvider
) -> None:
    client = await relay_to(allowed_hosts=("2001:db8::5", "[2001:db8::6]"))

    for host in ("[2001:db8::5]:8080", "[2001:db8::6]"):
        async with client.get("/healthz", headers={"Host": host}) as named:
            assert named.status == 200, host
    async with client.get("/healthz", headers={"Host": "[2001:db8::7]"}) as other:
        assert other.status == 421


async def test_allowed_hosts_star_accepts_any_name(relay_to: RelayFactory, answers: FakeProvider) -> None:
    client = await relay_to(allowed_hosts=("*",))

    async with client.get("/healthz", headers={"Host": "rebound.example"}) as response:
        assert response.status == 200


def a_non_loopback_address() -> str | None:
    """An address of this machine's that is not loopback (no packet is sent to find it), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))  # TEST-NET-3: a route, never a packet
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if ipaddress.ip_address(address).is_loopback else address


@pytest.mark.parametrize(
    ("allowed_hosts", "status"),
    [
        pytest.param((), 200, id="any name, by default"),
        pytest.param(("chat.example.com",), 421, id="only the listed names, when some are listed"),
    ],
)
async def test_off_loopback_the_host_is_checked_only_when_allowed_hosts_are_listed(
    aiohttp_client: Callable[..., Awaitable[Client]], allowed_hosts: tuple[str, ...], status: int
) -> None:
    address = a_non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    app = create_app(Config(allowed_hosts=allowed_hosts))
    client = await aiohttp_client(TestServer(app, host=address))

    async with client.get("/healthz", headers={"Host": "relay.example"}) as foreign:
        assert foreign.status == status
    async with client.get("/healthz") as by_its_address:
        assert by_its_address.status == 200, "the address a request came in on is always one of the relay's names"
