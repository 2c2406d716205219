"""Read and validate a client's chat request before anything goes upstream.

Every rule here answers with a :class:`RequestError` that says what to fix;
nothing malformed ever reaches the provider or raises past the handler.
"""

from __future__ import annotations

import asyncio
import math
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from ..config import Config
from ..errors import RequestError

__all__ = ["ChatRequest", "read_body", "read_chat_request"]

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_BODY_FIELDS = ("messages", "model", "temperature", "top_p", "max_tokens", "tools", "tool_choice")
_MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated request: the messages and the sampling options the client chose."""

    messages: tuple[dict[str, Any], ...]
    model: str
    options: Mapping[str, Any]

    def payload(self, include_usage: bool) -> dict[str, Any]:
        """The body of the upstream ``/chat/completions`` call."""
        body: dict[str, Any] = {"model": self.model, "messages": list(self.messages), "stream": True}
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        body.update(self.options)
        return body


async def read_chat_request(request: web.Request, config: Config) -> ChatRequest:
    """``GET ?prompt=…&system=…&model=…`` or ``POST`` with a JSON body."""
    if request.method == "GET":
        _check_query_encoding(request.rel_url.raw_query_string)
        return _from_query(request.query, config)
    if request.content_type != "application/json":
        # A page may send text/plain or a form to any server without asking (no CORS preflight); JSON it may not.
        raise RequestError(
            "send the body as JSON, with 'Content-Type: application/json'",
            code="unsupported_media_type",
            http_status=415,
        )
    body = await read_body(request, config.max_body_bytes, config.body_timeout)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    return _from_json(data, config)


def _check_query_encoding(raw: str) -> None:
    """A query that is not UTF-8 is refused, as such a JSON body is: decoded, it would ask "\ufffd\ufffd"."""
    try:
        urllib.parse.parse_qsl(raw, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise RequestError(
            "the URL's query is not UTF-8 once its %-escapes are decoded", code="invalid_request"
        ) from None


def _from_query(query: Mapping[str, str], config: Config) -> ChatRequest:
    prompt = query.get("prompt", "")
    if not prompt.strip():
        raise RequestError("add a non-empty ?prompt= to the URL", code="missing_prompt")
    messages: list[dict[str, Any]] = []
    system = query.get("system", "")
    if system.strip():
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    _check_size(messages, config)
    return ChatRequest(tuple(messages), _model(query.get("model"), config), {})


async def read_body(request: web.Request, limit: int, within: float) -> bytes:
    """Read at most ``limit`` bytes within ``within`` seconds; say 413 instead of buffering more, 408 if slower.

    aiohttp waits for a body as long as its client likes, so a client that
    announces a body and sends none would hold its connection for ever.
    """
    too_large = RequestError(f"the body is larger than {limit} bytes", code="body_too_large", http_status=413)
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(within):
            async for chunk in request.content.iter_any():
                body += chunk
                if len(body) > limit:
                    raise too_large
    except TimeoutError:
        # The rest will never be read: with the body over, aiohttp closes the connection after the 408
        # instead of waiting (lingering) for bytes that do not come.
        request.content.feed_eof()
        raise RequestError(
            f"the request body did not arrive within {within:g} s", code="body_timeout", http_status=408
        ) from None
    except web.RequestPayloadError:
        # Its Content-Encoding does not decode (aiohttp decompresses as it reads): the rest cannot be read either.
        request.content.feed_eof()
        encoding = request.headers.get("Content-Encoding", "none")[:50]
        raise RequestError(
            f"the request body does not decode as its Content-Encoding ({encoding!r}) says", code="unreadable_body"
        ) from None
    return bytes(body)


def _from_json(data: Any, config: Config) -> ChatRequest:
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object with a 'messages' list", code="invalid_request")
    unknown = sorted(set(data) - set(_BODY_FIELDS) - {"stream"})
    if unknown:
        raise RequestError(
            f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(_BODY_FIELDS)}",
            code="invalid_request",
        )
    messages = _messages(data.get("messages"))
    _check_size(messages, config)
    options: dict[str, Any] = {}
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        if data.get(name) is not None:
            options[name] = _number(data[name], name, low, high)
    if data.get("max_tokens") is not None:
        value = data["max_tokens"]
        if not _is_int(value) or value < 1:
            raise RequestError("max_tokens must be a positive integer", code="invalid_parameter")
        options["max_tokens"] = value
    if data.get("tools") is not None:
        tools = data["tools"]
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise RequestError("tools must be a list of objects", code="invalid_parameter")
        _check_writable({"tools": tools}, "tools", "invalid_parameter")
        options["tools"] = tools
    if data.get("tool_choice") is not None:
        if not isinstance(data["tool_choice"], (str, dict)):
            raise RequestError("tool_choice must be a string or an object", code="invalid_parameter")
        _check_writable({"tool_choice": data["tool_choice"]}, "tool_choice", "invalid_parameter")
        options["tool_choice"] = data["tool_choice"]
    return ChatRequest(messages, _model(data.get("model"), config), options)


def _messages(value: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list) or not value:
        raise RequestError("'messages' must be a non-empty list of {role, content}", code="invalid_messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with role and content", code="invalid_messages")
        extra = sorted(set(message) - _MESSAGE_FIELDS)
        if extra:
            raise RequestError(f"{where} has unknown field(s) {', '.join(extra)}", code="invalid_messages")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise RequestError(
                f"{where}.role must be one of {', '.join(sorted(ROLES))}, not {repr(role)[:100]}",
                code="invalid_messages",
            )
        content = message.get("content")
        calls = message.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, list)):
            raise RequestError(f"{where}.tool_calls must be a list on an assistant message", code="invalid_messages")
        if calls:
            _check_writable({"messages": [{"tool_calls": calls}]}, f"{where}.tool_calls", "invalid_messages")
        if not isinstance(content, str) and not (content is None and calls):
            raise RequestError(f"{where}.content must be a string", code="invalid_messages")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise RequestError(f"{where} is a tool result and needs a tool_call_id", code="invalid_messages")
        for name in ("name", "tool_call_id"):
            if name in message and not isinstance(message[name], str):
                raise RequestError(f"{where}.{name} must be a string", code="invalid_messages")
        out.append(dict(message))
    return tuple(out)


def _check_writable(where: dict[str, Any], name: str, code: str) -> None:
    """Refuse a value nested deeper than the provider request can be written (orjson writes 254 levels,
    though it reads 1,024); ``where`` puts it as deep as it will be in that request."""
    try:
        orjson.dumps(where)
    except orjson.JSONEncodeError:
        raise RequestError(f"{name} is nested too deeply", code=code) from None


def _check_size(messages: Sequence[dict[str, Any]], config: Config) -> None:
    """Bound what one request can make the provider read (and bill)."""
    if len(messages) > config.max_messages:
        raise RequestError(
            f"{len(messages)} messages is more than the {config.max_messages} allowed", code="too_many_messages"
        )
    chars = sum(len(m.get("content") or "") for m in messages)
    if chars > config.max_chars:
        raise RequestError(
            f"the messages hold {chars} characters, more than the {config.max_chars} allowed", code="too_much_text"
        )


def _model(value: Any, config: Config) -> str:
    if value is None or value == "":
        return config.default_model
    if not isinstance(value, str):
        raise RequestError("model must be a string", code="invalid_parameter")
    if value not in config.allowed_models:
        raise RequestError(
            f"model {value!r} is not offered here; choose one of: {', '.join(config.allowed_models)}",
            code="model_not_allowed",
        )
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number", code="invalid_parameter")
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low:g} and {high:g}", code="invalid_parameter")
    return float(value)
