"""Bad requests are refused with a JSON error before anything goes upstream; good ones go upstream exactly.

A refusal is an HTTP 4xx with ``{"error": {"code", "message"}}``, never a 500,
and the provider never hears of it. What a valid request asks for (messages,
sampling options, tools, model) reaches the provider unchanged, with the
streaming options the relay adds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from helpers import FakeProvider, RelayFactory, Reply, collect, text_of, transcript, types

from handlers.config import Config

Client = TestClient[web.Request, web.Application]

HELLO = [{"role": "user", "content": "hello"}]


@dataclass(frozen=True)
class Bad:
    """One bad request and the refusal it must get."""

    method: str
    path: str
    status: int
    code: str
    # Words the message must contain, so that it says what to fix.
    mentions: tuple[str, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def get(params: dict[str, str], code: str, *mentions: str) -> Bad:
    return Bad("GET", "/stream", 400, code, mentions, {"params": params})


JSON = {"Content-Type": "application/json"}


def post(body: Any, code: str, *mentions: str) -> Bad:
    return Bad("POST", "/stream", 400, code, mentions, {"data": orjson.dumps(body), "headers": JSON})


def post_raw(body: bytes, code: str, *mentions: str) -> Bad:
    return Bad("POST", "/stream", 400, code, mentions, {"data": body, "headers": JSON})


def over_the_limit(data: Any) -> Bad:
    """A POST to a relay that takes at most 1024 bytes; ``data`` may be a callable making a fresh body."""
    kwargs = {"data": data, "headers": JSON}
    return Bad("POST", "/stream", 413, "body_too_large", ("1024",), kwargs, {"max_body_bytes": 1024})


def too_deep(template: bytes, code: str, name: str) -> Bad:
    """A POST of ``template`` with a value 300 lists deep where it has ``%s``: deeper than orjson writes."""
    return post_raw(template % (b"[" * 300 + b'"deep"' + b"]" * 300), code, name)


def with_messages(**options: Any) -> dict[str, Any]:
    return {"messages": HELLO, **options}


async def chunked(body: bytes, size: int = 512) -> AsyncIterator[bytes]:
    """A request body sent with chunked transfer encoding: no Content-Length to refuse it by."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def padded_body(size: int) -> bytes:
    """A valid chat request of exactly ``size`` bytes."""
    bare = orjson.dumps({"messages": [{"role": "user", "content": ""}]})
    return orjson.dumps({"messages": [{"role": "user", "content": "x" * (size - len(bare))}]})


MISSING_PROMPT = [
    pytest.param(get({}, "missing_prompt", "prompt"), id="GET without a prompt"),
    pytest.param(get({"prompt": ""}, "missing_prompt", "prompt"), id="GET with an empty prompt"),
    pytest.param(get({"prompt": "  \n\t "}, "missing_prompt", "prompt"), id="GET with a blank prompt"),
    pytest.param(get({"system": "be brief"}, "missing_prompt", "prompt"), id="GET with only a system prompt"),
    pytest.param(
        Bad("GET", "/stream?prompt=%ff%fe", 400, "invalid_request", ("UTF-8",)), id="GET with a prompt not in UTF-8"
    ),
    pytest.param(
        Bad("GET", "/stream?prompt=hi&system=%c3", 400, "invalid_request", ("UTF-8",)),
        id="GET with a system prompt not in UTF-8",
    ),
]

NOT_A_CHAT_REQUEST = [
    pytest.param(post_raw(b"{not json", "invalid_json", "JSON"), id="body is not JSON"),
    pytest.param(post_raw(b"", "invalid_json", "JSON"), id="body is empty"),
    pytest.param(post_raw(b'{"messages": [', "invalid_json", "JSON"), id="body is truncated JSON"),
    pytest.param(post_raw(b"\xff\xfe{}", "invalid_json", "JSON"), id="body is not UTF-8"),
    pytest.param(post(HELLO, "invalid_request", "object", "messages"), id="body is a JSON array"),
    pytest.param(post("hello", "invalid_request", "object"), id="body is a JSON string"),
    pytest.param(post(None, "invalid_request", "object"), id="body is JSON null"),
    pytest.param(
        post(with_messages(frequency_penalty=0.5), "invalid_request", "frequency_penalty", "accepted"),
        id="unknown top-level field",
    ),
    pytest.param(
        post(with_messages(stream_options={"include_usage": False}), "invalid_request", "stream_options"),
        id="stream_options is the relay's to set",
    ),
]

