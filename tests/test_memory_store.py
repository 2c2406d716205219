"""The in-memory store's own promises: its memory stays bounded, and costs little beyond the events' text.

What every store does (order, gaps, budgets, limits) is in ``test_store_contract.py``.
"""

from __future__ import annotations

import tracemalloc

import pytest
from test_store_contract import KIB, event, seqs

from handlers.stores.log import LogGap
from handlers.stores.memory import MemoryStreamStore


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


async def test_a_long_stream_holds_no_more_memory_than_its_budget() -> None:
    store = MemoryStreamStore(stream_bytes=16 * KIB, total_bytes=64 * KIB)
    log = await store.create("long")
    largest = 0
    for i in range(1, 5001):
        await log.append([event(i, size=200)])
        largest = max(largest, store.size)

    assert largest <= 16 * KIB
    assert seqs(await log.read(4999)) == [5000]


async def test_the_memory_of_all_streams_stays_within_the_total_budget() -> None:
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


async def test_running_streams_together_stay_within_the_total_budget() -> None:
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


async def test_a_refused_append_leaves_the_memory_count_as_it_was() -> None:
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
