"""The in-memory stream store: ordered logs, wake-ups, and memory that stays bounded."""

from __future__ import annotations

import tracemalloc

import pytest

from handlers.stores.log import Events, LogGap
from handlers.stores.memory import MemoryStreamStore

KIB = 1024


def event(i: int, size: int = 10) -> tuple[str, bytes]:
    return "content", f'{{"n":{i},"pad":"{"x" * size}"}}'.encode()


def seqs(read: tuple[Events | None, bool]) -> list[int]:
    events, _ = read
    return [] if events is None else [seq for seq, _, _ in events]


async def test_events_are_numbered_from_one_and_read_after_any_position() -> None:
    log = await MemoryStreamStore(stream_bytes=64 * KIB, total_bytes=64 * KIB).create("s")
    await log.append([event(1), event(2)])
    await log.append([event(3)])

    everything, finished = await log.read(0)
    assert seqs((everything, finished)) == [1, 2, 3] and not finished
    assert seqs(await log.read(2)) == [3]
    assert await log.read(3) == (None, False)
    assert everything is not None and next(iter(everything)) == (1, "content", event(1)[1])


async def test_an_append_returns_its_events_numbered_and_reads_give_them_back() -> None:
    log = await MemoryStreamStore(stream_bytes=64 * KIB, total_bytes=64 * KIB).create("s")
    await log.append([("meta", b'{"type":"meta"}')])
    appended = await log.append([("reasoning", b'{"text":"a"}'), ("content", b'{"text":"b"}')])

    assert (appended.first, appended.last, len(appended)) == (2, 3, 2)
    assert list(appended) == [(2, "reasoning", b'{"text":"a"}'), (3, "content", b'{"text":"b"}')]
    everything, _ = await log.read(0)
    assert everything is not None
    assert list(everything) == [(1, "meta", b'{"type":"meta"}'), *appended]


async def test_a_log_costs_little_more_memory_than_its_events_text() -> None:
    # Thousands of live streams each keep one: per event, a few bytes beyond the JSON, not a Python object.
    size = len(event(0, size=40)[1])
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        log = await MemoryStreamStore(stream_bytes=1024 * KIB, total_bytes=1024 * KIB).create("s")
        for i in range(1000):
            await log.append([event(i, size=40)])
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    assert used < 1000 * (size + 32)


async def test_a_finished_log_says_so_to_readers_at_its_end() -> None:
    log = await MemoryStreamStore(stream_bytes=64 * KIB, total_bytes=64 * KIB).create("s")
    await log.append([event(1)])
    await log.finish()

    assert (await log.read(0))[1] is True
    assert await log.read(1) == (None, True)


async def test_subscribers_are_woken_by_appends_and_by_the_end() -> None:
    log = await MemoryStreamStore(stream_bytes=64 * KIB, total_bytes=64 * KIB).create("s")
    wakes: list[str] = []
    log.subscribe(lambda: wakes.append("woken"))
    await log.append([event(1)])
    await log.finish()

    assert wakes == ["woken", "woken"]


async def test_an_unsubscribed_reader_is_not_woken() -> None:
    log = await MemoryStreamStore(stream_bytes=64 * KIB, total_bytes=64 * KIB).create("s")
    wakes: list[str] = []

    def wake() -> None:
        wakes.append("woken")

    log.subscribe(wake)
    log.unsubscribe(wake)
    await log.append([event(1)])

    assert wakes == []


async def test_a_long_stream_keeps_only_its_newest_events_within_its_budget() -> None:
    store = MemoryStreamStore(stream_bytes=16 * KIB, total_bytes=64 * KIB)
    log = await store.create("long")
    largest = 0
    for i in range(1, 5001):
        await log.append([event(i, size=200)])
        largest = max(largest, store.size)

    assert largest <= 16 * KIB
    assert seqs(await log.read(4999)) == [5000]


async def test_reading_evicted_events_is_a_gap_not_a_silent_hole() -> None:
    store = MemoryStreamStore(stream_bytes=4 * KIB, total_bytes=64 * KIB)
    log = await store.create("s")
    for i in range(1, 200):
        await log.append([event(i, size=100)])

    with pytest.raises(LogGap):
        await log.read(0)


