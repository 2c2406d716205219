"""What only a shared store must get right: a stream ended elsewhere, a stream Redis lost, views that race.

Two ``RedisStreamStore``s on one real ``redis-server`` play two relay
processes; a third connection plays what happens to Redis behind their backs
(a lease that lapses while its owner stalls, keys that vanish in a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from helpers import RedisServer

from handlers.errors import RelayError, StoreUnavailable
from handlers.stores.log import LogClosed
from handlers.stores.redis import RedisStreamStore, connect

KIB = 1024
META = ("meta", b'{"type":"meta"}')
STORE_ERROR = ("error", b'{"type":"error","code":"store_unavailable","retryable":true}')


def content(text: str) -> tuple[str, bytes]:
    return "content", orjson.dumps({"type": "content", "text": text})


def two_stores(
    url: str, **settings: Any
) -> contextlib.AbstractAsyncContextManager[tuple[RedisStreamStore, RedisStreamStore]]:
    """The store of the process running a stream, and the store of another process, on the Redis at ``url``."""
    budgets = {"stream_bytes": 64 * KIB, "total_bytes": 64 * KIB, "max_streams": 100, "client_streams": 100}
    settings = {**budgets, **settings}

    @contextlib.asynccontextmanager
    async def made() -> AsyncIterator[tuple[RedisStreamStore, RedisStreamStore]]:
        prefix = f"test-{secrets.token_hex(4)}"
        stores, clients = [], []
        for _ in range(2):
            client = connect(url)
            store = RedisStreamStore(
                client,
                prefix=prefix,
                retention=60,
                **settings,
            )
            store.start()
            stores.append(store)
            clients.append(client)
        try:
            yield stores[0], stores[1]
        finally:
            for store, client in zip(stores, clients, strict=True):
                await store.close()
                await client.aclose()

    return made()


@pytest.fixture
async def pair(shared_redis: RedisServer) -> AsyncIterator[tuple[RedisStreamStore, RedisStreamStore]]:
    """The store of the process running a stream, and the store of another process."""
    async with two_stores(shared_redis.url) as stores:
        yield stores


@pytest.fixture
async def admin(shared_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    async with aioredis.Redis.from_url(shared_redis.url) as client:
        yield client


async def ends(log: Any) -> list[tuple[int, str, dict[str, Any]]]:
    events, finished = await log.read(0)
    assert events is not None and finished
    return [(seq, kind, orjson.loads(data)) for seq, kind, data in events]


async def test_a_stalled_owner_whose_stream_was_ended_elsewhere_may_append_no_more(
    pair: tuple[RedisStreamStore, RedisStreamStore], admin: aioredis.Redis
) -> None:
    owner, other = pair
    log = await owner.create("s", client="c")
    await log.append([META])
    # The owner stalls past its lease; another process, opening the stream, ends it.
    await admin.delete(owner.key("lease", "s"))
    seen = await other.get("s")
    assert seen is not None

    # The stalled owner comes back with a one-event batch, as long as the reaper's own.
    with pytest.raises(LogClosed):
        await log.append([content("late")])
    await log.finish()  # as its generation does on LogClosed

    everywhere = await ends(seen)
    assert [kind for _, kind, _ in everywhere] == ["meta", "error"]
    assert everywhere[-1][2]["code"] == "generation_lost" and everywhere[-1][2]["retryable"] is True
    assert await ends(log) == everywhere, "the owner's own readers get the same end as everyone"


async def test_a_stream_redis_lost_ends_for_the_owners_readers_with_a_retryable_error(
    pair: tuple[RedisStreamStore, RedisStreamStore], admin: aioredis.Redis
) -> None:
    owner, _ = pair
    log = await owner.create("s", client="c")
    await log.append([META, content("a")])
    # What a restart without persistence (or a flush) does to the stream.
    await admin.delete(*[owner.key(kind, "s") for kind in ("meta", "log", "lease")])

    with pytest.raises(LogClosed):
        await log.append([content("b")])
    await log.finish()

    kept = await ends(log)
    assert [kind for _, kind, _ in kept] == ["meta", "content", "error"]
    assert kept[-1][2]["code"] == "store_unavailable" and kept[-1][2]["retryable"] is True


async def test_a_refused_write_ends_the_stream_in_this_process_and_its_end_is_kept_here(
    pair: tuple[RedisStreamStore, RedisStreamStore], admin: aioredis.Redis
) -> None:
    # Redis answers an error (out of memory, read-only after a failover) rather than nothing.
    owner, _ = pair
    log = await owner.create("s", client="c")
    await log.append([META])
    await admin.config_set("maxmemory", "1")
    try:
        with pytest.raises(Exception) as refused:
            await log.append([content("a")])
        assert getattr(refused.value, "code", None) == "store_unavailable"
        # The generation then logs its error event: this process's readers get it.
        await log.append([STORE_ERROR])
        await log.finish()
    finally:
        await admin.config_set("maxmemory", "0")

    assert [kind for _, kind, _ in await ends(log)] == ["meta", "error"]


@contextlib.asynccontextmanager
async def slow_answers(server: RedisServer, delay: float) -> AsyncIterator[str]:
    """A Redis URL whose answers come ``delay`` seconds late: a TCP proxy that holds Redis's bytes back."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, late: float) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if late:
                    await asyncio.sleep(late)
                writer.write(data)
        writer.close()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", server.port)
        await asyncio.gather(pipe(reader, upstream_writer, 0), pipe(upstream_reader, writer, delay))

    proxy = await asyncio.start_server(connection, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proxy.close()


async def test_a_client_ahead_of_the_owners_memory_resumes_on_the_owner_from_redis(
    shared_redis: RedisServer,
) -> None:
    # Another process can serve an event before the owner has had Redis's answer for it; a client
    # handed back by that process then asks the owner for what comes after it.
    prefix = f"test-{secrets.token_hex(4)}"
    settings: dict[str, Any] = {
        "prefix": prefix,
        "retention": 60,
        "stream_bytes": 64 * KIB,
        "total_bytes": 64 * KIB,
        "max_streams": 100,
        "client_streams": 100,
    }
    async with slow_answers(shared_redis, 0.5) as slow_url:
        owner_client, other_client = connect(slow_url), connect(shared_redis.url)
        owner = RedisStreamStore(owner_client, **settings)
        other = RedisStreamStore(other_client, **settings)
        try:
            log = await owner.create("s", client="c")
            await log.append([META])
            appending = asyncio.ensure_future(log.append([content("a"), content("b")]))
            await asyncio.sleep(0.2)  # in Redis now, its answer still on the way back

            seen = await other.get("s")
            assert seen is not None
            served, _ = await seen.read(0)
            assert served is not None and served.last == 3, "another process serves events 2 and 3 already"
            resumed, _ = await log.read(2, max_bytes=0)
            await appending
        finally:
            for store, client in ((owner, owner_client), (other, other_client)):
                await store.close()
                await client.aclose()

    assert resumed is not None and resumed.first == 3


async def test_the_bytes_counted_in_total_are_the_bytes_kept(
    pair: tuple[RedisStreamStore, RedisStreamStore], admin: aioredis.Redis
) -> None:
    # Trimming, evicting finished streams and finishing all keep the count the budget is checked against.
    owner, _ = pair
    finished = await owner.create("old", client="c")
    await finished.append([content("x" * 700) for _ in range(20)])
    await finished.finish()
    live = await owner.create("live", client="c")
    for _ in range(100):
        await live.append([content("y" * 500)])

    sizes = {k.decode(): int(v) for k, v in (await admin.hgetall(f"{owner.prefix}:sizes")).items()}
    total = int(await admin.get(f"{owner.prefix}:total"))
    kept = 0
    for stream in ("old", "live"):
        for _, fields in await admin.xrange(owner.key("log", stream)):
            kept += len(fields[b"d"]) + 32
    assert total == sum(sizes.values()) == kept
    assert total <= 64 * KIB


async def test_a_redis_that_never_answers_fails_a_call_within_seconds() -> None:
    # Accepts the connection, reads everything, answers nothing: no call may wait forever.
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        try:
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass
        finally:
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = connect(f"redis://127.0.0.1:{port}/0")
    store = RedisStreamStore(
        client, prefix="mute", retention=60, stream_bytes=KIB, total_bytes=KIB, max_streams=1, client_streams=1
    )
    store.start()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Exception) as failed:
            async with asyncio.timeout(15):
                await store.create("s", client="c")
        assert getattr(failed.value, "code", None) == "store_unavailable"
        assert loop.time() - started < 8
    finally:
        await store.close()
        await client.aclose()
        server.close()
        await asyncio.sleep(0.1)  # connections accepted last get to their handler, and into ``held``
        for writer in held:
            writer.close()
        await server.wait_closed()


