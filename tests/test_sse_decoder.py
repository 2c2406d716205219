"""Specification of the ``text/event-stream`` decoder.

The rules are those of the WHATWG HTML standard,
https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
and the decoder must give the same events however the network splits the bytes.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.provider.sse_decoder import EventTooLong, LineTooLong, ServerSentEvent, SSEDecoder

DATA = Path(__file__).parent / "data"
TRANSCRIPTS = sorted(DATA.glob("*.sse"))


def decode(stream: bytes) -> list[ServerSentEvent]:
    """Every event a stream gives when it arrives in one piece."""
    return decode_chunks([stream])


def decode_chunks(chunks: Iterable[bytes]) -> list[ServerSentEvent]:
    """Every event a stream gives when it arrives in these network chunks."""
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.close()


def split_at(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[start:end] for start, end in pairwise(bounds)]


def one_byte_chunks(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


# Line endings


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "lone CR"])
def test_a_line_may_end_in(eol: bytes) -> None:
    stream = b"data: first" + eol + b"data: second" + eol + eol
    assert decode(stream) == [ServerSentEvent("first\nsecond")]


def test_line_endings_may_be_mixed_within_one_stream() -> None:
    stream = b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r"
    assert decode(stream) == [ServerSentEvent("a\nb\nc"), ServerSentEvent("d")]


def test_a_cr_ending_one_chunk_and_a_lf_starting_the_next_are_one_line_ending() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    # Were the LF a second line ending, it would be a blank line dispatching "a" alone.
    assert decoder.feed(b"\ndata: b\r\n\r\n") == [ServerSentEvent("a\nb")]


def test_an_empty_chunk_between_cr_and_lf_does_not_separate_them() -> None:
    assert decode_chunks([b"data: a\r", b"", b"\ndata: b\n\n"]) == [ServerSentEvent("a\nb")]


def test_a_cr_ending_one_chunk_and_a_cr_starting_the_next_are_two_line_endings() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r") == [ServerSentEvent("a")]


def test_a_lone_cr_inside_a_chunk_does_not_swallow_the_lf_that_starts_the_next_chunk() -> None:
    # The CR ends "data: a"; the LF at the start of the second chunk ends "data: b",
    # and has nothing to do with that earlier CR.
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\rdata: b") == []
    assert decoder.feed(b"\n\n") == [ServerSentEvent("a\nb")]


# Comments


@pytest.mark.parametrize(
    "comment",
    [b": keep-alive", b": OPENROUTER PROCESSING", b":", b":data: not data"],
    ids=["keep-alive", "openrouter processing", "bare colon", "looks like a field"],
)
def test_a_comment_line_produces_nothing(comment: bytes) -> None:
    assert decode(comment + b"\n\n") == []


def test_a_comment_between_data_lines_leaves_the_event_whole() -> None:
    assert decode(b"data: a\n: keep-alive\ndata: b\n\n") == [ServerSentEvent("a\nb")]


# The data field


@pytest.mark.parametrize(
    ("line", "data"),
    [
        (b"data:hello", "hello"),
        (b"data: hello", "hello"),
        (b"data:  hello", " hello"),
        (b"data:\thello", "\thello"),
        (b"data: hello ", "hello "),
        (b"data: a: b", "a: b"),
    ],
    ids=[
        "no space after the colon",
        "one space is dropped",
        "only one space is dropped",
        "a tab is kept",
        "trailing space is kept",
        "later colons are part of the value",
    ],
)
def test_data_value(line: bytes, data: str) -> None:
    assert decode(line + b"\n\n") == [ServerSentEvent(data)]


def test_data_lines_are_joined_with_newlines() -> None:
    assert decode(b"data: a\ndata:\ndata: c\n\n") == [ServerSentEvent("a\n\nc")]


def test_data_alone_dispatches_an_event_with_empty_data() -> None:
    assert decode(b"data:\n\n") == [ServerSentEvent("")]


def test_each_blank_line_dispatches_the_event_before_it() -> None:
    assert decode(b"data: 1\n\ndata: 2\n\n") == [ServerSentEvent("1"), ServerSentEvent("2")]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert decode(b"data: \xff!\n\n") == [ServerSentEvent("\ufffd!")]


# Events without data


def test_an_event_without_data_is_not_dispatched() -> None:
    assert decode(b"event: ping\n\n") == []


def test_an_event_without_data_resets_the_event_type() -> None:
    assert decode(b"event: ping\n\ndata: x\n\n") == [ServerSentEvent("x", event="message")]


def test_blank_lines_alone_produce_nothing() -> None:
    assert decode(b"\n\r\n\r\n") == []


# The event field


def test_the_event_field_names_the_event_type() -> None:
    assert decode(b"event: reasoning\ndata: x\n\n") == [ServerSentEvent("x", event="reasoning")]


def test_the_event_type_is_message_by_default() -> None:
    assert decode(b"data: x\n\n") == [ServerSentEvent("x", event="message")]


def test_an_empty_event_field_means_message() -> None:
    assert decode(b"event:\ndata: x\n\n") == [ServerSentEvent("x", event="message")]


def test_the_event_type_applies_only_to_its_own_event() -> None:
    assert decode(b"event: a\ndata: 1\n\ndata: 2\n\n") == [
        ServerSentEvent("1", event="a"),
        ServerSentEvent("2", event="message"),
    ]


# The id field


def test_the_id_field_sets_the_event_id() -> None:
    assert decode(b"id: 42\ndata: x\n\n") == [ServerSentEvent("x", id="42")]


def test_the_last_id_persists_to_later_events() -> None:
    assert decode(b"id: 42\ndata: x\n\ndata: y\n\n") == [
        ServerSentEvent("x", id="42"),
        ServerSentEvent("y", id="42"),
    ]


def test_an_id_sent_with_an_event_that_has_no_data_still_persists() -> None:
    assert decode(b"id: 7\n\ndata: x\n\n") == [ServerSentEvent("x", id="7")]


def test_an_empty_id_field_resets_the_last_id() -> None:
    assert decode(b"id: 1\ndata: x\n\nid\ndata: y\n\n") == [
        ServerSentEvent("x", id="1"),
        ServerSentEvent("y", id=""),
    ]


def test_an_id_containing_nul_is_ignored() -> None:
    assert decode(b"id: 1\ndata: x\n\nid: 2\x003\ndata: y\n\n") == [
        ServerSentEvent("x", id="1"),
        ServerSentEvent("y", id="1"),
    ]


# The retry field


def test_the_retry_field_gives_the_reconnection_time_in_milliseconds() -> None:
    assert decode(b"retry: 3000\ndata: x\n\n") == [ServerSentEvent("x", retry=3000)]


def test_retry_is_reported_on_its_own_event_only() -> None:
    assert decode(b"retry: 3000\ndata: x\n\ndata: y\n\n") == [
        ServerSentEvent("x", retry=3000),
        ServerSentEvent("y", retry=None),
    ]


@pytest.mark.parametrize(
    "value",
    [b"3000ms", b"-1", b"+5", b"3.5", b"", b" 3000", "\u0663".encode()],
    ids=["a unit", "a sign", "a plus", "a decimal point", "empty", "a second space", "a non-ASCII digit"],
)
def test_retry_is_ignored_unless_it_is_all_ascii_digits(value: bytes) -> None:
    assert decode(b"retry: " + value + b"\ndata: x\n\n") == [ServerSentEvent("x", retry=None)]


# Field names


def test_a_line_without_a_colon_is_a_field_name_with_an_empty_value() -> None:
    assert decode(b"data\ndata\n\n") == [ServerSentEvent("\n")]


def test_an_event_line_without_a_colon_resets_the_type_to_message() -> None:
    assert decode(b"event: a\nevent\ndata: x\n\n") == [ServerSentEvent("x", event="message")]


@pytest.mark.parametrize(
    "line",
    [b"foo: bar", b"Data: x", b" data: x", b"data : x"],
    ids=["unknown field", "names are case-sensitive", "leading space in the name", "space before the colon"],
)
def test_a_field_with_another_name_is_ignored(line: bytes) -> None:
    assert decode(line + b"\ndata: kept\n\n") == [ServerSentEvent("kept")]


# Byte order mark


def test_a_leading_bom_is_dropped() -> None:
    assert decode(b"\xef\xbb\xbfdata: x\n\n") == [ServerSentEvent("x")]


def test_a_leading_bom_split_across_chunks_is_dropped() -> None:
    assert decode_chunks([b"\xef", b"\xbb", b"\xbfdata: x\n\n"]) == [ServerSentEvent("x")]


def test_a_bom_after_the_start_is_part_of_the_line() -> None:
    # The second line's field name is "\ufeffdata", which is not a field the spec knows.
    assert decode(b"data: x\n\n\xef\xbb\xbfdata: y\n\n") == [ServerSentEvent("x")]


def test_only_one_leading_bom_is_dropped() -> None:
    assert decode(b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n") == []


# UTF-8


def test_a_multibyte_character_split_across_chunks_is_reassembled() -> None:
    text = "Paris — 你好 👋"
    stream = f"data: {text}\n\n".encode()
    for cut in range(len(stream) + 1):
        assert decode_chunks(split_at(stream, [cut])) == [ServerSentEvent(text)], f"cut at byte {cut}"


# End of stream


@pytest.mark.parametrize(
    "tail",
    [b"data: x", b"data: x\n", b"data: x\r", b"data: x\r\n"],
    ids=["no line ending", "no blank line after LF", "no blank line after CR", "no blank line after CRLF"],
)
def test_an_unterminated_last_event_is_not_dispatched_at_close(tail: bytes) -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: done\n\n" + tail) == [ServerSentEvent("done")]
    assert decoder.close() == []


def test_close_after_a_complete_stream_gives_nothing_more() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\n\n") == [ServerSentEvent("x")]
    assert decoder.close() == []


# Line length limit


LIMIT = 16
LONG_LINE = b"data: " + b"x" * (LIMIT - 5)  # one byte over the limit


def test_a_decoder_has_no_error_to_begin_with() -> None:
    decoder = SSEDecoder(max_line=LIMIT)
    decoder.feed(b"data: x\n\n")
    assert decoder.error is None


@pytest.mark.parametrize(
    "chunks",
    [[LONG_LINE], [LONG_LINE[:10], LONG_LINE[10:]], [LONG_LINE + b"\n\n"], [LONG_LINE + b"\r\n"]],
    ids=["unterminated", "grown over two chunks", "complete, in one chunk", "complete, CRLF"],
)
def test_a_line_longer_than_max_line_stops_the_decoder_with_line_too_long(chunks: list[bytes]) -> None:
    decoder = SSEDecoder(max_line=LIMIT)
    for chunk in chunks:
        assert decoder.feed(chunk) == []
    assert isinstance(decoder.error, LineTooLong)
    assert decoder.error.limit == LIMIT


def test_events_before_a_too_long_line_are_still_returned() -> None:
    decoder = SSEDecoder(max_line=LIMIT)
    assert decoder.feed(b"data: 1\n\ndata: 2\n\n" + LONG_LINE) == [ServerSentEvent("1"), ServerSentEvent("2")]
    assert decoder.error is not None


def test_nothing_is_decoded_after_a_too_long_line() -> None:
    decoder = SSEDecoder(max_line=LIMIT)
    decoder.feed(b"data: 1\n" + LONG_LINE + b"\ndata: 2\n\n")
    assert decoder.feed(b"data: 3\n\n") == []
    assert decoder.close() == []


def test_line_too_long_is_a_value_error_that_names_the_limit() -> None:
    error = LineTooLong(LIMIT)
    assert isinstance(error, ValueError)
    assert "16" in str(error)


@pytest.mark.parametrize(
    "chunks",
    [[b"data: " + b"x" * 10, b"\n\n"], [b"data: " + b"x" * 10 + b"\n\n"], [b"data: xxxxx", b"xxxxx\r", b"\n\r\n"]],
    ids=["unterminated, then ended", "complete, in one chunk", "grown over chunks, CRLF"],
)
def test_a_line_of_exactly_max_line_bytes_is_allowed(chunks: list[bytes]) -> None:
    decoder = SSEDecoder(max_line=LIMIT)
    assert [event for chunk in chunks for event in decoder.feed(chunk)] == [ServerSentEvent("x" * 10)]
    assert decoder.error is None


def test_the_limit_is_per_line_not_per_chunk() -> None:
    decoder = SSEDecoder(max_line=LIMIT)
    chunk = b"data: short\n\n" * 10
    assert decoder.feed(chunk) == [ServerSentEvent("short")] * 10
    assert decoder.error is None


# The data lines of one event are bounded together by the same limit: a provider that never sends the
# blank line that ends an event cannot grow the relay's memory line by line.

SHORT_DATA = b"data: 1234567\n"  # 13 bytes, of which the line is 12


@pytest.mark.parametrize(
    "chunks",
    [[SHORT_DATA * 2], [SHORT_DATA, SHORT_DATA], [SHORT_DATA + b": comment\n" + SHORT_DATA.replace(b"\n", b"\r\n")]],
    ids=["in one chunk", "a line a chunk", "with a comment between, CRLF"],
)
def test_data_lines_that_add_up_past_max_line_stop_the_decoder_with_event_too_long(chunks: list[bytes]) -> None:
    decoder = SSEDecoder(max_line=LIMIT)
    for chunk in chunks:
        assert decoder.feed(chunk) == []
    assert isinstance(decoder.error, EventTooLong)
    assert decoder.error.limit == LIMIT
    assert "16" in str(decoder.error)


def test_data_lines_that_add_up_to_max_line_are_one_event() -> None:
    decoder = SSEDecoder(max_line=LIMIT)
    assert decoder.feed(b"data:123\ndata:456\n\n") == [ServerSentEvent("123\n456")]
    assert decoder.error is None


def test_the_event_limit_starts_again_with_each_event() -> None:
    decoder = SSEDecoder(max_line=LIMIT)
    assert decoder.feed((SHORT_DATA + b"\n") * 100) == [ServerSentEvent("1234567")] * 100
    assert decoder.error is None


def test_comments_and_other_fields_do_not_count_towards_the_event_limit() -> None:
    decoder = SSEDecoder(max_line=LIMIT)
    assert decoder.feed(b": keep-alive\n" * 100 + b"event: e\nid: 1\n" * 100 + SHORT_DATA + b"\n") == [
        ServerSentEvent("1234567", "e", "1")
    ]
    assert decoder.error is None


def test_a_decoder_stopped_by_a_never_ending_event_holds_no_more_than_twice_the_limit() -> None:
    limit = 64 * 1024
    decoder = SSEDecoder(max_line=limit)
    piece = b"data: " + b"x" * 1000 + b"\n"
    tracemalloc.start()
    try:
        for _ in range(8000):  # 8 MB of data lines, never a blank line
            decoder.feed(piece)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(decoder.error, EventTooLong)
    assert peak < 4 * limit, f"peak {peak} bytes"
    assert held < 8 * 1024, f"still holding {held} bytes"


# Splitting does not matter


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[path.stem for path in TRANSCRIPTS])
def test_a_recorded_transcript_decodes_the_same_byte_by_byte(path: Path) -> None:
    stream = path.read_bytes()
    whole = decode(stream)
    assert whole, "a transcript should hold events"
    assert decode_chunks(one_byte_chunks(stream)) == whole


_EOL = st.sampled_from([b"\n", b"\r\n", b"\r"])
# Any text a line may carry: everything but the line-ending characters, surrogates excluded
# because they cannot be encoded.
_VALUE = st.text(st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), max_size=12)
_FIELD_LINE = st.one_of(
    st.builds(lambda v: "data:" + v, _VALUE),
    st.builds(lambda v: "data: " + v, _VALUE),
    st.builds(lambda v: "event: " + v, _VALUE),
    st.builds(lambda v: "id: " + v, st.one_of(_VALUE, st.just("a\0b"))),
    st.builds(lambda v: f"retry: {v}", st.one_of(st.integers(0, 10**6), _VALUE)),
    st.sampled_from(["data", "event", "id", ": keep-alive", ": OPENROUTER PROCESSING", ":"]),
    st.builds(lambda v: "x-unknown: " + v, _VALUE),
)
# Blank lines are what dispatch events, so a third of the lines are blank.
_LINE = st.one_of(_FIELD_LINE, _FIELD_LINE, st.just(""))


@st.composite
def event_streams(draw: st.DrawFn) -> bytes:
    """Events with random fields and comments, each line with its own ending,
    an optional BOM and an optional unterminated line at the end."""
    lines = draw(st.lists(st.tuples(_LINE, _EOL), max_size=20))
    stream = b"".join(line.encode() + eol for line, eol in lines)
    if draw(st.booleans()):
        stream += draw(_FIELD_LINE).encode()
    if draw(st.booleans()):
        stream = b"\xef\xbb\xbf" + stream
    return stream


@settings(max_examples=200)
@given(stream=event_streams())
def test_every_split_into_two_chunks_gives_the_same_events_as_one_piece(stream: bytes) -> None:
    whole = decode(stream)
    for cut in range(len(stream) + 1):
        assert decode_chunks([stream[:cut], stream[cut:]]) == whole, f"cut at byte {cut}"


@settings(max_examples=300)
@given(data=st.data(), stream=event_streams())
def test_any_split_into_chunks_gives_the_same_events_as_one_piece(data: st.DataObject, stream: bytes) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10), label="cuts")
    assert decode_chunks(split_at(stream, cuts)) == decode(stream)


@settings(max_examples=200)
@given(stream=event_streams())
def test_one_byte_chunks_give_the_same_events_as_one_piece(stream: bytes) -> None:
    assert decode_chunks(one_byte_chunks(stream)) == decode(stream)


@settings(max_examples=200)
@given(data=st.data(), stream=event_streams(), max_line=st.integers(1, 12))
def test_where_the_line_limit_stops_the_decoder_does_not_depend_on_the_split(
    data: st.DataObject, stream: bytes, max_line: int
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10), label="cuts")
    assert outcome(split_at(stream, cuts), max_line) == outcome([stream], max_line)


def outcome(chunks: Iterable[bytes], max_line: int) -> tuple[list[ServerSentEvent], int | None]:
    """The events, and the limit of the error if the decoder stopped on a long line."""
    decoder = SSEDecoder(max_line=max_line)
    events = [event for chunk in chunks for event in decoder.feed(chunk)] + decoder.close()
    return events, None if decoder.error is None else decoder.error.limit
