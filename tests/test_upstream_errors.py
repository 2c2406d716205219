"""When the provider fails, the client gets a 200 stream that ends in one ``error`` event saying why.

Before the first token the stream is exactly ``[meta, error]``; after it, the
events already relayed stay and the ``error`` comes last. The error carries a
``code``, whether retrying may help, the provider's HTTP status when there is
one, and the provider's own message when it gave one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpServer
from aiohttp.test_utils import TestClient
from helpers import (
    FakeProvider,
    Received,
    RelayFactory,
    Reply,
    chunk,
    collect,
    free_port,
    kinds,
    serve_provider,
    sse,
    text_of,
    transcript,
    types,
)


def openai_error(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def in_two_reads(first: bytes, rest: bytes) -> Reply:
    """``first`` and ``rest`` as two network writes far enough apart to reach the relay as two reads."""
    return Reply(first + rest, chunks=(len(first),), delay=0.05)


def in_one_read(first: bytes, rest: bytes) -> Reply:
    """``first`` and ``rest`` in one small network write, which the relay reads at once."""
    return Reply(first + rest)


async def ask(client: TestClient[web.Request, web.Application], **params: str) -> list[Received]:
    """``GET /stream?prompt=hi`` and every event it produced."""
    return await collect(client, params={"prompt": "hi", **params})


def the_error(events: list[Received]) -> dict[str, Any]:
    """The stream's last event, checked to be its only ``error``."""
    assert types(events).count("error") == 1 and events[-1].event == "error", types(events)
    assert "done" not in types(events)
    return events[-1].data


# The provider cannot be reached.


async def test_a_refused_connection_is_upstream_unreachable(relay: RelayFactory) -> None:
    port = free_port()
    events = await ask(await relay(base_url=f"http://127.0.0.1:{port}/v1", model="m"))

    assert types(events) == ["meta", "error"]
    error = the_error(events)
    assert (error["code"], error["retryable"]) == ("upstream_unreachable", True)
    assert "status" not in error
    assert f"127.0.0.1:{port}" in error["message"]


async def test_an_unresolvable_host_is_upstream_dns(relay: RelayFactory) -> None:
    events = await ask(await relay(base_url="http://nonexistent.invalid/v1", model="m", connect_timeout=5))

    assert types(events) == ["meta", "error"]
    error = the_error(events)
    assert (error["code"], error["retryable"]) == ("upstream_dns", True)
    assert "status" not in error
    assert "nonexistent.invalid" in error["message"]


# The provider answers with an HTTP error status.


@pytest.mark.parametrize(
    ("status", "body", "code", "retryable"),
    [
        pytest.param(
            401,
            openai_error("Incorrect API key provided: sk-xx.", "invalid_request_error", "invalid_api_key"),
            "upstream_auth",
            False,
            id="401 bad key",
        ),
        pytest.param(
            403,
            openai_error("Country, region, or territory not supported", "request_forbidden"),
            "upstream_forbidden",
            False,
            id="403 forbidden",
        ),
        pytest.param(
            404,
            openai_error("The model `gpt-9` does not exist", "invalid_request_error", "model_not_found"),
            "upstream_not_found",
            False,
            id="404 unknown model",
        ),
        pytest.param(
            429,
            openai_error("Rate limit reached for requests", "requests", "rate_limit_exceeded"),
            "upstream_rate_limited",
            True,
            id="429 rate limited",
        ),
        pytest.param(
            500,
            openai_error("The server had an error while processing your request.", "server_error"),
            "upstream_unavailable",
            True,
            id="500 server error",
        ),
        pytest.param(
            502,
            openai_error("Bad gateway.", "cf_bad_gateway"),
            "upstream_unavailable",
            True,
            id="502 bad gateway",
        ),
        pytest.param(
            503,
            openai_error("The engine is currently overloaded, please try again later", "server_error"),
            "upstream_unavailable",
            True,
            id="503 overloaded",
        ),
    ],
)
async def test_an_error_status_ends_the_stream_with_the_providers_message(
    relay_to: RelayFactory, provider: FakeProvider, status: int, body: dict[str, Any], code: str, retryable: bool
) -> None:
    provider.reply = Reply.error(status, body)
    events = await ask(await relay_to())

    assert types(events) == ["meta", "error"]
    assert events[-1].data == {
        "type": "error",
        "code": code,
        "message": body["error"]["message"],
        "status": status,
        "retryable": retryable,
    }


