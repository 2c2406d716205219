"""From provider chunks to contract events: dialect details and the split invariant."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from helpers import TRANSCRIPTS, transcript
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.provider.chunks import ChunkTranslator, normalize_usage
from handlers.provider.sse_decoder import ServerSentEvent, SSEDecoder


def relay_events(pieces: list[bytes]) -> list[dict[str, Any]]:
    """What the relay makes of a provider body that arrived in these network reads."""
    decoder, translator = SSEDecoder(), ChunkTranslator()
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
    body = transcript(name)

    assert relay_events(split_at(body, cuts)) == relay_events([body])


@pytest.mark.parametrize("name", TRANSCRIPTS)
def test_byte_by_byte_gives_the_same_events(name: str) -> None:
    body = transcript(name)

    assert relay_events([body[i : i + 1] for i in range(len(body))]) == relay_events([body])


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