BAD_MESSAGES = [
    pytest.param(post({}, "invalid_messages", "messages"), id="messages missing"),
    pytest.param(post({"messages": None}, "invalid_messages", "messages"), id="messages null"),
    pytest.param(post({"messages": []}, "invalid_messages", "non-empty"), id="messages empty"),
    pytest.param(post({"messages": "hello"}, "invalid_messages", "list"), id="messages a string"),
    pytest.param(post({"messages": HELLO[0]}, "invalid_messages", "list"), id="messages an object, not a list"),
    pytest.param(post({"messages": ["hello"]}, "invalid_messages", "messages[0]", "object"), id="message a string"),
    pytest.param(post({"messages": [["user", "hi"]]}, "invalid_messages", "messages[0]"), id="message a list"),
    pytest.param(
        post({"messages": [{"role": "robot", "content": "hi"}]}, "invalid_messages", "messages[0].role", "robot"),
        id="unknown role",
    ),
    pytest.param(
        post({"messages": [{"content": "hi"}]}, "invalid_messages", "messages[0].role"),
        id="role missing",
    ),
    pytest.param(
        post({"messages": [{"role": ["user"], "content": "hi"}]}, "invalid_messages", "messages[0].role"),
        id="role a list",
    ),
    pytest.param(
        post({"messages": [{"role": {}, "content": "hi"}]}, "invalid_messages", "messages[0].role"),
        id="role an object",
    ),
    pytest.param(
        post({"messages": [{"role": "user", "content": 42}]}, "invalid_messages", "messages[0].content", "string"),
        id="content a number",
    ),
    pytest.param(
        post({"messages": [{"role": "user", "content": None}]}, "invalid_messages", "messages[0].content"),
        id="content null without tool calls",
    ),
    pytest.param(
        post({"messages": [{"role": "user"}]}, "invalid_messages", "messages[0].content"),
        id="content missing",
    ),
    pytest.param(
        post(
            {"messages": [*HELLO, {"role": "tool", "content": "42"}]},
            "invalid_messages",
            "messages[1]",
            "tool_call_id",
        ),
        id="tool message without tool_call_id",
    ),
    pytest.param(
        post(
            {"messages": [*HELLO, {"role": "tool", "content": "42", "tool_call_id": 7}]},
            "invalid_messages",
            "messages[1]",
            "tool_call_id",
        ),
        id="tool_call_id not a string",
    ),
    pytest.param(
        post({"messages": [{"role": "user", "content": "hi", "mood": "happy"}]}, "invalid_messages", "mood"),
        id="unknown message field",
    ),
    pytest.param(
        post({"messages": [{"role": "user", "content": "hi", "name": 3}]}, "invalid_messages", "messages[0].name"),
        id="name not a string",
    ),
    pytest.param(
        post(
            {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
            "invalid_messages",
            "messages[0].tool_calls",
        ),
        id="tool_calls on a user message",
    ),
    pytest.param(
        post(
            {"messages": [{"role": "assistant", "content": None, "tool_calls": "call_1"}]},
            "invalid_messages",
            "messages[0].tool_calls",
        ),
        id="tool_calls not a list",
    ),
    pytest.param(
        post({"messages": [*HELLO, {"role": "user", "content": 1}]}, "invalid_messages", "messages[1].content"),
        id="second message bad, first good",
    ),
]

BAD_OPTIONS = [
    pytest.param(post(with_messages(temperature="0.7"), "invalid_parameter", "temperature"), id="temperature string"),
    pytest.param(post(with_messages(temperature=True), "invalid_parameter", "temperature"), id="temperature boolean"),
    pytest.param(post(with_messages(temperature=[1]), "invalid_parameter", "temperature"), id="temperature list"),
    pytest.param(
        post(with_messages(temperature=-0.1), "invalid_parameter", "temperature", "between 0 and 2"),
        id="temperature negative",
    ),
    pytest.param(
        post(with_messages(temperature=2.01), "invalid_parameter", "temperature", "between 0 and 2"),
        id="temperature above 2",
    ),
    pytest.param(post(with_messages(top_p="1"), "invalid_parameter", "top_p"), id="top_p string"),
    pytest.param(post(with_messages(top_p=False), "invalid_parameter", "top_p"), id="top_p boolean"),
    pytest.param(post(with_messages(top_p=-0.5), "invalid_parameter", "top_p", "between 0 and 1"), id="top_p negative"),
    pytest.param(post(with_messages(top_p=1.5), "invalid_parameter", "top_p", "between 0 and 1"), id="top_p above 1"),
    pytest.param(post(with_messages(max_tokens=0), "invalid_parameter", "max_tokens", "positive"), id="max_tokens 0"),
    pytest.param(post(with_messages(max_tokens=-5), "invalid_parameter", "max_tokens"), id="max_tokens negative"),
    pytest.param(post(with_messages(max_tokens=1.5), "invalid_parameter", "max_tokens"), id="max_tokens fractional"),
    pytest.param(post(with_messages(max_tokens=100.0), "invalid_parameter", "max_tokens"), id="max_tokens a float"),
    pytest.param(post(with_messages(max_tokens=True), "invalid_parameter", "max_tokens"), id="max_tokens boolean"),
    pytest.param(post(with_messages(max_tokens="100"), "invalid_parameter", "max_tokens"), id="max_tokens string"),
    pytest.param(
        post_raw(b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":1e400}', "invalid_json"),
        id="max_tokens overflowing to infinity",
    ),
    pytest.param(
        post_raw(b'{"messages":[{"role":"user","content":"hi"}],"temperature":NaN}', "invalid_json"),
        id="temperature NaN is not JSON",
    ),
    pytest.param(
        post_raw(b'{"messages":[{"role":"user","content":"hi"}],"top_p":Infinity}', "invalid_json"),
        id="top_p Infinity is not JSON",
    ),
    pytest.param(post(with_messages(tools={"type": "function"}), "invalid_parameter", "tools"), id="tools an object"),
    pytest.param(post(with_messages(tools=["search"]), "invalid_parameter", "tools"), id="tools a list of strings"),
    pytest.param(post(with_messages(tool_choice=1), "invalid_parameter", "tool_choice"), id="tool_choice a number"),
    pytest.param(post(with_messages(model=5), "invalid_parameter", "model"), id="model a number"),
    # orjson reads JSON nested 1,024 deep but writes at most 254 levels: the provider request must be writable.
    pytest.param(
        too_deep(b'{"messages": [{"role": "user", "content": "hi"}], "tools": [%s]}', "invalid_parameter", "tools"),
        id="tools nested 300 deep",
    ),
    pytest.param(
        too_deep(
            b'{"messages": [{"role": "user", "content": "hi"}], "tool_choice": {"function": %s}}',
            "invalid_parameter",
            "tool_choice",
        ),
        id="tool_choice nested 300 deep",
    ),
    pytest.param(
        too_deep(
            b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [%s]}]}',
            "invalid_messages",
            "messages[1].tool_calls",
        ),
        id="tool_calls nested 300 deep",
    ),
]

