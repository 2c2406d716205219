"""Turn an OpenAI-style ``chat.completion.chunk`` stream into thinkstream events.

Pure: decoded server-sent events in, event-contract objects out. It knows the
provider dialects: reasoning as ``delta.reasoning_content`` (DeepSeek,
SiliconFlow, SGLang, llama.cpp), as an object ``{"text": …}`` there (gateways
in front of Bedrock), as ``delta.reasoning`` (vLLM, OpenRouter, Ollama; never
OpenRouter's ``reasoning_details``, which repeat it or hold encrypted blobs),
as ``thinking`` parts of a list-valued ``delta.content``
(Mistral's Magistral), or inside a leading thinking block of the content (see
``think_tags``); tool-call fragments; usage from the final chunk whose
``choices`` is empty, or from inside the finishing choice (Moonshot);
``[DONE]``; and errors sent as data or as ``event: error``.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import UpstreamError, UpstreamProtocolError, excerpt
from .sse_decoder import ServerSentEvent
from .think_tags import ThinkSplitter

__all__ = ["ChunkTranslator", "coalesce", "normalize_usage"]

Event = dict[str, Any]


class ChunkTranslator:
    """Stateful: one per upstream response."""

    __slots__ = ("_secret", "_think", "done", "error", "finish_reason", "usage")

    def __init__(self, think: str = "auto", secret: str | None = None) -> None:
        # The provider's key, kept out of the provider's words quoted in errors.
        self._secret = secret
        self.done = False
        # An in-band error stops the translation; events before it still count.
        self.error: UpstreamError | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        # How the content is read for a leading thinking block: a per-model setting.
        self._think = ThinkSplitter(think)

    @property
    def complete(self) -> bool:
        """Whether the answer is whole: ``[DONE]`` seen, or at least a finish reason."""
        return self.done or self.finish_reason is not None

    def feed(self, events: list[ServerSentEvent]) -> list[Event]:
        """Translate decoded events, up to ``[DONE]`` or an in-band error (see ``error``)."""
        out: list[Event] = []
        try:
            self._feed(events, out)
        except UpstreamError as exc:
            self.error = exc
            out.extend(self._flush())
        return out

    def _feed(self, events: list[ServerSentEvent], out: list[Event]) -> None:
        for sse in events:
            if self.done or self.error is not None:
                break
            if sse.event == "error":
                raise _in_band_error(sse.data, self._secret)
            if sse.event != "message":
                continue  # No OpenAI-compatible provider sends others; ignore, as a browser would.
            data = sse.data
            if data.strip() == "[DONE]":
                self.done = True
                out.extend(self._flush())
                break
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise UpstreamProtocolError(
                    f"the provider sent a line that is not JSON: {excerpt(data, 200, self._secret)!r}",
                    code="upstream_bad_json",
                ) from None
            if not isinstance(chunk, dict):
                raise UpstreamProtocolError(
                    f"the provider sent JSON that is not an object: {excerpt(data, 200, self._secret)!r}",
                    code="upstream_bad_json",
                )
            if chunk.get("error") is not None:
                raise _error_from_object(chunk, self._secret)
            self._chunk(chunk, out)

    def done_event(self) -> Event:
        """The ``done`` event for a whole answer, before the relay adds timings."""
        return {"type": "done", "finish_reason": self.finish_reason, "usage": self.usage}

    def close(self) -> list[Event]:
        """End of the upstream body: release text held back by the ``<think>`` splitter."""
        return self._flush()

    def _chunk(self, chunk: dict[str, Any], out: list[Event]) -> None:
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = normalize_usage(usage)
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            # Only the first choice is relayed: the contract is one answer per stream.
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta(delta, out)
            finish = choice.get("finish_reason")
            if isinstance(finish, str) and finish:
                if finish == "error":
                    raise _error_from_object(chunk, self._secret)
                self.finish_reason = finish
                # Moonshot sends the usage inside the finishing choice instead of beside it.
                usage = choice.get("usage")
                if isinstance(usage, dict):
                    self.usage = normalize_usage(usage)

    def _delta(self, delta: dict[str, Any], out: list[Event]) -> None:
        # When a chunk carries the reasoning in two fields, they hold the same text: the first is taken.
        # OpenRouter's reasoning_details repeat its reasoning field, or hold encrypted blobs: never read.
        # Per token, the rarer shapes cost only a comparison with None.
        reasoning = delta.get("reasoning_content")
        if not isinstance(reasoning, str) or not reasoning:
            first = reasoning
            reasoning = delta.get("reasoning")
            if first is not None and isinstance(first, dict):
                reasoning = _object_text(first) or reasoning
        if isinstance(reasoning, str) and reasoning:
            out.append({"type": "reasoning", "text": reasoning})
        content = delta.get("content")
        if isinstance(content, str):
            if content:
                thought, answer = self._think.feed(content)
                if thought:
                    out.append({"type": "reasoning", "text": thought})
                if answer:
                    out.append({"type": "content", "text": answer})
        elif content is not None and isinstance(content, list):
            self._parts(content, out)
        tool_calls = delta.get("tool_calls")
        if isinstance(tool_calls, list):
            for position, call in enumerate(tool_calls):
                if isinstance(call, dict):
                    out.append(_tool_call(call, position))

    def _content(self, text: str, out: list[Event]) -> None:
        """Content text, through the thinking-block splitter (``_delta`` inlines this: it runs per token)."""
        thought, answer = self._think.feed(text)
        if thought:
            out.append({"type": "reasoning", "text": thought})
        if answer:
            out.append({"type": "content", "text": answer})

    def _parts(self, parts: list[Any], out: list[Event]) -> None:
        """Mistral's Magistral: content as a list of ``text`` and ``thinking`` parts."""
        for part in parts:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "text":
                text = part.get("text")
                if isinstance(text, str) and text:
                    self._content(text, out)
            elif kind == "thinking":
                thought = _joined_text(part.get("thinking"))
                if thought:
                    out.append({"type": "reasoning", "text": thought})

    def _flush(self) -> list[Event]:
        thought, answer = self._think.close()
        out: list[Event] = []
        if thought:
            out.append({"type": "reasoning", "text": thought})
        if answer:
            out.append({"type": "content", "text": answer})
        return out


