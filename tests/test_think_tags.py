"""Specification of the splitter that takes a leading ``<think>…</think>`` block (or a cousin) out of content.

``feed(text)`` returns the ``(reasoning, content)`` a delta makes certain; ``close()``
releases what was held back. Only an opening tag of the table at the very start of the
content (after optional whitespace) opens a block, and tags may be split across deltas in
any way. In the ``open`` mode (the chat template opened ``<think>`` in the prompt) the
content is reasoning until ``</think>``; in the ``none`` mode it is only answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import combinations, pairwise

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from handlers.provider.think_tags import THINK_TAGS, ThinkSplitter, ThinkTags

ANSWER = "<think>reasoning here</think>\n\nThe answer <b>x</b>"


def split(deltas: Iterable[str], mode: str = "auto") -> tuple[str, str]:
    """All the reasoning and all the content a stream of deltas gives, close() included."""
    splitter = ThinkSplitter(mode)
    reasoning, content = "", ""
    for delta in deltas:
        r, c = splitter.feed(delta)
        reasoning, content = reasoning + r, content + c
    r, c = splitter.close()
    return reasoning + r, content + c


def pieces(text: str, cuts: Iterable[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[start:end] for start, end in pairwise(bounds)]


# Content without a think block


@pytest.mark.parametrize(
    "text",
    [
        "Hello",
        "  Hello",
        "\n\nHello, world.\n\n",
        "Use <think> tags like this",
        "A tag later: <think>not reasoning</think>",
        "<thinker>not a tag of the table</thinker>",
        "<thin air",
        "< think>",
        "</think> first",
        "",
    ],
    ids=[
        "plain text",
        "leading spaces",
        "surrounding blank lines",
        "a <think> later in the answer",
        "a whole think block later in the answer",
        "a tag that only starts like one",
        "a prefix of the tag that turns out different",
        "a space inside the tag",
        "a closing tag first",
        "nothing at all",
    ],
)
def test_content_without_a_leading_think_tag_passes_through_untouched(text: str) -> None:
    assert split([text]) == ("", text)


def test_plain_content_is_returned_at_once_not_held() -> None:
    assert ThinkSplitter().feed("Hello") == ("", "Hello")


def test_once_the_answer_has_started_a_think_tag_is_just_content() -> None:
    splitter = ThinkSplitter()
    splitter.feed("Hi. ")
    assert splitter.feed("<think>x</think>") == ("", "<think>x</think>")


def test_a_possible_start_of_the_tag_is_held_until_the_next_delta_decides() -> None:
    splitter = ThinkSplitter()
    assert splitter.feed("<thi") == ("", "")
    assert splitter.feed("s is not a tag") == ("", "<this is not a tag")


def test_leading_whitespace_alone_is_held_then_kept_with_the_answer() -> None:
    splitter = ThinkSplitter()
    assert splitter.feed("\n\n") == ("", "")
    assert splitter.feed("Hello") == ("", "\n\nHello")


# A think block


def test_a_think_block_in_one_delta_is_split_into_reasoning_and_content() -> None:
    assert ThinkSplitter().feed("<think>Let me see.</think>Paris.") == ("Let me see.", "Paris.")


def test_whitespace_before_the_think_tag_is_dropped() -> None:
    assert split(["\n  <think>r</think>Answer"]) == ("r", "Answer")


def test_reasoning_is_returned_as_it_arrives() -> None:
    splitter = ThinkSplitter()
    assert splitter.feed("<think>Let me") == ("Let me", "")
    assert splitter.feed(" think.") == (" think.", "")


def test_whitespace_inside_the_reasoning_is_kept() -> None:
    assert split(["<think>\n  step one\n</think>Answer"]) == ("\n  step one\n", "Answer")


def test_a_possible_start_of_the_closing_tag_is_held_back_from_the_reasoning() -> None:
    splitter = ThinkSplitter()
    assert splitter.feed("<think>abc</thi") == ("abc", "")
    assert splitter.feed("nk>Answer") == ("", "Answer")


def test_a_held_back_prefix_that_is_not_the_closing_tag_is_released_as_reasoning() -> None:
    splitter = ThinkSplitter()
    assert splitter.feed("<think>a </") == ("a ", "")
    assert splitter.feed("b> c") == ("</b> c", "")


def test_an_opening_tag_inside_the_reasoning_is_reasoning() -> None:
    assert split(["<think>about <think> tags</think>Done"]) == ("about <think> tags", "Done")


def test_only_the_first_closing_tag_ends_the_block() -> None:
    assert split(["<think>r</think>Use </think> to close"]) == ("r", "Use </think> to close")


def test_an_empty_think_block_gives_no_reasoning() -> None:
    assert split(["<think></think>\n\nAnswer"]) == ("", "Answer")


# Between the block and the answer


@pytest.mark.parametrize(
    "deltas",
    [
        ["<think>r</think>\n\nAnswer"],
        ["<think>r</think>", "\n", "\n", "Answer"],
        ["<think>r</think>\n", " \n\n", "Answer"],
    ],
    ids=["in the same delta", "in deltas of their own", "mixed whitespace"],
)
def test_blank_lines_after_the_closing_tag_are_dropped(deltas: list[str]) -> None:
    assert split(deltas) == ("r", "Answer")


@pytest.mark.parametrize(
    "deltas",
    [["<think>Show code.</think>\n\n    x = 1\n"], ["<think>Show code.</think>", "\n\n  ", "  x = 1\n"]],
    ids=["in one delta", "split inside the indentation"],
)
def test_the_answers_first_line_keeps_its_indentation(deltas: list[str]) -> None:
    # Four spaces make an indented code block in markdown: they are the answer's, not blank lines.
    assert split(deltas) == ("Show code.", "    x = 1\n")


def test_whitespace_later_in_the_answer_is_kept() -> None:
    assert split(["<think>r</think>", "\n\nOne.", "\n\nTwo. "]) == ("r", "One.\n\nTwo. ")


# End of stream


def test_a_stream_ending_inside_an_unclosed_think_block_gives_its_text_as_reasoning() -> None:
    assert split(["<think>still", " thinking"]) == ("still thinking", "")


def test_a_held_partial_closing_tag_is_released_as_reasoning_at_close() -> None:
    splitter = ThinkSplitter()
    assert splitter.feed("<think>abc</thi") == ("abc", "")
    assert splitter.close() == ("</thi", "")


@pytest.mark.parametrize("text", ["<thi", "  <think", "\n"], ids=["<thi", "spaces and <think", "a newline"])
def test_a_stream_that_is_only_a_possible_start_of_the_tag_is_released_as_content(text: str) -> None:
    splitter = ThinkSplitter()
    assert splitter.feed(text) == ("", "")
    assert splitter.close() == ("", text)


def test_a_stream_ending_right_after_the_closing_tag_gives_no_content() -> None:
    assert split(["<think>r</think>\n\n"]) == ("r", "")


def test_closing_an_empty_stream_gives_nothing() -> None:
    assert ThinkSplitter().close() == ("", "")


# Splitting does not matter


@pytest.mark.parametrize("parts", [2, 3], ids=["two deltas", "three deltas"])
def test_every_split_of_a_think_block_and_answer_gives_the_same_result(parts: int) -> None:
    for cuts in combinations(range(len(ANSWER) + 1), parts - 1):
        deltas = pieces(ANSWER, cuts)
        assert split(deltas) == ("reasoning here", "The answer <b>x</b>"), deltas


def test_the_deltas_of_a_recorded_stream_are_split_without_leaking_a_tag() -> None:
    # The content deltas of tests/data/think_in_content.sse, a model served without a reasoning parser.
    deltas = ["<th", "ink>\nThe user", " asks for 2+2. </", "think", ">\n\n", "It is 4 <not a tag>.", ""]
    assert split(deltas) == ("\nThe user asks for 2+2. ", "It is 4 <not a tag>.")


# Text rich in the characters of the tags, so that partial tags turn up often.
_TAG_CHARS = sorted({c for tags in THINK_TAGS for tag in (tags.open, *tags.close, tags.then) for c in tag})
_TAGGY = st.text(st.sampled_from([*_TAG_CHARS, " ", "\n", "é", "思"]), max_size=30)
_WHITESPACE = st.text(st.sampled_from(" \t\n"), max_size=4)


def answer_after(between: str, answer: str) -> str:
    """What follows ``between`` after a closing tag: blank lines dropped, the first line's indentation kept."""
    if not answer:
        return ""
    newline = between.rfind("\n")
    return (between[newline + 1 :] if newline >= 0 else "") + answer