BAD_MODELS = [
    pytest.param(
        post(with_messages(model="gpt-5"), "model_not_allowed", "gpt-5", "test-model"), id="POST a model not offered"
    ),
    pytest.param(
        get({"prompt": "hi", "model": "gpt-5"}, "model_not_allowed", "gpt-5", "test-model"),
        id="GET a model not offered",
    ),
    pytest.param(
        Bad(
            "POST",
            "/stream",
            400,
            "model_not_allowed",
            mentions=("gpt-5", "test-model", "other"),
            kwargs={"data": orjson.dumps(with_messages(model="gpt-5")), "headers": JSON},
            settings={"models": ("other",)},
        ),
        id="a model outside a longer allow-list",
    ),
]

TOO_LARGE = [
    pytest.param(over_the_limit(padded_body(4096)), id="with Content-Length"),
    pytest.param(over_the_limit(lambda: chunked(padded_body(4096))), id="chunked"),
    pytest.param(
        over_the_limit(lambda: chunked(padded_body(1025), size=1)), id="chunked, one byte over, a byte at a time"
    ),
]

WRONG_FORMAT = [
    pytest.param(get({"prompt": "hi", "format": "xml"}, "invalid_parameter", "format"), id="format=xml"),
    pytest.param(get({"prompt": "hi", "format": ""}, "invalid_parameter", "format"), id="format empty"),
    pytest.param(
        Bad(
            "POST",
            "/stream?format=xml",
            400,
            "invalid_parameter",
            mentions=("format",),
            kwargs={"data": orjson.dumps(with_messages()), "headers": JSON},
        ),
        id="POST with format=xml",
    ),
]

