"""Each provider dialect's recorded stream becomes the same thinkstream events.

The text deltas one network read brings are relayed as one event per kind, so
these tests speak of the text and the order of the kinds, not of how many
``reasoning`` or ``content`` events carry them.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import (
    TRANSCRIPTS,
    FakeProvider,
    RelayFactory,
    Reply,
    chunk,
    collect,
    kinds,
    merged,
    parse_sse,
    sse,
    text_of,
    transcript,
    transcript_think,
    types,
    without_timings,
)


async def test_deepseek_reasoner_streams_reasoning_then_content(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = Reply(transcript("deepseek_reasoner.sse"))
    events = await collect(await relay_to(), params={"prompt": "greet me"})

    assert kinds(events) == ["meta", "reasoning", "content", "done"]
    assert text_of(events, "reasoning") == "Okay, the user wants a greeting — 你好."
    assert text_of(events, "content") == "Hello there! 👋"
    assert without_timings(events[-1].data) == {
        "type": "done",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30, "reasoning_tokens": 12},
    }


async def test_openai_tool_call_fragments_are_relayed_in_order(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = Reply(transcript("openai_tool_calls.sse"))
    events = await collect(await relay_to(), params={"prompt": "weather in Paris?"})

    assert types(events) == ["meta", "tool_call", "tool_call", "tool_call", "done"]
    assert [e.data for e in events[1:4]] == [
        {"type": "tool_call", "index": 0, "id": "call_abc", "name": "get_weather", "arguments": ""},
        {"type": "tool_call", "index": 0, "arguments": '{"city"'},
        {"type": "tool_call", "index": 0, "arguments": ':"Paris"}'},
    ]
    assert events[-1].data["finish_reason"] == "tool_calls"


async def test_openai_usage_from_the_final_chunk_with_empty_choices(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = Reply(transcript("openai_content.sse"))
    events = await collect(await relay_to(), params={"prompt": "capital of France"})

    assert text_of(events, "content") == "The capital of France is **Paris**."
    assert events[-1].data["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 9,
        "total_tokens": 21,
    }


async def test_vllm_reasoning_field(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = Reply(transcript("vllm_reasoning.sse"))
    events = await collect(await relay_to(), params={"prompt": "2+2"})

    assert text_of(events, "reasoning") == "Let me add 2 and 2."
    assert text_of(events, "content") == "2 + 2 = 4"
    assert events[-1].data["usage"]["completion_tokens"] == 12


async def test_openrouter_processing_comments_and_crlf_lines(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = Reply(transcript("openrouter_reasoning.sse"))
    events = await collect(await relay_to(), params={"prompt": "think"})

    assert kinds(events) == ["meta", "reasoning", "content", "done"]
    assert text_of(events, "reasoning") == "Thinking hard."
    assert events[-1].data["usage"]["reasoning_tokens"] == 4


async def test_think_block_in_content_becomes_reasoning_and_never_leaks(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = Reply(transcript("think_in_content.sse"))
    events = await collect(await relay_to(), params={"prompt": "2+2"})

    assert text_of(events, "reasoning").strip() == "The user asks for 2+2."
    assert text_of(events, "content") == "It is 4 <not a tag>."
    assert all("think>" not in e.data.get("text", "") for e in events)


@pytest.mark.parametrize("name", TRANSCRIPTS)
@pytest.mark.parametrize("size", [1, 7, 64], ids=lambda n: f"{n}-byte-writes")
async def test_network_chunking_does_not_change_the_events(
    relay_to: RelayFactory, provider: FakeProvider, name: str, size: int
) -> None:
    body = transcript(name)
    client = await relay_to(think=transcript_think(name))
    provider.reply = Reply(body)
    whole = await collect(client, params={"prompt": "x"})
    provider.reply = Reply(body, chunks=[size] * len(body), delay=0.0005 if size == 1 else 0.0)
    split = await collect(client, params={"prompt": "x"})

    # Small writes may bring a delta per read, and so more, shorter text events: the same text, in the same order.
    assert merged(split[1:]) == merged(whole[1:])


def tool_call(arguments: str) -> dict[str, Any]:
    """A ``chat.completion.chunk`` with one tool-call fragment."""
    call = {"index": 0, "function": {"arguments": arguments}}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}


async def test_text_deltas_that_arrive_in_one_read_are_merged_per_kind_and_no_further(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    reads = [
        # Two thoughts and two tokens in one read: one reasoning event, then one content event.
        sse(chunk(reasoning="Let me"), chunk(reasoning=" think."), chunk(content="The"), chunk(content=" answer")),
        # A token alone in its read is relayed alone, not kept back for the next one.
        sse(chunk(content=" is")),
        # A tool call is never merged, and the text on either side of it is not merged across it.
        sse(chunk(content=" 4"), tool_call('{"x":'), chunk(content="."), chunk(finish="stop"), "[DONE]"),
    ]
    # Writes far enough apart to reach the relay as separate reads.
    provider.reply = Reply(b"".join(reads), chunks=[len(r) for r in reads], delay=0.05)
    events = await collect(await relay_to(), params={"prompt": "2+2"})

    assert [without_timings(e.data) for e in events[1:]] == [
        {"type": "reasoning", "text": "Let me think."},
        {"type": "content", "text": "The answer"},
        {"type": "content", "text": " is"},
        {"type": "content", "text": " 4"},
        {"type": "tool_call", "index": 0, "arguments": '{"x":'},
        {"type": "content", "text": "."},
        {"type": "done", "finish_reason": "stop", "usage": None},
    ]


# Shapes beyond the two reasoning fields: (transcript, reasoning, answer), from the providers' documented formats.
SEPARATED = [
    pytest.param(
        "magistral_content_parts.sse",
        "Okay, the user says hello. Greet back.",
        "Hello! How can I help?",
        id="Magistral: content as a list of thinking and text parts",
    ),
    pytest.param(
        "gateway_reasoning_object.sse",
        "I need to add 2 and 2.",
        "2 + 2 = 4",
        id="a gateway: reasoning_content as an object",
    ),
    pytest.param(
        "openrouter_reasoning_details.sse",
        "**Fetching weather**",
        "It is sunny in Paris.",
        id="OpenRouter: reasoning repeated in reasoning_details",
    ),
    pytest.param(
        "moonshot_usage_in_choice.sse",
        "The user greets in Chinese.",
        "你好, friend.",
        id="Moonshot: usage inside the choice",
    ),
    pytest.param(
        "thinking_tag_in_content.sse", "The user wants a haiku.", "Autumn moon rises", id="<thinking> in content"
    ),
    pytest.param("reasoning_tag_in_content.sse", "Two plus two is four.", "4", id="<reasoning> in content"),
    pytest.param("reason_tag_in_content.sse", "Check the units.", "It is 5 km.", id="<reason> in content"),
    pytest.param("thought_tag_in_content.sse", "Short question.", "Yes.", id="<thought> in content"),
    pytest.param(
        "sky_t1_thought_in_content.sse",
        "\n\nAdd them.\n\n",
        "The sum is 4.",
        id="<|begin_of_thought|> in content",
    ),
    pytest.param(
        "kimi_think_in_content.sse",
        "The picture shows a cat.",
        "A cat on a mat.",
        id="Kimi's ◁think▷ in content",
    ),
    pytest.param(
        "seed_oss_think_in_content.sse",
        "Greeting.<seed:cot_budget_reflect>12 tokens used</seed:cot_budget_reflect>",
        "Hello!",
        id="Seed-OSS <seed:think> in content",
    ),
    pytest.param("magistral_gguf_think_in_content.sse", "Simple sum.", "2 + 2 = 4.", id="[THINK] in content"),
    pytest.param(
        "gpt_oss_harmony_in_content.sse",
        "User says hi. Reply politely.",
        "Hello! How can I help?",
        id="gpt-oss harmony markup in content",
    ),
    pytest.param(
        "open_think_qwq.sse",
        "Okay, the user asks for 2+2.\n",
        "2 + 2 = **4**.",
        id="QwQ: the template opened <think>",
    ),
]


@pytest.mark.parametrize(("name", "reasoning", "answer"), SEPARATED)
async def test_each_dialect_streams_its_reasoning_then_its_answer_and_no_markup(
    relay_to: RelayFactory, provider: FakeProvider, name: str, reasoning: str, answer: str
) -> None:
    provider.reply = Reply(transcript(name))
    events = await collect(await relay_to(think=transcript_think(name)), params={"prompt": "hi"})

    assert kinds(events) == ["meta", "reasoning", "content", "done"]
    assert text_of(events, "reasoning") == reasoning
    assert text_of(events, "content") == answer
    assert events[-1].data["finish_reason"] == "stop"


async def test_a_prompt_opened_think_block_cut_off_before_its_closing_tag_is_all_reasoning_and_done_says_length(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = Reply(transcript("open_think_cut_off.sse"))
    events = await collect(await relay_to(think="open"), params={"prompt": "primes"})

    assert kinds(events) == ["meta", "reasoning", "done"]
    assert text_of(events, "reasoning") == "Okay, let me count the primes below 100: 2, 3, 5"
    assert events[-1].data["finish_reason"] == "length"


async def test_without_the_open_setting_a_model_whose_output_only_closes_the_block_keeps_it_all_as_answer(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    # The setting is per model, never a guess: a model with thinking off must not lose its answer to reasoning.
    provider.reply = Reply(transcript("open_think_qwq.sse"))
    events = await collect(await relay_to(), params={"prompt": "2+2"})

    assert kinds(events) == ["meta", "content", "done"]
    assert text_of(events, "content") == "Okay, the user asks for 2+2.\n</think>\n\n2 + 2 = **4**."


async def test_openrouters_encrypted_reasoning_never_reaches_the_client(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = Reply(transcript("openrouter_reasoning_details.sse"))
    client = await relay_to()
    async with client.get("/stream", params={"prompt": "weather?"}) as response:
        body = await response.read()

    assert b"gAAAAB" not in body
    assert b"encrypted" not in body
    assert text_of(parse_sse(body), "reasoning") == "**Fetching weather**"


@pytest.mark.parametrize(
    ("name", "usage"),
    [
        pytest.param(
            "deepseek_reasoner.sse",
            {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30, "reasoning_tokens": 12},
            id="DeepSeek: beside the finishing choice",
        ),
        pytest.param(
            "openrouter_reasoning_details.sse",
            {"prompt_tokens": 12, "completion_tokens": 80, "total_tokens": 92, "reasoning_tokens": 64},
            id="OpenRouter: a last chunk without choices",
        ),
        pytest.param(
            "moonshot_usage_in_choice.sse",
            {"prompt_tokens": 19, "completion_tokens": 13, "total_tokens": 32, "reasoning_tokens": 7},
            id="Moonshot: inside the finishing choice",
        ),
        pytest.param(
            "magistral_content_parts.sse",
            {"prompt_tokens": 9, "completion_tokens": 31, "total_tokens": 40},
            id="Mistral: no reasoning count given",
        ),
    ],
)
async def test_usage_keeps_the_reasoning_tokens_wherever_the_provider_sends_them(
    relay_to: RelayFactory, provider: FakeProvider, name: str, usage: dict[str, int]
) -> None:
    provider.reply = Reply(transcript(name))
    events = await collect(await relay_to(), params={"prompt": "hi"})

    assert events[-1].data["usage"] == usage
