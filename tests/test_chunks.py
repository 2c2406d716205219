"""From provider chunks to contract events: dialect details and the split invariant."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from helpers import TRANSCRIPTS, transcript, transcript_think
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.provider.chunks import ChunkTranslator, normalize_usage
from handlers.provider.sse_decoder import ServerSentEvent, SSEDecoder


def relay_events(pieces: list[bytes], think: str = "auto") -> list[dict[str, Any]]:
    """What the relay makes of a provider body that arrived in these network reads."""
    decoder, translator = SSEDecoder(), ChunkTranslator(think)
    out: list[dict[str, Any]] = []
    for piece in pieces:
        out += translator.feed(decoder.feed(piece))
        if translator.done:
            break
    out += translator.feed(decoder.close()) + translator.close()
    return [*out, translator.done_event()]


def split_at(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(body) + 1) for c in cuts})
    return [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]


@pytest.mark.parametrize("name", TRANSCRIPTS)
@settings(max_examples=150, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_any_split_into_network_reads_gives_the_same_events(name: str, cuts: list[int]) -> None:
    body, think = transcript(name), transcript_think(name)

    assert relay_events(split_at(body, cuts), think) == relay_events([body], think)


@pytest.mark.parametrize("name", TRANSCRIPTS)
def test_byte_by_byte_gives_the_same_events(name: str) -> None:
    body, think = transcript(name), transcript_think(name)

    assert relay_events([body[i : i + 1] for i in range(len(body))], think) == relay_events([body], think)


def message(obj: object) -> ServerSentEvent:
    return ServerSentEvent(orjson.dumps(obj).decode())


def test_nothing_after_done_is_read() -> None:
    translator = ChunkTranslator()
    out = translator.feed(
        [
            ServerSentEvent("[DONE]"),
            message({"choices": [{"index": 0, "delta": {"content": "late"}}]}),
        ]
    )

    assert out == [] and translator.done


def test_only_the_first_choice_is_relayed() -> None:
    translator = ChunkTranslator()
    out = translator.feed(
        [
            message(
                {"choices": [{"index": 1, "delta": {"content": "second"}}, {"index": 0, "delta": {"content": "first"}}]}
            ),
        ]
    )

    assert out == [{"type": "content", "text": "first"}]


def test_events_other_than_message_and_error_are_ignored() -> None:
    translator = ChunkTranslator()

    assert translator.feed([ServerSentEvent("{}", event="ping")]) == []


def test_reasoning_content_wins_over_reasoning_when_both_are_sent() -> None:
    translator = ChunkTranslator()
    out = translator.feed([message({"choices": [{"delta": {"reasoning_content": "a", "reasoning": "a"}}]})])

    assert out == [{"type": "reasoning", "text": "a"}]


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (
            {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        ),
        (
            {
                "prompt_tokens": 1,
                "completion_tokens": 2,
                "total_tokens": 3,
                "completion_tokens_details": {"reasoning_tokens": 2},
            },
            {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "reasoning_tokens": 2},
        ),
        (
            {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "reasoning_tokens": 1, "cost": 0.1},
            {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "reasoning_tokens": 1},
        ),
    ],
    ids=["plain", "openai-details", "flat-reasoning-tokens"],
)
def test_usage_keeps_the_shared_counts_and_reasoning_tokens(usage: dict[str, Any], expected: dict[str, int]) -> None:
    assert normalize_usage(usage) == expected


def test_an_error_object_in_the_data_carries_the_providers_status() -> None:
    translator = ChunkTranslator()
    translator.feed([message({"error": {"message": "overloaded", "code": 503}})])

    assert translator.error is not None
    assert translator.error.event() == {
        "type": "error",
        "code": "upstream_error",
        "message": "overloaded",
        "status": 503,
        "retryable": True,
    }


def test_events_before_an_in_band_error_are_kept_and_nothing_after_it() -> None:
    translator = ChunkTranslator()
    out = translator.feed(
        [
            message({"choices": [{"index": 0, "delta": {"content": "kept"}}]}),
            ServerSentEvent('{"message": "boom"}', event="error"),
            message({"choices": [{"index": 0, "delta": {"content": "dropped"}}]}),
        ]
    )

    assert out == [{"type": "content", "text": "kept"}]
    assert translator.error is not None and translator.error.message == "boom"


def delta(**fields: Any) -> ServerSentEvent:
    """A chunk whose first choice carries this delta."""
    return message({"choices": [{"index": 0, "delta": fields}]})


def test_reasoning_content_as_an_object_gives_its_text() -> None:
    out = ChunkTranslator().feed([delta(reasoning_content={"text": "I need"}), delta(reasoning_content={"text": " 4"})])

    assert out == [{"type": "reasoning", "text": "I need"}, {"type": "reasoning", "text": " 4"}]


def test_a_reasoning_object_without_text_gives_nothing() -> None:
    assert ChunkTranslator().feed([delta(reasoning_content={"signature": "EqQBCkgIBhAB"})]) == []


def test_reasoning_details_repeating_the_reasoning_are_not_counted_twice() -> None:
    details = [{"type": "reasoning.text", "text": "a"}]

    assert ChunkTranslator().feed([delta(reasoning="a", reasoning_details=details)]) == [
        {"type": "reasoning", "text": "a"}
    ]


def test_reasoning_details_are_never_relayed_even_alone() -> None:
    details = [
        {"type": "reasoning.encrypted", "data": "gAAAAABpSECRET", "id": "rs_1"},
        {"type": "reasoning.summary", "summary": "**Plan**", "format": "openai-responses-v1"},
    ]

    assert ChunkTranslator().feed([delta(reasoning=None, reasoning_details=details)]) == []


def test_content_as_a_list_of_thinking_and_text_parts_gives_reasoning_and_answer_in_order() -> None:
    parts = [
        {"type": "thinking", "thinking": [{"type": "text", "text": "Hmm"}, {"type": "text", "text": "."}]},
        {"type": "text", "text": "Hi"},
    ]

    assert ChunkTranslator().feed([delta(content=parts)]) == [
        {"type": "reasoning", "text": "Hmm."},
        {"type": "content", "text": "Hi"},
    ]


def test_a_thinking_part_given_as_a_plain_string_is_reasoning() -> None:
    assert ChunkTranslator().feed([delta(content=[{"type": "thinking", "thinking": "Hmm"}])]) == [
        {"type": "reasoning", "text": "Hmm"}
    ]


def test_content_parts_of_other_types_or_shapes_are_skipped_and_the_rest_kept() -> None:
    parts = [
        "stray",
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "text", "text": None},
        {"type": "thinking", "thinking": [{"type": "text", "text": 3}, "x"]},
        {"type": "text", "text": "kept"},
    ]

    assert ChunkTranslator().feed([delta(content=parts)]) == [{"type": "content", "text": "kept"}]


def test_text_parts_go_through_the_think_tag_splitter_like_string_content() -> None:
    parts = [{"type": "text", "text": "<think>r</think>"}, {"type": "text", "text": "Answer"}]

    assert ChunkTranslator().feed([delta(content=parts)]) == [
        {"type": "reasoning", "text": "r"},
        {"type": "content", "text": "Answer"},
    ]


def test_the_think_mode_is_the_translators_own() -> None:
    opened, plain = ChunkTranslator("open"), ChunkTranslator()

    assert opened.feed([delta(content="Hmm</think>Hi")]) == [
        {"type": "reasoning", "text": "Hmm"},
        {"type": "content", "text": "Hi"},
    ]
    assert plain.feed([delta(content="Hmm</think>Hi")]) == [{"type": "content", "text": "Hmm</think>Hi"}]


def test_usage_inside_the_finishing_choice_is_kept_with_its_reasoning_tokens() -> None:
    usage = {
        "prompt_tokens": 1,
        "completion_tokens": 2,
        "total_tokens": 3,
        "completion_tokens_details": {"reasoning_tokens": 1},
    }
    translator = ChunkTranslator()
    translator.feed([message({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "usage": usage}]})])

    assert translator.usage == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "reasoning_tokens": 1}


@pytest.mark.parametrize("index", [{}, {"index": None}], ids=["left out", "null"])
def test_a_tool_call_without_an_index_is_the_first_call(index: dict[str, Any]) -> None:
    # Servers that stream one call at a time may send no index (Gemini's OpenAI layer, Ollama).
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}, **index}
    translator = ChunkTranslator()

    out = translator.feed([delta(tool_calls=[call])])

    assert translator.error is None
    assert out == [{"type": "tool_call", "index": 0, "id": "call_1", "name": "get_weather", "arguments": "{}"}]


def test_calls_without_an_index_sent_together_are_told_apart_by_their_place() -> None:
    calls = [
        {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": "{}"}}
        for name in ("get_weather", "get_time")
    ]

    out = ChunkTranslator().feed([delta(tool_calls=calls)])

    assert [(event["index"], event["name"]) for event in out] == [(0, "get_weather"), (1, "get_time")]