async def test_finished_streams_lose_their_events_first_when_memory_runs_short() -> None:
    store = MemoryStreamStore(stream_bytes=8 * KIB, total_bytes=12 * KIB)
    old = await store.create("old")
    await old.append([event(i, size=700) for i in range(10)])
    await old.finish()
    live = await store.create("live")
    await live.append([event(i, size=700) for i in range(10)])

    assert store.size <= 12 * KIB
    assert seqs(await live.read(0)) == list(range(1, 11))
    assert await store.get("old") is old, "its record stays, so a resume hears of the gap"
    with pytest.raises(LogGap):
        await old.read(0)


async def test_a_position_beyond_the_last_event_is_refused() -> None:
    log = await MemoryStreamStore(stream_bytes=8 * KIB, total_bytes=8 * KIB).create("s")
    await log.append([event(1)])

    with pytest.raises(ValueError):
        await log.read(2)


async def test_running_streams_share_the_total_budget_by_trimming_the_one_that_grows() -> None:
    store = MemoryStreamStore(stream_bytes=8 * KIB, total_bytes=12 * KIB)
    first, second = await store.create("a"), await store.create("b")
    for i in range(40):
        await first.append([event(i, size=500)])
        await second.append([event(i, size=500)])

    assert store.size <= 12 * KIB
    for log in (first, second):
        assert seqs(await log.read(39)) == [40]


async def test_discarding_a_stream_frees_its_memory() -> None:
    store = MemoryStreamStore(stream_bytes=64 * KIB, total_bytes=64 * KIB)
    log = await store.create("s")
    await log.append([event(1, size=1000)])
    store.discard("s")

    assert await store.get("s") is None
    assert store.size == 0
    assert len(store) == 0


async def test_a_long_backlog_is_read_in_bounded_steps_that_together_give_every_event() -> None:
    # A reader resuming far behind never holds the event loop for the whole backlog at once.
    log = await MemoryStreamStore(stream_bytes=1024 * KIB, total_bytes=1024 * KIB).create("s")
    for i in range(1, 2001):
        await log.append([event(i, size=100)])
    size = len(event(0, size=100)[1])

    got: list[tuple[int, str, bytes]] = []
    after = 0
    while True:
        events, _ = await log.read(after, max_bytes=4 * KIB)
        if events is None:
            break
        assert sum(len(data) for _, data in events.items) <= 4 * KIB + size
        got += events
        after = events.last

    assert got == [(i, *event(i, size=100)) for i in range(1, 2001)]


async def test_a_read_with_no_byte_budget_still_gives_the_next_event() -> None:
    log = await MemoryStreamStore(stream_bytes=64 * KIB, total_bytes=64 * KIB).create("s")
    await log.append([event(1), event(2), event(3)])

    assert seqs(await log.read(1, max_bytes=0)) == [2]


async def test_an_event_of_unknown_type_is_refused_and_leaves_the_log_as_it_was() -> None:
    store = MemoryStreamStore(stream_bytes=64 * KIB, total_bytes=64 * KIB)
    log = await store.create("s")
    await log.append([event(1)])

    with pytest.raises(KeyError):
        await log.append([event(2), ("surprise", b"{}")])

    assert seqs(await log.read(0)) == [1]
    assert store.size == log.size
    assert seqs(((await log.append([event(2)])), False)) == [2]


async def test_a_stream_long_past_its_budget_reads_right_and_keeps_no_bookkeeping_for_dropped_events() -> None:
    store = MemoryStreamStore(stream_bytes=4 * KIB, total_bytes=64 * KIB)
    log = await store.create("s")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1, 20_001):
            await log.append([event(i)])
            if i % 997 == 0:
                assert list((await log.read(i - 3))[0] or []) == [(n, *event(n)) for n in (i - 2, i - 1, i)]
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    assert log.size <= 4 * KIB
    assert used < 4 * (4 * KIB), "20,000 events went through; only the last 4 KiB of them may cost memory"


async def test_an_event_whose_text_is_not_bytes_is_refused_and_leaves_the_log_as_it_was() -> None:
    log = await MemoryStreamStore(stream_bytes=64 * KIB, total_bytes=64 * KIB).create("s")
    await log.append([event(1)])

    with pytest.raises(TypeError):
        await log.append([event(2), ("content", '{"text":"a str"}')])  # type: ignore[list-item]

    assert list((await log.read(0))[0] or []) == [(1, *event(1))]
