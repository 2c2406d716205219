"""What every stream store does, in memory or in Redis: one set of specifications for both.

Each test gets a ``Stores`` pair: the store of the process that runs a
generation (``writer``) and the store of a process that only reads it
(``reader``). In memory they are one and the same; with Redis they are two
stores, as two relay processes would have, on one real ``redis-server``, so
every read here crosses from one process's view to the other's.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from helpers import RedisServer

from handlers.errors import RelayError
from handlers.stores.log import Events, LogGap, StreamLog, StreamStore
from handlers.stores.memory import MemoryStreamStore

KIB = 1024


def event(i: int, size: int = 10) -> tuple[str, bytes]:
    return "content", f'{{"n":{i},"pad":"{"x" * size}"}}'.encode()


def seqs(read: tuple[Events | None, bool]) -> list[int]:
    events, _ = read
    return [] if events is None else [seq for seq, _, _ in events]


@dataclass
class Stores:
    writer: StreamStore
    reader: StreamStore

    async def create(self, stream_id: str = "s", client: str = "c", principal: str | None = None) -> StreamLog:
        return await self.writer.create(stream_id, client=client, principal=principal)

    async def view(self, log: StreamLog) -> StreamLog:
        """The log as a reader sees it: in another process, when the store is shared."""
        if not self.writer.shared:
            return log
        seen = await self.reader.get(log.stream_id)
        assert seen is not None
        return seen


MakeStores = Callable[..., Awaitable[Stores]]


@pytest.fixture(params=["memory", "redis"])
async def make_stores(request: pytest.FixtureRequest) -> AsyncIterator[MakeStores]:
    """``await make_stores(stream_bytes=…, total_bytes=…, max_streams=…, client_streams=…)``."""
    closers: list[Callable[[], Awaitable[None]]] = []

    async def make(
        stream_bytes: int = 64 * KIB, total_bytes: int = 64 * KIB, max_streams: int = 100, client_streams: int = 100
    ) -> Stores:
        limits: dict[str, Any] = {
            "stream_bytes": stream_bytes,
            "total_bytes": total_bytes,
            "max_streams": max_streams,
            "client_streams": client_streams,
        }
        if request.param == "memory":
            store = MemoryStreamStore(**limits)
            closers.append(store.close)
            return Stores(store, store)
        from handlers.stores.redis import RedisStreamStore, connect

        server: RedisServer = request.getfixturevalue("shared_redis")
        prefix = f"test-{secrets.token_hex(4)}"
        pair = []
        for _ in range(2):
            client = connect(server.url)
            store = RedisStreamStore(client, prefix=prefix, retention=60, **limits)
            store.start()
            closers.extend([client.aclose, store.close])
            pair.append(store)
        return Stores(*pair)

    yield make
    for close in reversed(closers):
        await close()


async def test_events_are_numbered_from_one_and_read_after_any_position(make_stores: MakeStores) -> None:
    stores = await make_stores()
    log = await stores.create()
    await log.append([event(1), event(2)])
    await log.append([event(3)])
    seen = await stores.view(log)

    everything, finished = await seen.read(0)
    assert seqs((everything, finished)) == [1, 2, 3] and not finished
    assert seqs(await seen.read(2)) == [3]
    assert await seen.read(3) == (None, False)
    assert everything is not None and next(iter(everything)) == (1, "content", event(1)[1])


async def test_an_append_returns_its_events_numbered_and_reads_give_them_back(make_stores: MakeStores) -> None:
    stores = await make_stores()
    log = await stores.create()
    await log.append([("meta", b'{"type":"meta"}')])
    appended = await log.append([("reasoning", b'{"text":"a"}'), ("content", b'{"text":"b"}')])

    assert (appended.first, appended.last, len(appended)) == (2, 3, 2)
    assert list(appended) == [(2, "reasoning", b'{"text":"a"}'), (3, "content", b'{"text":"b"}')]
    everything, _ = await (await stores.view(log)).read(0)
    assert everything is not None
    assert list(everything) == [(1, "meta", b'{"type":"meta"}'), *appended]


async def test_an_empty_append_numbers_nothing_and_changes_nothing(make_stores: MakeStores) -> None:
    stores = await make_stores()
    log = await stores.create()
    await log.append([event(1)])

    appended = await log.append([])

    assert (appended.first, len(appended)) == (2, 0)
    assert seqs(await (await stores.view(log)).read(0)) == [1]
    assert (await log.append([event(2)])).first == 2


async def test_a_finished_log_says_so_to_readers_at_its_end(make_stores: MakeStores) -> None:
    stores = await make_stores()
    log = await stores.create()
    await log.append([event(1)])
    await log.finish()
    seen = await stores.view(log)

    assert (await seen.read(0))[1] is True
    assert await seen.read(1) == (None, True)


@pytest.mark.parametrize("last", ["done", "error"])
async def test_a_log_that_ends_with_done_or_error_reads_as_finished_everywhere(
    make_stores: MakeStores, last: str
) -> None:
    stores = await make_stores()
    log = await stores.create()
    await log.append([event(1), (last, b'{"type":"%s"}' % last.encode())])
    await log.finish()

    assert await (await stores.view(log)).read(2) == (None, True)


async def test_subscribers_are_woken_by_appends_at_once(make_stores: MakeStores) -> None:
    stores = await make_stores()
    log = await stores.create()
    # A process that reads a stream running elsewhere says so first (the streams do, for each reader).
    await stores.reader.reader_joined(log.stream_id)
    seen = await stores.view(log)
    woken = asyncio.Event()
    seen.subscribe(woken.set)
    await asyncio.sleep(0.05)  # A shared store's reader starts waiting on its next turn.

    await log.append([event(1)])

    # Well within the second after which a shared store's reader looks again by itself.
    await asyncio.wait_for(woken.wait(), timeout=0.5)
    seen.unsubscribe(woken.set)


async def test_an_unsubscribed_reader_is_not_woken(make_stores: MakeStores) -> None:
    stores = await make_stores()
    log = await stores.create()
    await stores.reader.reader_joined(log.stream_id)  # so that a shared store would wake a subscriber
    seen = await stores.view(log)
    wakes: list[str] = []

    def wake() -> None:
        wakes.append("woken")

    seen.subscribe(wake)
    seen.unsubscribe(wake)
    await log.append([event(1)])
    await asyncio.sleep(0.1)

    assert wakes == []


async def test_a_long_stream_keeps_only_its_newest_events_within_its_budget(make_stores: MakeStores) -> None:
    stores = await make_stores(stream_bytes=16 * KIB, total_bytes=64 * KIB)
    log = await stores.create("long")
    for i in range(1, 501):
        await log.append([event(i, size=200)])
    seen = await stores.view(log)

    assert seqs(await seen.read(499)) == [500]
    with pytest.raises(LogGap):
        await seen.read(400)


async def test_reading_evicted_events_is_a_gap_not_a_silent_hole(make_stores: MakeStores) -> None:
    stores = await make_stores(stream_bytes=4 * KIB, total_bytes=64 * KIB)
    log = await stores.create()
    for i in range(1, 200):
        await log.append([event(i, size=100)])

    with pytest.raises(LogGap):
        await (await stores.view(log)).read(0)


async def test_finished_streams_lose_their_events_first_when_memory_runs_short(make_stores: MakeStores) -> None:
    stores = await make_stores(stream_bytes=8 * KIB, total_bytes=12 * KIB)
    old = await stores.create("old")
    await old.append([event(i, size=700) for i in range(10)])
    await old.finish()
    live = await stores.create("live")
    await live.append([event(i, size=700) for i in range(10)])

    assert seqs(await (await stores.view(live)).read(0)) == list(range(1, 11))
    old_seen = await stores.reader.get("old")
    assert old_seen is not None, "its record stays, so a resume hears of the gap"
    with pytest.raises(LogGap):
        await old_seen.read(0)


async def test_a_position_beyond_the_last_event_is_refused(make_stores: MakeStores) -> None:
    stores = await make_stores(stream_bytes=8 * KIB, total_bytes=8 * KIB)
    log = await stores.create()
    await log.append([event(1)])

    with pytest.raises(ValueError):
        await (await stores.view(log)).read(2)


async def test_running_streams_share_the_total_budget_by_trimming_the_one_that_grows(make_stores: MakeStores) -> None:
    stores = await make_stores(stream_bytes=8 * KIB, total_bytes=12 * KIB)
    first, second = await stores.create("a"), await stores.create("b")
    for i in range(40):
        await first.append([event(i, size=500)])
        await second.append([event(i, size=500)])

    for log in (first, second):
        seen = await stores.view(log)
        assert seqs(await seen.read(39)) == [40]
        with pytest.raises(LogGap):
            await seen.read(25)


async def test_a_long_backlog_is_read_in_bounded_steps_that_together_give_every_event(make_stores: MakeStores) -> None:
    # A reader resuming far behind never holds the event loop for the whole backlog at once.
    stores = await make_stores(stream_bytes=1024 * KIB, total_bytes=1024 * KIB)
    log = await stores.create()
    for i in range(1, 2001, 50):
        await log.append([event(n, size=100) for n in range(i, i + 50)])
    size = len(event(0, size=100)[1])
    seen = await stores.view(log)

    got: list[tuple[int, str, bytes]] = []
    after = 0
    while True:
        events, _ = await seen.read(after, max_bytes=4 * KIB)
        if events is None:
            break
        assert sum(len(data) for _, data in events.items) <= 4 * KIB + size
        got += events
        after = events.last

    assert got == [(i, *event(i, size=100)) for i in range(1, 2001)]


async def test_a_read_with_no_byte_budget_still_gives_the_next_event(make_stores: MakeStores) -> None:
    stores = await make_stores()
    log = await stores.create()
    await log.append([event(1), event(2), event(3)])

    assert seqs(await (await stores.view(log)).read(1, max_bytes=0)) == [2]


async def test_an_event_of_unknown_type_is_refused_and_leaves_the_log_as_it_was(make_stores: MakeStores) -> None:
    stores = await make_stores()
    log = await stores.create()
    await log.append([event(1)])

    with pytest.raises(KeyError):
        await log.append([event(2), ("surprise", b"{}")])

    assert seqs(await (await stores.view(log)).read(0)) == [1]
    assert seqs(((await log.append([event(2)])), False)) == [2]


async def test_an_event_whose_text_is_not_bytes_is_refused_and_leaves_the_log_as_it_was(
    make_stores: MakeStores,
) -> None:
    stores = await make_stores()
    log = await stores.create()
    await log.append([event(1)])

    with pytest.raises(TypeError):
        await log.append([event(2), ("content", '{"text":"a str"}')])  # type: ignore[list-item]

    assert seqs(await (await stores.view(log)).read(0)) == [1]


async def test_a_stream_that_never_existed_is_none(make_stores: MakeStores) -> None:
    stores = await make_stores()

    assert await stores.reader.get("never") is None


async def test_a_stream_keeps_who_started_it(make_stores: MakeStores) -> None:
    stores = await make_stores()
    owned = await stores.create("owned", principal="token:abc")
    anyone = await stores.create("anyone")

    assert (await stores.view(owned)).principal == "token:abc"
    assert (await stores.view(anyone)).principal is None


async def test_past_max_streams_a_new_stream_is_refused_as_busy(make_stores: MakeStores) -> None:
    stores = await make_stores(max_streams=2)
    await stores.create("a", client="one")
    await stores.create("b", client="two")

    with pytest.raises(RelayError) as refused:
        await stores.create("c", client="three")
    assert (refused.value.code, refused.value.http_status) == ("server_busy", 503)


async def test_past_client_streams_that_client_is_refused_and_others_are_not(make_stores: MakeStores) -> None:
    stores = await make_stores(client_streams=1)
    await stores.create("a", client="one")

    with pytest.raises(RelayError) as refused:
        await stores.create("b", client="one")
    assert (refused.value.code, refused.value.http_status) == ("too_many_streams", 429)
    await stores.create("c", client="two")


async def test_a_finished_stream_frees_its_slot(make_stores: MakeStores) -> None:
    stores = await make_stores(max_streams=1, client_streams=1)
    first = await stores.create("a")
    await first.finish()

    await stores.create("b")