UNKNOWN_ROUTES = [
    pytest.param(Bad("GET", "/nowhere", 404, "not_found", ("Not Found",)), id="GET /nowhere"),
    pytest.param(Bad("GET", "/stream/", 404, "not_found"), id="GET /stream/ with a trailing slash"),
    pytest.param(Bad("POST", "/v1/chat/completions", 404, "not_found"), id="the provider's route"),
    pytest.param(Bad("GET", "/static/nope.js", 404, "not_found"), id="an asset the page does not have"),
    pytest.param(Bad("GET", "/static/js", 404, "not_found"), id="a folder of the page's assets"),
    pytest.param(Bad("GET", "/static/%2e%2e/server.py", 404, "not_found"), id="a file outside the page's folder"),
    pytest.param(Bad("GET", "/static/a%00b.js", 404, "not_found"), id="a name with a NUL byte"),
]

WRONG_METHODS = [
    pytest.param(Bad("PUT", "/stream", 405, "method_not_allowed"), id="PUT /stream"),
    pytest.param(Bad("DELETE", "/stream", 405, "method_not_allowed"), id="DELETE /stream"),
    pytest.param(Bad("PATCH", "/stream", 405, "method_not_allowed"), id="PATCH /stream"),
]


def encoded_as(encoding: str, body: bytes) -> Bad:
    """A POST whose ``Content-Encoding`` says ``encoding``, though ``body`` is not that."""
    headers = {**JSON, "Content-Encoding": encoding}
    return Bad("POST", "/stream", 400, "unreadable_body", (encoding,), {"data": body, "headers": headers})


UNREADABLE_BODIES = [
    pytest.param(encoded_as("gzip", orjson.dumps(with_messages())), id="Content-Encoding gzip, but not gzip"),
    pytest.param(encoded_as("deflate", b"\x78\x9c" + b"\xff" * 40), id="Content-Encoding deflate, but broken"),
]

EVERY_BAD_REQUEST = [
    *MISSING_PROMPT,
    *NOT_A_CHAT_REQUEST,
    *BAD_MESSAGES,
    *BAD_OPTIONS,
    *BAD_MODELS,
    *TOO_LARGE,
    *UNREADABLE_BODIES,
    *WRONG_FORMAT,
    *UNKNOWN_ROUTES,
    *WRONG_METHODS,
]


