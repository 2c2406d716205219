"""Retries before the first byte: a refused connection, a 429 or a 5xx is tried again; nothing after output began.

A retry is safe only while nothing of the answer exists: the provider never
got the request, or turned it down. Once it accepted one, a second request
could repeat text the client already has and be billed twice.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from aiohttp.test_utils import TestClient, TestServer
from helpers import FakeProvider, RelayFactory, Reply, chunk, collect, free_port, sse, text_of, types
from prometheus_client.parser import text_string_to_metric_families

from handlers.errors import UpstreamConnectError
from handlers.provider.upstream import Upstream, stream_chat

Client = TestClient[web.Request, web.Application]

ANSWER = Reply(
    sse(chunk(reasoning="Easy."), chunk(content="Hello"), chunk(content="!"), chunk(finish="stop"), "[DONE]")
)


def overloaded(**headers: str) -> Reply:
    return Reply.error(503, {"error": {"message": "overloaded", "type": "server_error"}}, headers)


def rate_limited(**headers: str) -> Reply:
    return Reply.error(429, {"error": {"message": "slow down", "type": "requests"}}, headers)


async def retries_counted(client: Client) -> dict[str, float]:
    """``thinkstream_upstream_retries_total`` by reason (the one provider here is named for its host)."""
    async with client.get("/metrics") as response:
        exposition = await response.text()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == "thinkstream_upstream_retries_total" and sample.labels["provider"] == "127.0.0.1"
    }


async def test_a_refused_connection_is_tried_again_and_the_answer_arrives_once_the_provider_listens(
    relay: RelayFactory, aiohttp_server: Callable[..., Awaitable[TestServer]], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    client = await relay(base_url=f"http://127.0.0.1:{port}/v1", model="m")
    answer = asyncio.create_task(collect(client, params={"prompt": "hi"}))
    for _ in range(500):
        if "trying again" in caplog.text:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the relay never tried the provider")

    # The provider comes up during the wait before the next attempt.
    fake = FakeProvider(reply=ANSWER)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat_completions)
    await aiohttp_server(app, port=port)
    events = await answer

    assert types(events)[-1] == "done"
    assert (text_of(events, "reasoning"), text_of(events, "content")) == ("Easy.", "Hello!")
    assert len(fake.requests) == 1
    assert await retries_counted(client) == {"unreachable": 1.0}


async def test_a_429_is_tried_again_after_the_seconds_its_retry_after_asks_for(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.script = [rate_limited(**{"Retry-After": "1"})]
    provider.reply = ANSWER
    client = await relay_to()

    loop = asyncio.get_running_loop()
    started = loop.time()
    events = await collect(client, params={"prompt": "hi"})
    waited = loop.time() - started

    assert text_of(events, "content") == "Hello!"
    assert len(provider.requests) == 2
    assert waited >= 0.95
    assert await retries_counted(client) == {"429": 1.0}


async def test_a_5xx_is_tried_again_with_backoff_up_to_the_configured_number_of_times(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = overloaded()
    client = await relay_to()

    events = await collect(client, params={"prompt": "hi"})

    # The default: two more attempts, then the provider's own error.
    assert len(provider.requests) == 3
    assert events[-1].data == {
        "type": "error",
        "code": "upstream_unavailable",
        "message": "overloaded",
        "status": 503,
        "retryable": True,
    }
    assert await retries_counted(client) == {"503": 2.0}


async def test_no_retries_when_they_are_turned_off(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = overloaded()
    events = await collect(await relay_to(upstream_retries=0), params={"prompt": "hi"})

    assert events[-1].data["code"] == "upstream_unavailable"
    assert len(provider.requests) == 1


async def test_a_refusal_that_no_retry_can_mend_is_not_tried_again(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = Reply.error(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request"}})
    events = await collect(await relay_to(), params={"prompt": "hi"})

    assert events[-1].data["code"] == "upstream_auth"
    assert len(provider.requests) == 1


async def test_a_retry_after_longer_than_the_first_byte_timeout_ends_the_stream_at_once(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = rate_limited(**{"Retry-After": "30"})
    client = await relay_to(first_byte_timeout=5)

    loop = asyncio.get_running_loop()
    started = loop.time()
    events = await collect(client, params={"prompt": "hi"})

    assert loop.time() - started < 2
    assert events[-1].data["code"] == "upstream_rate_limited"
    assert len(provider.requests) == 1
    assert await retries_counted(client) == {}


async def test_a_stream_that_breaks_after_its_first_token_is_never_tried_again(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    # The answer began (its first token was relayed), then the provider's stream ended unfinished.
    provider.reply = Reply(sse(chunk(content="Hello")))
    client = await relay_to()

    events = await collect(client, params={"prompt": "hi"})

    assert types(events) == ["meta", "content", "error"]
    assert text_of(events, "content") == "Hello"
    assert events[-1].data["code"] == "upstream_incomplete"
    assert len(provider.requests) == 1
    assert await retries_counted(client) == {}


async def test_an_error_inside_an_accepted_stream_is_never_tried_again(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    # A 200 whose event stream reports an overload: the provider accepted the request, so it may be billed.
    provider.reply = Reply(sse(chunk(content="Hi"), {"error": {"message": "overloaded", "code": 503}}))
    events = await collect(await relay_to(), params={"prompt": "hi"})

    assert events[-1].data["code"] == "upstream_error"
    assert text_of(events, "content") == "Hi"
    assert len(provider.requests) == 1


async def test_every_attempt_fits_within_the_first_byte_timeout(relay_to: RelayFactory, provider: FakeProvider) -> None:
    # Each 503 asks for a second's wait; a 1.5 s budget has room for one, not two.
    provider.reply = overloaded(**{"Retry-After": "1"})
    client = await relay_to(first_byte_timeout=1.5, upstream_retries=5)

    events = await collect(client, params={"prompt": "hi"})

    assert events[-1].data["code"] == "upstream_unavailable"
    assert len(provider.requests) == 2


class TwoAddresses(AbstractResolver):
    """A name with two addresses: an IPv6 one with no route, and an IPv4 one where nothing listens."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        return [
            {"hostname": host, "host": address, "port": self.port, "family": kind, "proto": 0, "flags": 0}
            for address, kind in (("2001:db8::1", socket.AF_INET6), ("127.0.0.1", socket.AF_INET))
        ]

    async def close(self) -> None:
        pass


async def test_a_name_whose_every_address_fails_in_its_own_way_is_tried_again() -> None:
    # aiohttp then reports one OSError for all of them, not a refusal: no connection was made all the same.
    retried: list[str] = []
    connector = aiohttp.TCPConnector(resolver=TwoAddresses(free_port()), happy_eyeballs_delay=None)
    async with aiohttp.ClientSession(connector=connector) as session:
        chat = stream_chat(
            session,
            Upstream("http://provider.test/v1", name="test"),
            {"model": "m", "messages": []},
            max_line=65536,
            first_byte_timeout=30,
            idle_timeout=30,
            retries=1,
            on_retry=retried.append,
        )
        with pytest.raises(UpstreamConnectError) as failed:
            async for _ in chat:
                pass

    assert retried == ["unreachable"]
    assert "None" not in failed.value.message