def coalesce(events: list[Event]) -> list[Event]:
    """Merge neighbouring ``reasoning`` or ``content`` events into one, keeping their order.

    Applied to the events one network read brought: a provider that sends
    faster than the relay reads (or a burst after a stall) then costs one event
    per kind and read instead of one per token, and a token that arrived alone
    is never held back for a neighbour.
    """
    if len(events) < 2:
        return events
    out: list[Event] = []
    texts: list[str] = []  # the texts of out[-1] while it is a text event
    for event in events:
        kind = event["type"]
        if texts and kind == out[-1]["type"]:
            texts.append(event["text"])
            continue
        if len(texts) > 1:
            out[-1]["text"] = "".join(texts)
        out.append(event)
        texts = [event["text"]] if kind == "content" or kind == "reasoning" else []
    if len(texts) > 1:
        out[-1]["text"] = "".join(texts)
    return out


def _object_text(value: dict[str, Any]) -> str:
    """Gateways in front of Bedrock send ``reasoning_content`` as ``{"text": …}`` (or only a signature)."""
    text = value.get("text")
    return text if isinstance(text, str) else ""


def _joined_text(value: Any) -> str:
    """A string, or the text of a list of ``{"type": "text", "text": …}`` parts."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        return ""
    return "".join(part["text"] for part in value if isinstance(part, dict) and isinstance(part.get("text"), str))


def _tool_call(call: dict[str, Any], position: int) -> Event:
    index = call.get("index")
    if index is None:
        # Left out, or null: servers that send each call whole (Gemini's, Ollama's) may give no index;
        # several calls in one chunk are then told apart by their place in it.
        index = position
    if not isinstance(index, int) or isinstance(index, bool):
        raise UpstreamProtocolError(f"the provider sent a tool call whose index is not a number: {str(index)[:50]}")
    event: Event = {"type": "tool_call", "index": index}
    if isinstance(call.get("id"), str):
        event["id"] = call["id"]
    function = call.get("function")
    if not isinstance(function, dict):
        function = {}
    if isinstance(function.get("name"), str):
        event["name"] = function["name"]
    arguments = function.get("arguments")
    event["arguments"] = arguments if isinstance(arguments, str) else ""
    return event


_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def normalize_usage(usage: dict[str, Any]) -> dict[str, int]:
    """Keep the token counts every provider shares, plus reasoning tokens when given."""
    out = {name: usage[name] for name in _USAGE_FIELDS if isinstance(usage.get(name), int)}
    details = usage.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    if reasoning is None:
        reasoning = usage.get("reasoning_tokens")
    if isinstance(reasoning, int):
        out["reasoning_tokens"] = reasoning
    return out


def _in_band_error(data: str, secret: str | None) -> UpstreamError:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return UpstreamError(excerpt(data.strip(), 500, secret) or "the provider reported an error", retryable=True)
    if isinstance(body, dict):
        return _error_from_object(body, secret)
    return UpstreamError(excerpt(str(body), 500, secret), retryable=True)


def _error_from_object(body: dict[str, Any], secret: str | None) -> UpstreamError:
    """An error object sent inside the stream (OpenAI, OpenRouter and vLLM shapes)."""
    error = body.get("error", body)
    status: int | None = None
    if isinstance(error, dict):
        message = error.get("message") or error.get("msg") or "the provider reported an error"
        code = error.get("code")
        if isinstance(code, int) and 400 <= code < 600:
            status = code
    else:
        message = str(error)
    # Without a status, assume the provider's side failed (overload, crash): worth a retry.
    retryable = status is None or status == 429 or status >= 500
    return UpstreamError(excerpt(str(message), 2000, secret), retryable=retryable, upstream_status=status)