async def send(client: Client, bad: Bad) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Make the bad request; return its status, its JSON body and its headers."""
    kwargs = {name: value() if callable(value) else value for name, value in bad.kwargs.items()}
    async with client.request(bad.method, bad.path, **kwargs) as response:
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json(), dict(response.headers)


async def assert_refused(client: Client, provider: FakeProvider, bad: Bad) -> dict[str, str]:
    status, body, headers = await send(client, bad)

    assert (status, body["error"]["code"]) == (bad.status, bad.code), body
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    message = body["error"]["message"]
    assert isinstance(message, str) and message.strip()
    for word in bad.mentions:
        assert word in message
    assert provider.requests == []
    return headers


@pytest.mark.parametrize("bad", MISSING_PROMPT)
async def test_a_get_without_a_prompt_is_refused(relay_to: RelayFactory, provider: FakeProvider, bad: Bad) -> None:
    await assert_refused(await relay_to(**bad.settings), provider, bad)


@pytest.mark.parametrize("bad", NOT_A_CHAT_REQUEST)
async def test_a_body_that_is_not_a_chat_request_is_refused(
    relay_to: RelayFactory, provider: FakeProvider, bad: Bad
) -> None:
    await assert_refused(await relay_to(**bad.settings), provider, bad)


@pytest.mark.parametrize("bad", BAD_MESSAGES)
async def test_malformed_messages_are_refused_naming_the_message(
    relay_to: RelayFactory, provider: FakeProvider, bad: Bad
) -> None:
    await assert_refused(await relay_to(**bad.settings), provider, bad)


@pytest.mark.parametrize("bad", BAD_OPTIONS)
async def test_options_of_the_wrong_type_or_range_are_refused(
    relay_to: RelayFactory, provider: FakeProvider, bad: Bad
) -> None:
    await assert_refused(await relay_to(**bad.settings), provider, bad)


@pytest.mark.parametrize("bad", BAD_MODELS)
async def test_a_model_outside_the_allow_list_is_refused_listing_the_allowed_ones(
    relay_to: RelayFactory, provider: FakeProvider, bad: Bad
) -> None:
    await assert_refused(await relay_to(**bad.settings), provider, bad)


@pytest.mark.parametrize("bad", TOO_LARGE)
async def test_a_body_over_the_limit_is_refused_with_413(
    relay_to: RelayFactory, provider: FakeProvider, bad: Bad
) -> None:
    await assert_refused(await relay_to(**bad.settings), provider, bad)


@pytest.mark.parametrize("bad", UNREADABLE_BODIES)
async def test_a_body_that_cannot_be_decoded_is_refused(
    relay_to: RelayFactory, provider: FakeProvider, bad: Bad
) -> None:
    headers = await assert_refused(await relay_to(**bad.settings), provider, bad)
    # What follows it on the connection cannot be told apart from it.
    assert headers.get("Connection", "").lower() == "close"


@pytest.mark.parametrize("bad", WRONG_FORMAT)
async def test_an_unknown_format_is_refused(relay_to: RelayFactory, provider: FakeProvider, bad: Bad) -> None:
    await assert_refused(await relay_to(**bad.settings), provider, bad)


@pytest.mark.parametrize("bad", UNKNOWN_ROUTES)
async def test_an_unknown_route_is_a_json_404(relay_to: RelayFactory, provider: FakeProvider, bad: Bad) -> None:
    await assert_refused(await relay_to(), provider, bad)


@pytest.mark.parametrize("bad", WRONG_METHODS)
async def test_a_wrong_method_is_a_json_405_that_says_which_are_allowed(
    relay_to: RelayFactory, provider: FakeProvider, bad: Bad
) -> None:
    headers = await assert_refused(await relay_to(), provider, bad)

    assert set(headers["Allow"].replace(" ", "").split(",")) == {"GET", "POST"}


@pytest.mark.parametrize("bad", EVERY_BAD_REQUEST)
async def test_the_relay_keeps_serving_after_a_bad_request(
    relay_to: RelayFactory, provider: FakeProvider, bad: Bad
) -> None:
    provider.reply = Reply(transcript("openai_content.sse"))
    client = await relay_to(**bad.settings)
    status, _, _ = await send(client, bad)
    assert status == bad.status

    events = await collect(client, "POST", json={"messages": HELLO})

    assert types(events)[0] == "meta" and types(events)[-1] == "done"
    assert len(provider.requests) == 1


# What goes upstream.


@pytest.fixture
def answered(provider: FakeProvider) -> FakeProvider:
    """The fake provider, answering every request with a short complete answer."""
    provider.reply = Reply(transcript("openai_content.sse"))
    return provider


async def test_post_messages_and_options_are_forwarded_exactly(relay_to: RelayFactory, answered: FakeProvider) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Weather in Paris?", "name": "ann"},
    ]
    body = {
        "messages": messages,
        "temperature": 0.25,
        "top_p": 0.9,
        "max_tokens": 64,
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }

    events = await collect(await relay_to(), "POST", json=body)

    assert types(events)[-1] == "done"
    assert answered.requests == [
        {
            "model": "test-model",
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.25,
            "top_p": 0.9,
            "max_tokens": 64,
            "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        }
    ]


async def test_a_tool_calling_conversation_is_forwarded_exactly(relay_to: RelayFactory, answered: FakeProvider) -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'},
    ]

    await collect(await relay_to(), "POST", json={"messages": messages, "tool_choice": "none"})

    assert answered.requests[0]["messages"] == messages
    assert answered.requests[0]["tool_choice"] == "none"


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"temperature": 0, "top_p": 0, "max_tokens": 1}, id="lowest"),
        pytest.param({"temperature": 2, "top_p": 1, "max_tokens": 1_000_000}, id="highest"),
    ],
)
async def test_options_at_the_ends_of_their_ranges_are_accepted(
    relay_to: RelayFactory, answered: FakeProvider, options: dict[str, Any]
) -> None:
    await collect(await relay_to(), "POST", json={"messages": HELLO, **options})

    sent = answered.requests[0]
    assert {name: sent[name] for name in options} == options


async def test_null_options_are_left_to_the_provider(relay_to: RelayFactory, answered: FakeProvider) -> None:
    body = {"messages": HELLO, "model": None, "temperature": None, "top_p": None, "max_tokens": None, "tools": None}

    await collect(await relay_to(), "POST", json=body)

    assert answered.requests == [
        {"model": "test-model", "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    ]


async def test_get_prompt_and_system_prompt_become_system_then_user_messages(
    relay_to: RelayFactory, answered: FakeProvider
) -> None:
    await collect(await relay_to(), params={"prompt": "Why is the sky blue?", "system": "Be brief."})

    assert answered.requests == [
        {
            "model": "test-model",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Why is the sky blue?"},
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ]


async def test_a_blank_system_prompt_is_left_out(relay_to: RelayFactory, answered: FakeProvider) -> None:
    await collect(await relay_to(), params={"prompt": "hi", "system": "   "})

    assert answered.requests[0]["messages"] == [{"role": "user", "content": "hi"}]


async def test_usage_is_not_asked_for_when_include_usage_is_off(relay_to: RelayFactory, answered: FakeProvider) -> None:
    await collect(await relay_to(include_usage=False), params={"prompt": "hi"})

    assert answered.requests == [
        {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ]


async def test_a_client_asking_not_to_stream_is_still_streamed(relay_to: RelayFactory, answered: FakeProvider) -> None:
    events = await collect(await relay_to(), "POST", json={"messages": HELLO, "stream": False})

    assert answered.requests[0]["stream"] is True
    assert text_of(events, "content") == "The capital of France is **Paris**."


@pytest.mark.parametrize(
    ("method", "request_kwargs"),
    [
        pytest.param("POST", {"json": {"messages": HELLO, "model": "other"}}, id="POST"),
        pytest.param("GET", {"params": {"prompt": "hello", "model": "other"}}, id="GET"),
    ],
)
async def test_a_model_in_the_allow_list_is_forwarded(
    relay_to: RelayFactory, answered: FakeProvider, method: str, request_kwargs: dict[str, Any]
) -> None:
    events = await collect(await relay_to(models=("other",)), method, **request_kwargs)

    assert events[0].data["model"] == "other"
    assert answered.requests[0]["model"] == "other"


@pytest.mark.parametrize("model", [pytest.param(None, id="no model"), pytest.param("", id="empty model")])
async def test_without_a_model_the_default_one_is_used(
    relay_to: RelayFactory, answered: FakeProvider, model: str | None
) -> None:
    await collect(await relay_to(models=("other",)), "POST", json={"messages": HELLO, "model": model})

    assert answered.requests[0]["model"] == "test-model"


async def test_a_body_of_exactly_the_limit_is_accepted(relay_to: RelayFactory, answered: FakeProvider) -> None:
    body = padded_body(1024)
    assert len(body) == 1024

    events = await collect(await relay_to(max_body_bytes=1024), "POST", data=chunked(body, size=100), headers=JSON)

    assert types(events)[-1] == "done"
    assert answered.requests[0]["messages"][0]["content"] == "x" * (1024 - len(padded_body(0)))


async def test_the_api_key_is_sent_as_a_bearer_token(relay_to: RelayFactory, answered: FakeProvider) -> None:
    await collect(await relay_to(api_key="sk-test-123"), params={"prompt": "hi"})

    assert answered.headers[0]["Authorization"] == "Bearer sk-test-123"


async def test_without_an_api_key_no_authorization_is_sent(relay_to: RelayFactory, answered: FakeProvider) -> None:
    await collect(await relay_to(), params={"prompt": "hi"})

    assert "authorization" not in {name.lower() for name in answered.headers[0]}


async def test_a_clients_authorization_header_is_not_passed_on(relay_to: RelayFactory, answered: FakeProvider) -> None:
    await collect(
        await relay_to(api_key="sk-relay"), params={"prompt": "hi"}, headers={"Authorization": "Bearer sk-user"}
    )

    assert answered.headers[0]["Authorization"] == "Bearer sk-relay"


# A body that never arrives does not hold its connection for ever.


async def send_slowly(
    client: Client, path: str, body: bytes, *, sent: int, pause: float = 0.0, headers: str = ""
) -> tuple[bytes, float]:
    """POST ``body`` over a raw socket: its first ``sent`` bytes, and the rest after ``pause`` if there is one.

    Returns everything the relay sent back until it closed the connection, and how long that took.
    """
    reader, writer = await asyncio.open_connection(client.host, client.port)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{headers}\r\n"
    )
    loop = asyncio.get_running_loop()
    try:
        writer.write(head.encode() + body[:sent])
        if pause:
            await asyncio.sleep(pause)
            writer.write(body[sent:])
        started = loop.time()
        async with asyncio.timeout(10):
            answer = await reader.read()  # to the end: the relay must close the connection
        return answer, loop.time() - started
    finally:
        writer.close()


def json_error(answer: bytes) -> tuple[int, str]:
    """The status and error code of a raw HTTP answer with a JSON error body."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    assert b"application/json" in head, answer
    return status, orjson.loads(body)["error"]["code"]