_OPENERS = tuple(tags.open for tags in THINK_TAGS)


@settings(max_examples=300)
@given(
    data=st.data(),
    before=_WHITESPACE,
    reasoning=_TAGGY,
    between=_WHITESPACE,
    answer=_TAGGY,
)
def test_any_split_of_a_think_block_gives_its_reasoning_and_the_answer(
    data: st.DataObject, before: str, reasoning: str, between: str, answer: str
) -> None:
    assume("</think>" not in reasoning)
    assume(answer == answer.lstrip())
    stream = f"{before}<think>{reasoning}</think>{between}{answer}"
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8), label="cuts")
    assert split(pieces(stream, cuts)) == (reasoning, answer_after(between, answer))


@settings(max_examples=300)
@given(data=st.data(), text=_TAGGY)
def test_any_split_of_content_without_a_leading_think_tag_passes_it_through(data: st.DataObject, text: str) -> None:
    assume(not text.lstrip().startswith(_OPENERS))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=8), label="cuts")
    assert split(pieces(text, cuts)) == ("", text)


def _first_close_at(text: str, closes: Iterable[str]) -> int:
    """Where the first of ``closes`` starts in ``text`` (its length when none is there)."""
    return min([text.find(tag) for tag in closes if tag in text], default=len(text))


# The table: every spelling behaves as <think> does