async def test_an_error_body_that_arrives_in_several_reads_still_gives_the_providers_message(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    body = orjson.dumps(openai_error("Rate limit reached for requests per minute. Try again in 20s.", "requests"))
    provider.reply = Reply(body, status=429, content_type="application/json", chunks=(40,), delay=0.05)
    events = await ask(await relay_to(upstream_retries=0))

    assert the_error(events)["message"] == "Rate limit reached for requests per minute. Try again in 20s."


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        pytest.param(
            Reply.error(400, {"detail": "messages: field required"}), "messages: field required", id="JSON detail"
        ),
        pytest.param(
            Reply.error(
                400,
                {"object": "error", "message": "max_tokens is too large", "type": "BadRequestError", "code": 400},
            ),
            "max_tokens is too large",
            id="vLLM-style JSON",
        ),
        pytest.param(
            Reply(b"max_tokens is too large\n", status=400, content_type="text/plain"),
            "max_tokens is too large",
            id="plain text",
        ),
        pytest.param(Reply(b"", status=400, content_type="text/plain"), "400", id="empty body"),
    ],
)
async def test_a_bad_request_status_carries_whatever_message_the_provider_gave(
    relay_to: RelayFactory, provider: FakeProvider, reply: Reply, message: str
) -> None:
    provider.reply = reply
    events = await ask(await relay_to())

    assert types(events) == ["meta", "error"]
    error = the_error(events)
    assert (error["code"], error["status"], error["retryable"]) == ("upstream_bad_request", 400, False)
    assert message in error["message"]


async def test_a_gateways_html_error_page_is_upstream_unavailable(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = Reply(
        b"<html><head><title>504 Gateway Time-out</title></head><body>nginx</body></html>",
        status=504,
        content_type="text/html",
    )
    events = await ask(await relay_to())

    error = the_error(events)
    assert (error["code"], error["status"], error["retryable"]) == ("upstream_unavailable", 504, True)
    assert "504 Gateway Time-out" in error["message"]


# The provider answers 200, but not with an event stream.


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        pytest.param(
            "application/json",
            orjson.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}]}),
            id="a non-streamed completion",
        ),
        pytest.param("text/html", b"<html><body>Sign in to continue</body></html>", id="a login page"),
    ],
)
async def test_a_200_that_is_not_an_event_stream_is_upstream_protocol(
    relay_to: RelayFactory, provider: FakeProvider, content_type: str, body: bytes
) -> None:
    provider.reply = Reply(body, content_type=content_type)
    events = await ask(await relay_to())

    assert types(events) == ["meta", "error"]
    error = the_error(events)
    assert (error["code"], error["retryable"]) == ("upstream_protocol", False)
    assert content_type in error["message"]


# The provider reports an error inside its event stream.


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            sse({"error": {"message": "overloaded", "code": 503}}),
            {"message": "overloaded", "status": 503, "retryable": True},
            id="error object as data, code 503",
        ),
        pytest.param(
            sse({"error": {"message": "Rate limit exceeded", "code": 429}}),
            {"message": "Rate limit exceeded", "status": 429, "retryable": True},
            id="error object as data, code 429",
        ),
        pytest.param(
            sse({"error": {"message": "This model's maximum context length is 8192 tokens", "code": 400}}),
            {"message": "This model's maximum context length is 8192 tokens", "status": 400, "retryable": False},
            id="error object as data, code 400",
        ),
        pytest.param(
            sse({"error": {"message": "Internal error", "code": "server_error"}}),
            {"message": "Internal error", "retryable": True},
            id="error object as data, code a string",
        ),
        pytest.param(
            sse(
                {
                    "error": {
                        "object": "error",
                        "message": "Internal server error",
                        "type": "InternalServerError",
                        "code": 500,
                    }
                }
            ),
            {"message": "Internal server error", "status": 500, "retryable": True},
            id="vLLM error object",
        ),
        pytest.param(
            b'event: error\ndata: {"error": {"message": "quota exceeded", "code": 429}}\n\n',
            {"message": "quota exceeded", "status": 429, "retryable": True},
            id="event error with JSON data",
        ),
    ],
)
async def test_an_error_sent_in_the_stream_ends_it_with_the_providers_message(
    relay_to: RelayFactory, provider: FakeProvider, body: bytes, expected: dict[str, Any]
) -> None:
    provider.reply = Reply(body)
    events = await ask(await relay_to())

    assert types(events) == ["meta", "error"]
    assert events[-1].data == {"type": "error", "code": "upstream_error", **expected}