WHOLE = orjson.dumps({"messages": HELLO, "model": "demo"})


@pytest.mark.parametrize(
    ("path", "settings"),
    [
        pytest.param("/stream", {}, id="POST /stream"),
        pytest.param("/demo/v1/chat/completions", {"base_url": None}, id="the demo model"),
    ],
)
async def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closed(
    relay_to: RelayFactory, provider: FakeProvider, path: str, settings: dict[str, Any]
) -> None:
    client = await relay_to(body_timeout=0.5, **settings)

    answer, took = await send_slowly(client, path, WHOLE, sent=10)

    assert json_error(answer) == (408, "body_timeout")
    assert b"connection: close" in answer.lower()
    assert took < 3, f"the connection stayed open {took:.1f} s"
    assert provider.requests == []


async def test_a_slow_body_that_arrives_in_time_is_read(relay_to: RelayFactory, answered: FakeProvider) -> None:
    client = await relay_to(body_timeout=2, model="demo")

    answer, _ = await send_slowly(
        client, "/stream?format=ndjson", WHOLE, sent=10, pause=0.5, headers="Connection: close\r\n"
    )

    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert len(answered.requests) == 1


def test_by_default_a_body_has_at_most_30_seconds() -> None:
    assert 0 < Config().body_timeout <= 30