def _id(tags: ThinkTags) -> str:
    return tags.open


@pytest.mark.parametrize("tags", THINK_TAGS, ids=_id)
def test_every_tag_pair_of_the_table_separates_its_block_with_each_of_its_closing_tags(tags: ThinkTags) -> None:
    for close in tags.close:
        assert split([f"{tags.open}Let me see.{close}\n\nParis."]) == ("Let me see.", "Paris."), close


@pytest.mark.parametrize("tags", THINK_TAGS, ids=_id)
def test_every_split_into_three_deltas_of_each_tag_pair_gives_the_same_result(tags: ThinkTags) -> None:
    stream = f" {tags.open}r{tags.close[0]}\nThe answer"
    for cuts in combinations(range(len(stream) + 1), 2):
        assert split(pieces(stream, cuts)) == ("r", "The answer"), pieces(stream, cuts)


@settings(max_examples=300)
@given(
    data=st.data(),
    tags=st.sampled_from(THINK_TAGS),
    before=_WHITESPACE,
    reasoning=_TAGGY,
    between=_WHITESPACE,
    answer=_TAGGY,
)
def test_any_split_of_a_block_between_any_tags_of_the_table_gives_its_reasoning_and_the_answer(
    data: st.DataObject, tags: ThinkTags, before: str, reasoning: str, between: str, answer: str
) -> None:
    close = data.draw(st.sampled_from(tags.close), label="close")
    assume(_first_close_at(reasoning + close, tags.close) == len(reasoning))
    assume(answer == answer.lstrip())
    assume(not (tags.then and answer.startswith(tags.then)))
    stream = f"{before}{tags.open}{reasoning}{close}{between}{answer}"
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8), label="cuts")
    assert split(pieces(stream, cuts)) == (reasoning, answer_after(between, answer))


def test_only_the_blocks_own_closing_tag_ends_it() -> None:
    assert split(["<thinking>a</think>b</thinking>Answer"]) == ("a</think>b", "Answer")


@pytest.mark.parametrize(
    "text",
    ["[1] See the footnote.", "[THIN ice", "◁thin▷", "<reasons>", "<|begin_of_text|>Hi", "<seed:thing>"],
    ids=["a citation", "[THIN", "Kimi's tag misspelt", "<reasons>", "another special token", "<seed:thing>"],
)
def test_text_that_only_starts_like_a_tag_of_the_table_passes_through(text: str) -> None:
    assert split([text]) == ("", text)


def test_text_that_cannot_start_a_tag_is_not_held() -> None:
    assert ThinkSplitter().feed("[1] See") == ("", "[1] See")


# Formats that put glue between the closing tag and the answer


