"""The embedded demo model, on its own and end to end through ``/stream``."""

from __future__ import annotations

import re

from helpers import RelayFactory, collect, text_of, types

from handlers.provider.demo import demo_tokens


async def test_default_run_streams_reasoning_then_a_markdown_answer(relay: RelayFactory) -> None:
    events = await collect(await relay(), params={"prompt": "Explain server-sent events"})

    kinds = types(events)
    assert kinds[0] == "meta" and kinds[-1] == "done"
    assert kinds.index("content") > kinds.index("reasoning")
    assert "reasoning" not in kinds[kinds.index("content") :]
    assert events[0].data["model"] == "demo"


async def test_answer_exercises_every_markdown_feature_the_page_renders(relay: RelayFactory) -> None:
    answer = text_of(await collect(await relay(), params={"prompt": "show me markdown"}), "content")

    assert re.search(r"^## ", answer, re.M), "heading"
    assert re.search(r"^- ", answer, re.M), "list"
    assert re.search(r"^\|---\|---\|$", answer, re.M), "table"
    assert re.search(r"^```\w+\n.*?^```$", answer, re.M | re.S), "fenced code with a language"
    assert re.search(r"[^`]`[A-Z_]+`[^`]", answer), "inline code"
    assert re.search(r"\[[^\]]+\]\(https://[^)]+\)", answer), "link"


async def test_same_prompt_same_text_and_another_prompt_another_text(relay: RelayFactory) -> None:
    client = await relay()
    first = await collect(client, params={"prompt": "tell me about rivers"})
    again = await collect(client, params={"prompt": "tell me about rivers"})
    other = await collect(client, params={"prompt": "tell me about mountains"})

    for kind in ("reasoning", "content"):
        assert text_of(first, kind) == text_of(again, kind)
    assert text_of(first, "content") != text_of(other, "content")


async def test_usage_counts_the_tokens_it_streamed(relay: RelayFactory) -> None:
    # Tokens that arrive together may be relayed as one event: they are counted from the demo's own list.
    reasoning, answer = demo_tokens("count")
    events = await collect(await relay(), params={"prompt": "count"})

    assert (text_of(events, "reasoning"), text_of(events, "content")) == ("".join(reasoning), "".join(answer))
    usage = events[-1].data["usage"]
    assert usage["reasoning_tokens"] == len(reasoning)
    assert usage["completion_tokens"] == len(reasoning) + len(answer)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_length_is_settable(relay: RelayFactory) -> None:
    _, answer = demo_tokens("long", 500)
    events = await collect(await relay(demo_tokens=500), params={"prompt": "long"})

    assert len(answer) == 500
    assert text_of(events, "content") == "".join(answer)
    usage = events[-1].data["usage"]
    assert usage["completion_tokens"] - usage["reasoning_tokens"] == 500


async def test_max_tokens_cuts_the_answer_with_finish_reason_length(relay: RelayFactory) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    events = await collect(await relay(), "POST", json=body)

    reasoning, answer = demo_tokens("hi")
    first_five = (reasoning + answer)[:5]
    assert text_of(events, "reasoning") + text_of(events, "content") == "".join(first_five)
    assert events[-1].data["usage"]["completion_tokens"] == 5
    assert events[-1].data["finish_reason"] == "length"


async def test_pace_is_settable(relay: RelayFactory) -> None:
    reasoning, _ = demo_tokens("slow")
    delay, answer_tokens = 0.01, 10
    events = await collect(await relay(demo_delay=delay, demo_tokens=answer_tokens), params={"prompt": "slow"})

    # A lower bound only: each token waits at least the configured delay.
    assert events[-1].data["duration_ms"] >= (len(reasoning) + answer_tokens) * delay * 1000


async def test_demo_speaks_openai_chat_completions_directly(relay: RelayFactory) -> None:
    client = await relay()
    async with client.get("/demo/v1/models") as response:
        assert (await response.json())["data"][0]["id"] == "demo"
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    async with client.post("/demo/v1/chat/completions", json=body) as response:
        completion = await response.json()

    message = completion["choices"][0]["message"]
    reasoning, answer = demo_tokens("hi")
    assert message["reasoning_content"] == "".join(reasoning)
    assert message["content"] == "".join(answer)


async def test_demo_refuses_a_request_without_a_user_message(relay: RelayFactory) -> None:
    client = await relay()
    async with client.post("/demo/v1/chat/completions", json={"messages": [{"role": "system"}]}) as response:
        assert response.status == 400
        assert "messages" in (await response.json())["error"]["message"]


async def test_demo_refuses_messages_that_are_not_objects(relay: RelayFactory) -> None:
    client = await relay()
    body = {"messages": ["hello", {"role": "user", "content": "hi"}]}
    async with client.post("/demo/v1/chat/completions", json=body) as response:
        assert response.status == 400
        assert "messages" in (await response.json())["error"]["message"]