async def test_an_append_whose_reply_never_came_is_settled_with_what_redis_holds_before_the_end(
    own_redis: RedisServer,
) -> None:
    # Redis freezes with the batch unread; the store gives up on the reply (5 s) and drops the connection;
    # thawed, Redis still runs what it had received. One number must not then name two events.
    async with two_stores(own_redis.url) as (owner, other):
        log = await owner.create("s", client="c")
        await log.append([META])
        with own_redis.frozen(), pytest.raises(StoreUnavailable):
            await log.append([content("a real token")])
        # As the generation does: its end, then finish.
        await log.append([STORE_ERROR])
        await log.finish()

        here = await ends(log)
        elsewhere = await ends(await other.get("s"))

    assert [(seq, kind) for seq, kind, _ in here] == [(1, "meta"), (2, "content"), (3, "error")]
    assert here == elsewhere


async def test_a_stream_whose_writer_cannot_tell_what_redis_holds_is_read_from_redis_past_what_it_confirmed(
    own_redis: RedisServer,
) -> None:
    async with two_stores(own_redis.url) as (owner, other):
        log = await owner.create("s", client="c")
        await log.append([META])
        with own_redis.frozen():
            with pytest.raises(StoreUnavailable):
                await log.append([content("a real token")])
            with pytest.raises(StoreUnavailable):
                # Redis cannot tell yet: the end is not numbered here.
                await asyncio.wait_for(log.append([STORE_ERROR]), 10)
            await log.finish()
            assert log.handed_over
            # What Redis confirmed is read from here, Redis or no Redis.
            confirmed, finished = await log.read(0)
            assert confirmed is not None and [kind for kind, _ in confirmed.items] == ["meta"] and not finished

        past, _ = await log.read(1)
        assert past is not None and [kind for kind, _ in past.items] == ["content"]
        with pytest.raises(StoreUnavailable):
            # Nothing more here: the reader is sent to follow it from Redis, whose reaper ends it.
            await log.read(2)
        assert await other.get("s") is not None, "another process finds it, to read it from Redis"