def test_sky_t1_solution_tag_before_the_answer_is_dropped_but_its_closing_tag_stays() -> None:
    stream = "<|begin_of_thought|>Add them.<|end_of_thought|>\n\n<|begin_of_solution|>\n\n4<|end_of_solution|>"

    assert split([stream]) == ("Add them.", "4<|end_of_solution|>")


HARMONY = "<|channel|>analysis<|message|>User greets.<|end|><|start|>assistant<|channel|>final<|message|>Hello!"


@pytest.mark.parametrize("parts", [1, 2, 3], ids=["one delta", "two deltas", "three deltas"])
def test_gpt_oss_harmony_with_its_special_tokens_is_split_into_analysis_and_final(parts: int) -> None:
    for cuts in combinations(range(len(HARMONY) + 1), parts - 1):
        assert split(pieces(HARMONY, cuts)) == ("User greets.", "Hello!"), cuts


def test_gpt_oss_harmony_without_the_end_token_is_split_at_the_final_channel() -> None:
    stream = "<|channel|>analysis<|message|>User greets.<|start|>assistant<|channel|>final<|message|>Hello!"

    assert split([stream]) == ("User greets.<|start|>assistant", "Hello!")


def test_gpt_oss_harmony_followed_by_another_channel_keeps_that_channel_as_content() -> None:
    tool = "<|start|>assistant<|channel|>commentary to=functions.get_weather<|message|>{}"

    assert split([f"<|channel|>analysis<|message|>Need weather.<|end|>{tool}"]) == ("Need weather.", tool)


def test_gpt_oss_harmony_with_its_special_tokens_decoded_away_is_left_as_content() -> None:
    # Not separable without guessing: "analysis" and "assistantfinal" are ordinary words then.
    text = "analysisUser greets.assistantfinalHello!"

    assert split([text]) == ("", text)


# The prompt opened the block: only the closing tag comes


def test_open_mode_reads_everything_before_the_closing_tag_as_reasoning() -> None:
    deltas = ["Okay, the user", " greets.\n</th", "ink>\n\nHello!"]

    assert split(deltas, "open") == ("Okay, the user greets.\n", "Hello!")


def test_open_mode_keeps_the_reasoning_from_its_first_character() -> None:
    assert split(["\n\nOkay.</think>Hi"], "open") == ("\n\nOkay.", "Hi")


def test_open_mode_drops_an_opening_tag_the_model_wrote_anyway() -> None:
    assert split(["<think>", "Okay.</think>Hi"], "open") == ("Okay.", "Hi")


def test_open_mode_answer_cut_off_before_the_closing_tag_is_all_reasoning() -> None:
    assert split(["Let me", " count: one, two,"], "open") == ("Let me count: one, two,", "")


def test_open_mode_sends_reasoning_as_it_arrives() -> None:
    splitter = ThinkSplitter("open")

    assert splitter.feed("Okay") == ("Okay", "")
    assert splitter.feed(", so") == (", so", "")


def test_open_mode_releases_a_held_start_as_reasoning_at_the_end() -> None:
    splitter = ThinkSplitter("open")

    assert splitter.feed("<thi") == ("", "")
    assert splitter.close() == ("<thi", "")


@settings(max_examples=300)
@given(data=st.data(), reasoning=_TAGGY, between=_WHITESPACE, answer=_TAGGY)
def test_open_mode_any_split_gives_the_reasoning_before_the_closing_tag_and_the_answer(
    data: st.DataObject, reasoning: str, between: str, answer: str
) -> None:
    stream = f"{reasoning}</think>{between}{answer}"
    assume(_first_close_at(stream, ["</think>"]) == len(reasoning))
    assume(not stream.lstrip().startswith(_OPENERS))
    assume(answer == answer.lstrip())
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8), label="cuts")
    assert split(pieces(stream, cuts), "open") == (reasoning, answer_after(between, answer))


# The content has no thinking block at all


def test_none_mode_passes_a_leading_think_block_through_as_content() -> None:
    assert split(["<think>x</think>y"], "none") == ("", "<think>x</think>y")


def test_none_mode_never_holds_text_back() -> None:
    assert ThinkSplitter("none").feed("<thi") == ("", "<thi")


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="'opened'"):
        ThinkSplitter("opened")
