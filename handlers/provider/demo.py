"""The embedded demo model: an OpenAI-compatible ``/chat/completions`` that needs no key.

It streams like DeepSeek's reasoner: ``reasoning_content`` deltas first, then
a markdown answer that exercises the page's renderer (heading, list, table,
fenced code, inline code, a link), then a usage chunk with empty ``choices``
and ``data: [DONE]``. The text depends only on the prompt, so tests can rely
on it; pace and length come from the configuration. When no provider is
configured the relay calls it over real HTTP, so a default run exercises the
whole path.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import time
from typing import Any

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from ..config import DEMO_MODEL
from ..errors import let_go_of_cancellation
from ..keys import config_key
from ..routes.chat_request import read_body

__all__ = ["chat_completions", "demo_tokens", "models"]

_TOKEN = re.compile(r"\s*\S+|\s+")
# The shortest sleep worth taking when pacing tokens (see chat_completions).
_MIN_SLEEP = 0.002

_CODE = {
    "python": (
        "def fibonacci(n: int) -> list[int]:\n"
        "    numbers = [0, 1]\n"
        "    while len(numbers) < n:\n"
        "        numbers.append(numbers[-1] + numbers[-2])\n"
        "    return numbers[:n]\n"
    ),
    "javascript": (
        "async function readEvents(url) {\n"
        "  const source = new EventSource(url);\n"
        '  source.addEventListener("content", (e) => console.log(JSON.parse(e.data).text));\n'
        "}\n"
    ),
    "rust": (
        "fn mean(values: &[f64]) -> Option<f64> {\n"
        "    if values.is_empty() { return None; }\n"
        "    Some(values.iter().sum::<f64>() / values.len() as f64)\n"
        "}\n"
    ),
}

_ASPECTS = ["latency", "reliability", "cost", "clarity", "safety", "throughput", "simplicity"]


def demo_tokens(prompt: str, length: int = 0) -> tuple[list[str], list[str]]:
    """The reasoning tokens and answer tokens the demo gives for ``prompt``.

    ``length`` > 0 makes the answer exactly that many tokens long.
    """
    rng = random.Random(int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big"))
    topic = " ".join(prompt.split()[:12]) or "nothing in particular"
    language = rng.choice(sorted(_CODE))
    first, second = rng.sample(_ASPECTS, 2)
    reasoning = (
        f'The question is about "{topic}". I am the embedded demo model, so this is not real '
        f"thinking, but it streams as reasoning_content, the way a reasoning model's does. "
        f"I will weigh {first} against {second}, then answer in markdown with a heading, a "
        f"list, a table, a {language} code block and a link, so the page shows every piece."
    )
    rows = "\n".join(f"| {aspect} | {rng.randint(1, 9)}/10 |" for aspect in (first, second))
    answer = (
        f"## A demo answer\n\n"
        f"You asked: *{topic}*. This reply comes from thinkstream's **embedded demo model**, "
        f"which needs no key and no network.\n\n"
        f"What it shows:\n\n"
        f"- reasoning streamed into its own panel\n"
        f"- this answer streamed as live markdown\n"
        f"- a weighing of **{first}** and **{second}**\n\n"
        f"| Aspect | Score |\n|---|---|\n{rows}\n\n"
        f"```{language}\n{_CODE[language]}```\n\n"
        f"Point the relay at a real provider with `LLM_BASE_URL`, `LLM_API_KEY` and `LLM_MODEL`; "
        f"events follow the [Server-Sent Events specification]"
        f"(https://html.spec.whatwg.org/multipage/server-sent-events.html).\n"
    )
    tokens = _TOKEN.findall(answer)
    if length > 0:
        paragraph = 0
        while len(tokens) < length:
            paragraph += 1
            filler = f"\nParagraph {paragraph} goes on about {rng.choice(_ASPECTS)} so the answer is longer.\n\n"
            tokens.extend(_TOKEN.findall(filler))
        del tokens[length:]
    return _TOKEN.findall(reasoning), tokens


async def models(request: web.Request) -> web.Response:
    """``GET /demo/v1/models``, in the OpenAI list shape."""
    return web.json_response(
        {"object": "list", "data": [{"id": DEMO_MODEL, "object": "model", "owned_by": "thinkstream"}]}
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /demo/v1/chat/completions``, streaming or not."""
    config = request.config_dict[config_key]
    # Room for what the relay adds to the largest body a client may send it.
    raw = await read_body(request, 2 * config.max_body_bytes, config.body_timeout)
    try:
        body = orjson.loads(raw)
        messages = body["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of objects")
        prompt = _last_user_text(messages)
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        return _error(400, "send a JSON body with a 'messages' list that has a user message")
    model = body.get("model") if isinstance(body.get("model"), str) else DEMO_MODEL
    max_tokens = body.get("max_tokens")
    limit = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None
    reasoning, answer = demo_tokens(prompt, config.demo_tokens)
    pieces = [("reasoning_content", t) for t in reasoning] + [("content", t) for t in answer]
    finish = "stop"
    if limit is not None and len(pieces) > limit:
        pieces, finish = pieces[:limit], "length"
    usage = _usage(messages, pieces)
    chunk_id = "chatcmpl-demo-" + hashlib.sha256(prompt.encode()).hexdigest()[:16]
    if not body.get("stream"):
        text = {"reasoning_content": "", "content": ""}
        for field, token in pieces:
            text[field] += token
        message = {"role": "assistant", **text}
        choice = {"index": 0, "message": message, "finish_reason": finish}
        return web.json_response(
            {"id": chunk_id, "object": "chat.completion", "model": model, "choices": [choice], "usage": usage}
        )

    created = int(time.time())

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model}
        return orjson.dumps({**obj, "choices": [choice]}).decode()

    response = _EventSource(sep="\n", allow_all_methods=True)
    await response.prepare(request)
    try:
        await response.send(chunk({"role": "assistant", "content": None, "reasoning_content": ""}))
        loop = asyncio.get_running_loop()
        start, delay = loop.time(), config.demo_delay
        for i, (field, token) in enumerate(pieces):
            # Keep to a schedule, sleeping only when ahead of it by a sleep's worth: a sleep of
            # under a millisecond takes longer than asked, so per-token sleeps would run slow.
            ahead = start + (i + 1) * delay - loop.time()
            if delay and (ahead >= _MIN_SLEEP or (ahead > 0 and delay >= _MIN_SLEEP)):
                await asyncio.sleep(ahead)
            other = "content" if field == "reasoning_content" else "reasoning_content"
            await response.send(chunk({field: token, other: None}))
        await response.send(chunk({"content": "", "reasoning_content": None}, finish))
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            obj = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model}
            await response.send(orjson.dumps({**obj, "choices": [], "usage": usage}).decode())
        await response.send("[DONE]")
    except (ConnectionError, TimeoutError):
        pass  # The relay hung up (its client left, or it was cancelled): stop generating.
    finally:
        response.stop_streaming()
    return response


class _EventSource(EventSourceResponse):
    """aiohttp-sse's response, whose keep-alive task lets go of its CancelledError once stopped.

    Awaiting ``wait()`` would collect it as well, but would keep the handler
    running on a connection the relay may have dropped, and aiohttp then ties
    the connection's error to the request, a cycle of its own.
    """

    def stop_streaming(self) -> None:
        super().stop_streaming()
        if self._ping_task is not None:
            self._ping_task.add_done_callback(let_go_of_cancellation)


def _last_user_text(messages: Any) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # OpenAI content parts
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            if isinstance(content, str):
                return content
    raise ValueError("no user message")


def _usage(messages: list[dict[str, Any]], pieces: list[tuple[str, str]]) -> dict[str, Any]:
    prompt_tokens = sum(len(_TOKEN.findall(str(m.get("content") or ""))) for m in messages)
    reasoning_tokens = sum(1 for field, _ in pieces if field == "reasoning_content")
    completion = len(pieces)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)