async def test_a_batch_redis_took_and_then_trimmed_leaves_the_writer_unable_to_tell_so_it_hands_over(
    own_redis: RedisServer,
) -> None:
    # Redis runs the unanswered append, and the stream's byte budget drops what came before it:
    # what follows this copy's last event is gone from Redis, which is not the same as Redis losing it.
    async with two_stores(own_redis.url, stream_bytes=1024) as (owner, _):
        log = await owner.create("s", client="c")
        await log.append([META])
        with own_redis.frozen(), pytest.raises(StoreUnavailable):
            await log.append([content("x" * 400) for _ in range(4)])

        with pytest.raises(StoreUnavailable):
            await log.append([STORE_ERROR])
        await log.finish()

        assert log.handed_over, "its end is not numbered here, where it could name an event Redis has"


async def test_a_redis_that_went_away_before_the_append_was_written_ends_the_stream_here_in_order(
    own_redis: RedisServer,
) -> None:
    async with two_stores(own_redis.url) as (owner, _):
        log = await owner.create("s", client="c")
        await log.append([META, content("a")])
        own_redis.stop()
        await asyncio.sleep(0.2)  # the store's connection hears that it closed

        with pytest.raises(StoreUnavailable):
            await log.append([content("b")])
        await log.append([STORE_ERROR])
        await log.finish()

        assert not log.handed_over, "nothing was written: the end is this process's to number"
        assert [(seq, kind) for seq, kind, _ in await ends(log)] == [(1, "meta"), (2, "content"), (3, "error")]


async def test_a_stream_redis_lost_is_a_retryable_failure_for_a_reader_elsewhere_not_a_gap_of_its_own(
    pair: tuple[RedisStreamStore, RedisStreamStore], admin: aioredis.Redis
) -> None:
    owner, other = pair
    log = await owner.create("s", client="c")
    await log.append([META, content("a")])
    seen = await other.get("s")
    assert seen is not None
    # What a restart without persistence (or a flush) does to the stream.
    await admin.delete(*[owner.key(kind, "s") for kind in ("meta", "log", "lease")])

    with pytest.raises(StoreUnavailable) as lost:
        await seen.read(2)

    assert lost.value.event()["retryable"] is True