# Requests aiohttp's own parser refuses: its plain-text 400, and one line in the log at most, never a traceback.

MALFORMED = [
    pytest.param([b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"], id="a URL over 8 KB"),
    pytest.param(
        [b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n"], id="a header over 8 KB"
    ),
    pytest.param([b"FROB / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"], id="an unknown method"),
    pytest.param(
        [b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"FROB / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"],
        id="an unknown method after a good request",
    ),
    pytest.param([b"GET / HTTP/1.1\r\nHost: 127.0.0.1\rX-Sneaky: 1\r\n\r\n"], id="a bare CR"),
    pytest.param([b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Sneaky: a\x00b\r\n\r\n"], id="a NUL in a header"),
    pytest.param(
        [
            b"POST /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"mes\r\nzz\r\n'
        ],
        id="broken chunked framing",
    ),
]


@pytest.mark.parametrize("requests", MALFORMED)
async def test_a_malformed_request_gets_400_and_at_most_one_line_in_the_log(
    relay_to: RelayFactory, provider: FakeProvider, caplog: pytest.LogCaptureFixture, requests: list[bytes]
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await relay_to()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        for request in requests[:-1]:
            writer.write(request)
            await reader.readuntil(b'"ok"}')  # the answer to a good request, before the bad one
        writer.write(requests[-1])
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()

    assert answer.startswith(b"HTTP/1.0 400"), answer[:200]
    logged = [r for r in caplog.records if r.name.startswith("aiohttp.server")]
    assert len(logged) <= 1
    for record in logged:
        assert record.levelno <= logging.INFO and record.exc_info is None
        assert "\n" not in record.getMessage()
    assert provider.requests == []