async def test_an_error_event_with_text_data_carries_the_text(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = Reply(b"event: error\ndata: the upstream model crashed\n\n")
    events = await ask(await relay_to())

    assert types(events) == ["meta", "error"]
    error = the_error(events)
    assert (error["code"], error["message"]) == ("upstream_error", "the upstream model crashed")
    assert "status" not in error


async def test_an_openrouter_mid_stream_error_chunk_ends_the_stream(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    # https://openrouter.ai/docs/api-reference/errors#mid-stream-errors
    failure = {
        **chunk(content="", finish="error"),
        "provider": "openai",
        "error": {"code": "server_error", "message": "Provider disconnected unexpectedly"},
    }
    provider.reply = in_two_reads(sse(chunk(content="Par")), sse(failure, "[DONE]"))
    events = await ask(await relay_to())

    assert types(events) == ["meta", "content", "error"]
    assert events[-1].data == {
        "type": "error",
        "code": "upstream_error",
        "message": "Provider disconnected unexpectedly",
        "retryable": True,
    }


async def test_a_finish_reason_of_error_without_an_error_object_still_ends_in_error(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = in_two_reads(sse(chunk(content="Par")), sse(chunk(finish="error"), "[DONE]"))
    events = await ask(await relay_to())

    assert types(events) == ["meta", "content", "error"]
    assert the_error(events)["code"] == "upstream_error"


# The provider's stream is malformed or cut short.


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("{not json", id="broken JSON"),
        pytest.param('{"choices": [', id="truncated JSON"),
        pytest.param("Internal Server Error", id="plain text"),
        pytest.param("[1, 2, 3]", id="JSON that is not an object"),
    ],
)
async def test_a_data_line_that_is_not_a_json_object_is_upstream_bad_json(
    relay_to: RelayFactory, provider: FakeProvider, line: str
) -> None:
    provider.reply = Reply(sse(line, chunk(content="never relayed"), "[DONE]"))
    events = await ask(await relay_to())

    assert types(events) == ["meta", "error"]
    error = the_error(events)
    assert (error["code"], error["retryable"]) == ("upstream_bad_json", False)
    assert line[:10] in error["message"]


async def test_an_empty_stream_is_upstream_incomplete(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = Reply(b"")
    events = await ask(await relay_to())

    assert types(events) == ["meta", "error"]
    error = the_error(events)
    assert (error["code"], error["retryable"]) == ("upstream_incomplete", True)


async def test_a_stream_cut_before_any_finish_is_upstream_incomplete_after_the_text_so_far(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = Reply(sse(chunk(reasoning="Thinking."), chunk(content="The answer"), chunk(content=" is")))
    events = await ask(await relay_to())

    assert kinds(events) == ["meta", "reasoning", "content", "error"]
    assert text_of(events, "reasoning") == "Thinking."
    assert text_of(events, "content") == "The answer is"
    error = the_error(events)
    assert (error["code"], error["retryable"]) == ("upstream_incomplete", True)


async def test_a_stream_cut_mid_event_is_upstream_incomplete(relay_to: RelayFactory, provider: FakeProvider) -> None:
    body = sse(chunk(content="The answer")) + b'data: {"choices": [{"index": 0, "delta": {"content": " is'
    provider.reply = Reply(body)
    events = await ask(await relay_to())

    assert types(events) == ["meta", "content", "error"]
    assert the_error(events)["code"] == "upstream_incomplete"


async def test_a_stream_with_a_finish_reason_but_no_done_marker_is_done(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = Reply(sse(chunk(content="Paris."), chunk(finish="stop")))
    events = await ask(await relay_to())

    assert types(events) == ["meta", "content", "done"]
    assert events[-1].data["finish_reason"] == "stop"


def drops_after(*chunks: dict[str, Any]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A provider that sends ``chunks``, then drops the connection."""

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(*chunks))
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return response

    return chat_completions


async def test_a_dropped_connection_is_upstream_disconnected(
    aiohttp_server: AiohttpServer, relay: RelayFactory
) -> None:
    base_url = await serve_provider(aiohttp_server, drops_after(chunk(content="Par")))
    events = await ask(await relay(base_url=base_url, model="m"))

    assert types(events) == ["meta", "content", "error"]
    error = the_error(events)
    assert (error["code"], error["retryable"]) == ("upstream_disconnected", True)


@pytest.mark.parametrize(
    ("think", "deltas", "kind"),
    [
        pytest.param("open", ["Compare a ", "<"], "reasoning", id="reasoning that might have begun a closing tag"),
        pytest.param("auto", ["["], "content", id="an answer that might have begun an opening tag"),
    ],
)
async def test_text_held_back_as_a_possible_tag_is_relayed_when_the_connection_drops(
    aiohttp_server: AiohttpServer, relay: RelayFactory, think: str, deltas: list[str], kind: str
) -> None:
    base_url = await serve_provider(aiohttp_server, drops_after(*(chunk(content=delta) for delta in deltas)))
    events = await ask(await relay(base_url=base_url, model="m", think=think))

    assert the_error(events)["code"] == "upstream_disconnected"
    assert text_of(events, kind) == "".join(deltas)


@pytest.mark.parametrize(
    ("chunks", "delay"),
    [
        # The limit is on the line, whatever reads the network splits it into.
        pytest.param((), 0.0, id="arriving in one read"),
        pytest.param((1024,) * 12, 0.01, id="arriving in 1 KB reads"),
    ],
)
async def test_a_line_longer_than_max_line_bytes_is_upstream_line_too_long(
    relay_to: RelayFactory, provider: FakeProvider, chunks: tuple[int, ...], delay: float
) -> None:
    provider.reply = Reply(sse(chunk(content="x" * 10_000), "[DONE]"), chunks=chunks, delay=delay)
    events = await ask(await relay_to(max_line_bytes=2048))

    assert types(events) == ["meta", "error"]
    error = the_error(events)
    assert (error["code"], error["retryable"]) == ("upstream_line_too_long", False)
    assert "2048" in error["message"]


async def test_a_line_within_max_line_bytes_is_relayed(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = Reply(sse(chunk(content="x" * 1900), chunk(finish="stop"), "[DONE]"), chunks=(512,) * 4)
    events = await ask(await relay_to(max_line_bytes=2048))

    assert types(events) == ["meta", "content", "done"]


async def test_a_provider_that_never_ends_its_event_is_upstream_line_too_long_and_hung_up_on(
    aiohttp_server: AiohttpServer, relay: RelayFactory
) -> None:
    # Data lines and never the blank line that ends an event: bytes keep coming, so no timeout fires.
    hung_up = asyncio.Event()

    async def endless_event(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:
                await response.write(b"data: " + b"x" * 1000 + b"\n")
        except (ConnectionError, asyncio.CancelledError):
            hung_up.set()
            raise

    app = web.Application()
    app.router.add_post("/v1/chat/completions", endless_event)
    server = await aiohttp_server(app)
    client = await relay(base_url=str(server.make_url("/v1")), model="m", max_line_bytes=64 * 1024)
    async with asyncio.timeout(10):
        events = await ask(client)
        await hung_up.wait()

    assert types(events) == ["meta", "error"]
    error = the_error(events)
    assert (error["code"], error["retryable"]) == ("upstream_line_too_long", False)
    assert str(64 * 1024) in error["message"]


async def test_a_tool_call_whose_index_is_not_a_number_is_upstream_protocol(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    # An index nested deeper than the relay could ever write back out as JSON.
    index = b"[" * 300 + b"0" + b"]" * 300
    call = b'{"index": %s, "id": "call_1", "function": {"name": "f", "arguments": ""}}' % index
    tool_chunk = b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [%s]}, "finish_reason": null}]}\n\n' % call
    provider.reply = Reply(sse(chunk(content="Let me look.")) + tool_chunk + sse(chunk(finish="tool_calls")))
    events = await ask(await relay_to())

    assert kinds(events) == ["meta", "content", "error"]
    error = the_error(events)
    assert (error["code"], error["retryable"]) == ("upstream_protocol", False)
    assert "index" in error["message"]


async def test_a_retry_field_of_thousands_of_digits_is_ignored(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = Reply(
        b"retry: " + b"9" * 5000 + b"\n\n" + sse(chunk(content="Hi"), chunk(finish="stop"), "[DONE]")
    )
    events = await ask(await relay_to())

    assert types(events) == ["meta", "content", "done"]


# Failures after the first token.

MID_STREAM_FAILURES = [
    pytest.param(sse("{not json"), "upstream_bad_json", id="bad JSON"),
    pytest.param(sse({"error": {"message": "overloaded", "code": 503}}), "upstream_error", id="error object"),
    pytest.param(b"event: error\ndata: {}\n\n", "upstream_error", id="event error"),
    pytest.param(sse(chunk(finish="error")), "upstream_error", id="finish_reason error"),
    pytest.param(b"", "upstream_incomplete", id="cut short"),
]


@pytest.mark.parametrize(
    "delivery",
    [
        pytest.param(in_two_reads, id="failure in a later read"),
        # How the network happens to split the bytes must not change what the client sees.
        pytest.param(in_one_read, id="failure in the same read"),
    ],
)
@pytest.mark.parametrize(("failure", "code"), MID_STREAM_FAILURES)
async def test_a_mid_stream_failure_keeps_the_events_sent_before_it(
    relay_to: RelayFactory,
    provider: FakeProvider,
    failure: bytes,
    code: str,
    delivery: Callable[[bytes, bytes], Reply],
) -> None:
    before = sse(chunk(reasoning="Let me think."), chunk(content="The capital"), chunk(content=" is"))
    provider.reply = delivery(before, failure)
    events = await ask(await relay_to())

    assert kinds(events) == ["meta", "reasoning", "content", "error"]
    assert text_of(events, "reasoning") == "Let me think."
    assert text_of(events, "content") == "The capital is"
    assert the_error(events)["code"] == code


# One failing stream does not affect the others.


async def test_a_failing_stream_does_not_disturb_a_concurrent_one(
    aiohttp_server: AiohttpServer, relay: RelayFactory
) -> None:
    good_started = asyncio.Event()

    async def provider_failing_one_prompt(request: web.Request) -> web.StreamResponse:
        prompt = (await request.json())["messages"][-1]["content"]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if prompt == "fail":
            # Fail only once the other stream is under way, so that the two overlap.
            await good_started.wait()
            await response.write(b"data: {not json\n\n")
        else:
            good_started.set()
            await response.write(transcript("openai_content.sse"))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", provider_failing_one_prompt)
    server = await aiohttp_server(app)
    client = await relay(base_url=str(server.make_url("/v1")), model="m")

    failed, succeeded = await asyncio.wait_for(asyncio.gather(ask(client, prompt="fail"), ask(client, prompt="ok")), 5)

    assert types(failed) == ["meta", "error"]
    assert the_error(failed)["code"] == "upstream_bad_json"
    assert types(succeeded)[-1] == "done" and "error" not in types(succeeded)
    assert text_of(succeeded, "content") == "The capital of France is **Paris**."


async def test_the_relay_serves_again_after_a_provider_failure(relay_to: RelayFactory, provider: FakeProvider) -> None:
    client = await relay_to()
    provider.reply = Reply.error(500, openai_error("boom", "server_error"))
    assert the_error(await ask(client))["code"] == "upstream_unavailable"

    provider.reply = Reply(transcript("openai_content.sse"))
    events = await ask(client)

    assert types(events)[-1] == "done"


# NDJSON carries the same objects.


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(Reply.error(429, openai_error("slow down", "requests")), id="error status"),
        pytest.param(Reply(sse(chunk(content="Par"), "{not json")), id="bad JSON mid-stream"),
        pytest.param(Reply(sse(chunk(content="Par"))), id="cut short"),
    ],
)
async def test_ndjson_gives_the_same_objects_as_sse_for_a_failing_stream(
    relay_to: RelayFactory, provider: FakeProvider, reply: Reply
) -> None:
    provider.reply = reply
    client = await relay_to()
    over_sse = [e.data for e in await ask(client)]
    async with client.get("/stream", params={"prompt": "hi", "format": "ndjson"}) as response:
        assert response.status == 200
        assert response.content_type == "application/x-ndjson"
        over_ndjson = [orjson.loads(line) for line in (await response.read()).splitlines()]

    for stream in (over_sse, over_ndjson):
        assert stream[0]["type"] == "meta"
        del stream[0]["stream"]
    assert over_ndjson == over_sse
    assert over_ndjson[-1]["type"] == "error"