async def test_what_a_process_read_from_its_inbox_leaves_redis(
    pair: tuple[RedisStreamStore, RedisStreamStore], admin: aioredis.Redis
) -> None:
    # An inbox entry is a whole batch, outside every byte budget: kept once read, a process's inbox
    # would hold thousands of them.
    owner, other = pair
    log = await owner.create("s", client="c")
    await log.append([META])
    await other.reader_joined("s")
    seen = await other.get("s")
    assert seen is not None
    woken = asyncio.Event()
    seen.subscribe(woken.set)
    for i in range(50):
        await log.append([content(f"{i} " + "x" * 1000)])
    inbox = other.key("inbox", other.process)

    for _ in range(50):
        if await admin.xlen(inbox) <= 1:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail(f"the inbox still holds {await admin.xlen(inbox)} entries after 5 s")

    assert woken.is_set()
    seen.unsubscribe(woken.set)
    await other.reader_left("s")


async def test_a_stream_whose_making_was_cancelled_gives_back_its_slot_at_once(shared_redis: RedisServer) -> None:
    async with two_stores(shared_redis.url, client_streams=1) as (owner, _):
        making = asyncio.create_task(owner.create("s1", client="c"))
        await asyncio.sleep(0)  # its script is on its way
        making.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await making

        async with asyncio.timeout(2):  # not the lease's 10 s
            while True:
                try:
                    log = await owner.create("s2", client="c")
                    break
                except RelayError:
                    await asyncio.sleep(0.05)

    assert log.stream_id == "s2"


async def test_a_reader_whose_joining_was_cancelled_is_not_left_registered(
    pair: tuple[RedisStreamStore, RedisStreamStore],
) -> None:
    # A registration left standing would hold the stream's disconnect grace for a whole lease.
    owner, other = pair
    log = await owner.create("s", client="c")
    await log.append([META])
    joining = asyncio.create_task(other.reader_joined("s"))
    await asyncio.sleep(0)  # its script is on its way
    joining.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await joining

    await asyncio.sleep(0.3)  # its script has run, and whatever follows it

    assert await owner.readers_elsewhere("s") == 0


class CutAfterOneCommand:
    """A TCP proxy to Redis that passes one script call of the next batch, then resets, and lets no one in again.

    What a network drop in the middle of a large write does: Redis ran the
    first call of the batch, and the writer's send fails partway.
    """

    MARKER = b"\r\n$7\r\nEVALSHA\r\n"

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.armed = False
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)

        async def back() -> None:
            while data := await redis_reader.read(65536):
                client_writer.write(data)

        replies = asyncio.create_task(back())
        pending = b""
        try:
            while data := await client_reader.read(65536):
                if not self.armed:
                    redis_writer.write(data)
                    continue
                pending += data
                first = pending.find(self.MARKER)
                second = pending.find(self.MARKER, first + 1)
                if second < 0:
                    continue
                redis_writer.write(pending[: pending.rfind(b"*", 0, second)])
                await asyncio.sleep(0.3)  # Redis runs it
                assert self.server is not None
                self.server.close()
                client_writer.transport.abort()
                break
        finally:
            replies.cancel()
            redis_writer.close()
            client_writer.close()


async def test_a_batch_cut_partway_through_its_write_leaves_the_writer_unable_to_tell_so_it_hands_over(
    own_redis: RedisServer,
) -> None:
    proxy = CutAfterOneCommand(own_redis.port)
    proxy_port = await proxy.start()
    async with two_stores(own_redis.url, stream_bytes=1 << 30, total_bytes=1 << 30) as (owner, _):
        pool = owner.client.connection_pool
        owner.calls._connection = pool.connection_class(
            **{**pool.connection_kwargs, "port": proxy_port, "socket_timeout": None}
        )
        small, large = await owner.create("a", client="c"), await owner.create("b", client="c")
        await small.append([META])
        await large.append([META])
        proxy.armed = True

        # One batch: the small append, then one large enough that its write waits on the cut connection.
        failed = await asyncio.gather(
            small.append([content("token A")]), large.append([content("x" * (40 << 20))]), return_exceptions=True
        )
        assert all(isinstance(failure, StoreUnavailable) for failure in failed)
        with pytest.raises(StoreUnavailable):
            await small.append([STORE_ERROR])
        await small.finish()

    assert small.handed_over, "Redis ran the small append: its end is not numbered here"
