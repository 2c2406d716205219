"""Several relay processes, one Redis: any process serves any stream (issue 13).

Every test here starts real ``python server.py`` processes on one real
``redis-server`` and a real aiohttp provider that streams slowly and notes
when a relay hangs up on it; clients talk to the processes over HTTP, as a
load balancer would spread them.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import (
    ROOT,
    Received,
    RedisServer,
    RelayProcess,
    chunk,
    clean_env,
    eventually,
    free_port,
    parse_sse,
    serve_provider,
    sse,
)

Relays = Callable[..., Awaitable[list[RelayProcess]]]

HELLO = {"messages": [{"role": "user", "content": "hello"}]}


@dataclass
class Call:
    """One request from a relay to the provider."""

    started: float
    hung_up: float | None = None
    finished: bool = False


@dataclass
class Ticking:
    """A provider that answers with ``count`` content tokens ``interval`` seconds apart."""

    count: int = 40
    interval: float = 0.05
    calls: list[Call] = field(default_factory=list)
    base_url: str = ""

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        loop = asyncio.get_running_loop()
        call = Call(loop.time())
        self.calls.append(call)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(self.count):
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError
                await response.write(sse(chunk(content=f"t{i} ")))
                await asyncio.sleep(self.interval)
            await response.write(sse(chunk(finish="stop"), "[DONE]"))
            await response.write_eof()
            call.finished = True
        except ConnectionError:
            call.hung_up = loop.time()
        except asyncio.CancelledError:
            # The test server cancels a handler whose client went away.
            call.hung_up = loop.time()
            raise
        return response

    def answer(self) -> str:
        return "".join(f"t{i} " for i in range(self.count))


@pytest.fixture
async def provider(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Ticking:
    fake = Ticking()
    fake.base_url = await serve_provider(aiohttp_server, fake.chat_completions)
    return fake


@pytest.fixture
async def relays(provider: Ticking, redis_settings: dict[str, Any]) -> AsyncIterator[Relays]:
    """``await relays(n, *flags, redis_url=…)``: n ``server.py`` processes on one Redis and the provider."""
    started: list[RelayProcess] = []

    async def start(n: int, *flags: str, redis_url: str | None = None, **env: str) -> list[RelayProcess]:
        environment = clean_env(
            LLM_BASE_URL=provider.base_url,
            LLM_MODEL="m",
            THINKSTREAM_REDIS_URL=redis_url or redis_settings["redis_url"],
            THINKSTREAM_REDIS_PREFIX=redis_settings["redis_prefix"],
            **env,
        )
        group = await asyncio.gather(*(RelayProcess.start(*flags, env=environment) for _ in range(n)))
        started.extend(group)
        return list(group)

    yield start
    await asyncio.gather(*(relay.stop() for relay in started))
    for relay in started:
        assert b"Traceback" not in relay.log, relay.log.decode()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def read_events(response: aiohttp.ClientResponse, count: int | None = None) -> list[Received]:
    """Events from an SSE response: ``count`` of them, or all until it ends."""
    events: list[Received] = []
    buffer = b""
    while count is None or len(events) < count:
        line = await response.content.readline()
        if not line:
            break
        buffer += line
        if line in (b"\n", b"\r\n"):
            events += parse_sse(buffer)
            buffer = b""
    return events


def assert_whole(events: list[Received], answer: str) -> None:
    """One stream, every event exactly once and in order, ending with done."""
    stream = events[0].id.rpartition(":")[0]
    assert [e.id for e in events] == [f"{stream}:{n}" for n in range(1, len(events) + 1)]
    assert events[-1].event == "done", events[-1]
    assert "".join(e.data["text"] for e in events if e.event == "content") == answer


@contextlib.asynccontextmanager
async def started_stream(
    http: aiohttp.ClientSession, relay: RelayProcess, count: int = 3, **kwargs: Any
) -> AsyncIterator[tuple[aiohttp.ClientResponse, list[Received]]]:
    """``POST /stream`` on ``relay``, its first ``count`` events read; the connection is held open."""
    async with http.post(relay.url("/stream"), json=HELLO, **kwargs) as response:
        assert response.status == 200, await response.text()
        yield response, await read_events(response, count)


# The log and readers anywhere.


async def test_a_stream_resumes_on_another_process_exactly_once_and_in_order(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession
) -> None:
    a, b = await relays(2)
    async with started_stream(http, a) as (_, before):
        pass  # The first connection drops after three events.

    async with http.get(
        b.url(f"/stream/{before[0].data['stream']}"), headers={"Last-Event-ID": before[-1].id}
    ) as response:
        assert response.status == 200
        after = await read_events(response)

    assert_whole(before + after, provider.answer())
    assert len(provider.calls) == 1


async def test_an_eventsource_reconnect_to_another_process_resumes_without_a_second_provider_request(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession
) -> None:
    a, b = await relays(2)
    async with http.get(a.url("/stream"), params={"prompt": "hi"}) as first:
        before = await read_events(first, 4)

    async with http.get(b.url("/stream"), params={"prompt": "hi"}, headers={"Last-Event-ID": before[-1].id}) as again:
        assert again.status == 200
        after = await read_events(again)

    assert_whole(before + after, provider.answer())
    assert len(provider.calls) == 1


async def test_a_finished_stream_replays_whole_from_any_process(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession
) -> None:
    provider.count, provider.interval = 5, 0.0
    a, b = await relays(2)
    async with http.post(a.url("/stream"), json=HELLO) as response:
        direct = await read_events(response)

    async with http.get(b.url(f"/stream/{direct[0].data['stream']}")) as replay:
        assert [(e.id, e.data) for e in await read_events(replay)] == [(e.id, e.data) for e in direct]


async def test_readers_on_another_process_follow_live_through_one_connection_to_redis(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession, redis_settings: dict[str, Any]
) -> None:
    # Thirty clients following thirty streams on process b wait on Redis together, not a connection each.
    provider.count, provider.interval = 30, 0.1
    a, b = await relays(2, "--client-streams", "100")
    streams = []
    for _ in range(30):
        async with started_stream(http, a, count=1) as (_, meta):
            streams.append(meta[0].data["stream"])
    followers = [await http.get(b.url(f"/stream/{stream}")) for stream in streams]
    try:
        import redis.asyncio as aioredis

        async with aioredis.Redis.from_url(redis_settings["redis_url"]) as admin:
            await asyncio.sleep(0.5)
            clients = await admin.client_list()
        pid = b.process.pid
        held_by_b = [c for c in clients if c.get("name", "").endswith(f"-{pid}")]
        assert 1 <= len(held_by_b) <= 6, f"process b holds {len(held_by_b)} Redis connections for 30 readers"
        results = await asyncio.gather(*(read_events(f) for f in followers))
    finally:
        for follower in followers:
            follower.close()

    for events in results:
        assert events[-1].event == "done"
        assert "".join(e.data["text"] for e in events if e.event == "content") == provider.answer()


# Cancel and the disconnect grace, from anywhere.


async def test_a_cancel_on_another_process_closes_the_provider_request_within_a_second(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession
) -> None:
    provider.count = 400  # 20 s unless cancelled
    a, b = await relays(2)
    async with started_stream(http, a) as (response, before):
        loop = asyncio.get_running_loop()
        asked = loop.time()
        async with http.post(b.url(f"/stream/{before[0].data['stream']}/cancel")) as cancel:
            assert await cancel.json() == {"stream": before[0].data["stream"], "cancelled": True}
        rest = await read_events(response)

    (call,) = provider.calls
    await eventually(lambda: call.hung_up is not None, "the provider request is closed", 1.5)
    assert call.hung_up is not None and call.hung_up - asked < 1.0
    assert rest[-1].event == "error" and rest[-1].data["code"] == "cancelled"


async def test_a_cancel_is_not_lost_when_its_message_is(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession, redis_settings: dict[str, Any]
) -> None:
    # The cancelled state lives in Redis; the owner re-reads it even if no pub/sub message reaches it.
    import redis.asyncio as aioredis

    provider.count = 400
    (a,) = await relays(1)
    async with started_stream(http, a) as (response, before):
        stream = before[0].data["stream"]
        async with aioredis.Redis.from_url(redis_settings["redis_url"]) as admin:
            await admin.hset(f"{{{redis_settings['redis_prefix']}}}:meta:{stream}", "cancel", "1")
        rest = await read_events(response)

    assert rest[-1].data["code"] == "cancelled"
    await eventually(lambda: provider.calls[0].hung_up is not None, "the provider request is closed")


async def test_the_disconnect_grace_waits_for_readers_on_every_process(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession
) -> None:
    provider.count = 400
    a, b = await relays(2, "--disconnect-grace", "1")
    async with started_stream(http, a) as (_, before):
        follower = await http.get(b.url(f"/stream/{before[0].data['stream']}"))
    # Process a has no reader left; b has one. Well past the grace time, the generation goes on.
    await asyncio.sleep(3)
    assert provider.calls[0].hung_up is None, "cancelled although a reader on another process followed"

    follower.close()
    await eventually(lambda: provider.calls[0].hung_up is not None, "the abandoned generation is cancelled", 5)


async def test_a_process_shutting_down_hands_its_readers_of_other_streams_back_at_once(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession
) -> None:
    # Their generations run elsewhere and go on: the clients resume them on a process that stays.
    provider.count = 100
    a, b = await relays(2, "--shutdown-timeout", "10")
    async with started_stream(http, a, count=2) as (_, before):
        stream = before[0].data["stream"]
        async with http.get(b.url(f"/stream/{stream}"), headers={"Last-Event-ID": before[-1].id}) as follower:
            seen = await read_events(follower, 2)
            loop = asyncio.get_running_loop()
            stopping = loop.time()
            b.process.send_signal(signal.SIGTERM)
            seen += await read_events(follower)
            handed_back = loop.time() - stopping
        async with http.get(a.url(f"/stream/{stream}"), headers={"Last-Event-ID": seen[-2].id}) as resumed:
            rest = await read_events(resumed)

    assert handed_back < 3
    assert seen[-1].event == "error"
    assert seen[-1].data["code"] == "server_shutdown" and seen[-1].data["retryable"] is True
    assert seen[-1].data["resume"] is True, "only the connection ended, not the stream"
    assert_whole(before + seen[:-1] + rest, provider.answer())


# A dead owner.


async def test_when_the_owner_is_killed_readers_elsewhere_get_a_retryable_error_within_15_s(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession
) -> None:
    provider.count = 400
    a, b, c = await relays(3)
    async with started_stream(http, a, count=2) as (_, before):
        stream = before[0].data["stream"]
        async with http.get(b.url(f"/stream/{stream}"), headers={"Last-Event-ID": before[-1].id}) as follower:
            await read_events(follower, 2)
            loop = asyncio.get_running_loop()
            a.process.send_signal(signal.SIGKILL)
            killed = loop.time()
            rest = await read_events(follower)
            ended = loop.time()

    assert ended - killed < 15
    assert rest[-1].event == "error"
    assert rest[-1].data["code"] == "generation_lost" and rest[-1].data["retryable"] is True
    # A later resume, anywhere, replays to that same end.
    async with http.get(c.url(f"/stream/{stream}"), headers={"Last-Event-ID": before[-1].id}) as later:
        replay = await read_events(later)
    assert [e.id for e in replay][-1] == rest[-1].id
    assert replay[-1].data == rest[-1].data


async def test_a_stream_whose_owner_died_unwatched_ends_when_someone_resumes_it(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession
) -> None:
    provider.count = 400
    a, b = await relays(2)
    async with started_stream(http, a, count=2) as (_, before):
        a.kill()
    await asyncio.sleep(6)  # past the owner's lease

    async with http.get(b.url(f"/stream/{before[0].data['stream']}")) as response:
        events = await read_events(response)

    assert events[0].event == "meta"
    assert events[-1].data["code"] == "generation_lost"


async def test_an_owner_that_stalls_past_its_lease_and_its_readers_agree_on_the_end(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession
) -> None:
    # Taken for dead while stopped, the owner comes back to a log that ended without it.
    provider.count = 600
    a, b = await relays(2)
    async with started_stream(http, a, count=2) as (owner_side, before):
        stream = before[0].data["stream"]
        async with http.get(b.url(f"/stream/{stream}"), headers={"Last-Event-ID": before[-1].id}) as follower:
            await read_events(follower, 2)
            a.process.send_signal(signal.SIGSTOP)
            elsewhere = await read_events(follower)
            a.process.send_signal(signal.SIGCONT)
        here = await read_events(owner_side)
    async with http.get(b.url(f"/stream/{stream}")) as replay:
        whole = await read_events(replay)

    assert elsewhere[-1].data["code"] == "generation_lost"
    assert (here[-1].id, here[-1].data) == (elsewhere[-1].id, elsewhere[-1].data) == (whole[-1].id, whole[-1].data)


async def test_a_reader_process_that_stalled_is_counted_again_for_the_disconnect_grace(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession
) -> None:
    # Stalled past its lease, b looks dead for a moment (a grace shorter than the stall would rightly
    # end the stream); back, it must count again before the grace runs out.
    provider.count = 600
    a, b = await relays(2, "--disconnect-grace", "4")
    async with started_stream(http, a, count=2) as (_, before):
        follower = await http.get(
            b.url(f"/stream/{before[0].data['stream']}"), headers={"Last-Event-ID": before[-1].id}
        )
    await read_events(follower, 2)
    b.process.send_signal(signal.SIGSTOP)
    await asyncio.sleep(11)  # past b's registration as a reader
    b.process.send_signal(signal.SIGCONT)
    await read_events(follower, 3)
    await asyncio.sleep(6)  # well past the grace, b's client still reading

    follower.close()
    assert provider.calls[0].hung_up is None, "cancelled although a reader on another process followed"


# Redis refusing, restarting, busy.


async def test_redis_refusing_writes_mid_stream_ends_it_with_a_retryable_error_and_frees_its_slot(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession, own_redis: RedisServer
) -> None:
    import redis.asyncio as aioredis

    provider.count = 400
    (a,) = await relays(1, "--max-streams", "1", redis_url=own_redis.url)
    async with aioredis.Redis.from_url(own_redis.url) as admin, started_stream(http, a, count=2) as (response, _):
        await admin.config_set("maxmemory", "1")  # out of memory: every write is refused
        try:
            async with asyncio.timeout(10):
                rest = await read_events(response)
        finally:
            await admin.config_set("maxmemory", "0")
    assert rest[-1].event == "error"
    assert rest[-1].data["code"] == "store_unavailable" and rest[-1].data["retryable"] is True

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15  # its slot's lease runs out
    while True:
        async with http.post(a.url("/stream"), json=HELLO) as again:
            if again.status == 200:
                break
        assert loop.time() < deadline, "the slot of a stream Redis would not take never came back"
        await asyncio.sleep(0.5)


async def test_a_redis_restart_between_two_tokens_ends_the_stream_with_a_retryable_error(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession, own_redis: RedisServer
) -> None:
    # Without persistence the restarted Redis has no such stream: never a silent end.
    provider.count, provider.interval = 10, 1.0  # a model that thinks between tokens
    (a,) = await relays(1, redis_url=own_redis.url)
    async with started_stream(http, a, count=2) as (response, _):
        own_redis.stop()
        own_redis.start()
        async with asyncio.timeout(30):
            rest = await read_events(response)

    assert rest[-1].event == "error"
    assert rest[-1].data["retryable"] is True


async def test_a_redis_busy_for_a_moment_leaves_every_process_serving_afterwards(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession, own_redis: RedisServer
) -> None:
    import redis.asyncio as aioredis

    provider.count, provider.interval = 20, 0.05
    a, b = await relays(2, redis_url=own_redis.url)
    busy = "local s = redis.call('TIME')[1] while redis.call('TIME')[1] - s < 2 do end return 1"
    async with aioredis.Redis.from_url(own_redis.url) as admin:
        await admin.config_set("busy-reply-threshold", "100")  # other clients get -BUSY meanwhile
        async with started_stream(http, a, count=2) as (_, before):
            follower = await http.get(b.url(f"/stream/{before[0].data['stream']}"))
            await read_events(follower, 2)
            await admin.eval(busy, 0)
            follower.close()
    await asyncio.sleep(1)

    async with started_stream(http, a, count=1) as (_, fresh):
        stream = fresh[0].data["stream"]
        async with asyncio.timeout(15), http.get(b.url(f"/stream/{stream}")) as again:
            events = await read_events(again)
    assert_whole(events, provider.answer())


async def test_metrics_answer_while_redis_is_down(
    relays: Relays, http: aiohttp.ClientSession, own_redis: RedisServer
) -> None:
    (a,) = await relays(1, redis_url=own_redis.url)
    own_redis.stop()

    async with http.get(a.url("/metrics")) as scraped:
        assert scraped.status == 200
        assert "thinkstream_streams" in await scraped.text()


# Limits across processes.


async def test_client_streams_count_across_processes(relays: Relays, http: aiohttp.ClientSession) -> None:
    a, b = await relays(2, "--client-streams", "1")
    async with started_stream(http, a), http.post(b.url("/stream"), json=HELLO) as refused:
        assert refused.status == 429
        assert (await refused.json())["error"]["code"] == "too_many_streams"
        assert int(refused.headers["Retry-After"]) >= 1


async def test_max_streams_counts_across_processes(relays: Relays, http: aiohttp.ClientSession) -> None:
    a, b = await relays(2, "--max-streams", "1")
    async with started_stream(http, a), http.post(b.url("/stream"), json=HELLO) as refused:
        assert refused.status == 503
        assert (await refused.json())["error"]["code"] == "server_busy"


async def test_the_request_rate_counts_across_processes(relays: Relays, http: aiohttp.ClientSession) -> None:
    a, b = await relays(2, "--rate-limit", "3/hour")
    for relay in (a, b, a):
        async with http.get(relay.url("/models")) as allowed:
            assert allowed.status == 200

    async with http.get(b.url("/models")) as refused:
        assert refused.status == 429
        assert (await refused.json())["error"]["code"] == "rate_limited"


async def test_a_crashed_process_gives_back_its_stream_slots(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession
) -> None:
    provider.count = 400
    a, b = await relays(2, "--max-streams", "1")
    async with started_stream(http, a):
        a.kill()
    async with http.post(b.url("/stream"), json=HELLO) as refused:
        assert refused.status == 503

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        async with http.post(b.url("/stream"), json=HELLO) as response:
            if response.status == 200:
                break
        assert loop.time() < deadline, "the dead process's slot never came back"
        await asyncio.sleep(0.5)


# Ownership.


async def test_another_token_gets_404_on_any_process(relays: Relays, http: aiohttp.ClientSession) -> None:
    a, b = await relays(2, "--token", "tok-a,tok-b")
    async with started_stream(http, a, headers={"Authorization": "Bearer tok-a"}) as (_, before):
        path = f"/stream/{before[0].data['stream']}"
        async with http.get(b.url(path), headers={"Authorization": "Bearer tok-b"}) as foreign:
            assert foreign.status == 404
        async with http.post(b.url(path + "/cancel"), headers={"Authorization": "Bearer tok-b"}) as foreign:
            assert foreign.status == 404
        async with http.get(b.url(path), headers={"Authorization": "Bearer tok-a"}) as own:
            assert own.status == 200


@pytest.mark.parametrize(
    ("header", "status"),
    [
        ("nonsense", 400),
        ("{thinkstream}:1", 404),
        ("x" * 5000 + ":1", 404),
        ("abc:" + "9" * 50, 404),
        ("abc:" + "9" * 5000, 400),
    ],
    ids=["no seq", "hash tag", "long id", "long seq of no stream", "seq past any number"],
)
async def test_a_malformed_or_foreign_last_event_id_is_refused_never_a_store_error(
    relays: Relays, http: aiohttp.ClientSession, header: str, status: int
) -> None:
    (a,) = await relays(1)
    async with http.get(a.url("/stream"), params={"prompt": "hi"}, headers={"Last-Event-ID": header}) as response:
        assert response.status == status
        assert response.content_type == "application/json"


# Redis down.


async def test_with_redis_down_the_process_starts_reports_unready_and_refuses_streams_then_recovers(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession, own_redis: RedisServer
) -> None:
    provider.count, provider.interval = 3, 0.0
    own_redis.stop()
    (a,) = await relays(1, redis_url=own_redis.url)

    async with http.get(a.url("/healthz")) as health:
        assert health.status == 200
    async with http.get(a.url("/readyz")) as ready:
        assert ready.status == 503
        assert "store" in (await ready.json())["reason"]
    async with http.post(a.url("/stream"), json=HELLO) as refused:
        assert refused.status == 503
        assert (await refused.json())["error"]["code"] == "store_unavailable"
        assert int(refused.headers["Retry-After"]) >= 1

    own_redis.start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        async with http.post(a.url("/stream"), json=HELLO) as response:
            if response.status == 200:
                events = await read_events(response)
                break
        assert loop.time() < deadline, "never recovered once Redis was back"
        await asyncio.sleep(0.5)
    assert_whole(events, provider.answer())
    async with http.get(a.url("/readyz")) as ready:
        assert ready.status == 200


async def test_redis_lost_mid_stream_ends_it_with_a_retryable_error_for_every_reader(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession, own_redis: RedisServer
) -> None:
    provider.count = 400
    a, b = await relays(2, redis_url=own_redis.url)
    async with started_stream(http, a, count=2) as (owner_side, before):
        follower = await http.get(b.url(f"/stream/{before[0].data['stream']}"))
        await read_events(follower, 3)
        own_redis.stop()
        async with asyncio.timeout(20):
            owner_rest, follower_rest = await asyncio.gather(read_events(owner_side), read_events(follower))
        follower.close()

    for rest in (owner_rest, follower_rest):
        assert rest[-1].event == "error"
        assert rest[-1].data["code"] == "store_unavailable" and rest[-1].data["retryable"] is True


# What Redis holds.


async def test_every_key_the_relay_writes_has_a_ttl(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession, redis_settings: dict[str, Any]
) -> None:
    import redis.asyncio as aioredis

    provider.count = 40
    a, b = await relays(2)
    # Running streams, one with a reader on the other process.
    async with (
        started_stream(http, a),
        started_stream(http, b, count=1) as (_, other),
        http.get(a.url(f"/stream/{other[0].data['stream']}")) as follower,
    ):
        await read_events(follower, 1)
        await asyncio.sleep(1.5)  # a heartbeat
        async with aioredis.Redis.from_url(redis_settings["redis_url"]) as admin:
            running = {key: await admin.pttl(key) async for key in admin.scan_iter("*")}
    async with http.post(a.url("/stream"), json=HELLO) as finished:
        await read_events(finished)
    async with aioredis.Redis.from_url(redis_settings["redis_url"]) as admin:
        done = {key: await admin.pttl(key) async for key in admin.scan_iter("*")}

    ours = redis_settings["redis_prefix"].encode()
    for keys in (running, done):
        mine = {key: ttl for key, ttl in keys.items() if ours in key}
        assert any(b":log:" in key for key in mine) and any(b":limits" in key for key in mine)
        assert all(ttl > 0 for ttl in mine.values()), {k: v for k, v in mine.items() if v <= 0}


async def test_redis_keeps_what_a_finished_stream_needs_and_about_this_many_bytes(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession, redis_settings: dict[str, Any]
) -> None:
    # What the README says to expect per stream: its events' JSON plus a small overhead.
    import redis.asyncio as aioredis

    provider.count, provider.interval = 200, 0.0
    (a,) = await relays(1)
    async with http.post(a.url("/stream"), json=HELLO) as response:
        events = await read_events(response)
    text_bytes = sum(len(orjson.dumps(e.data)) for e in events)

    async with aioredis.Redis.from_url(redis_settings["redis_url"]) as admin:
        prefix = "{" + redis_settings["redis_prefix"] + "}"
        used = await admin.memory_usage(f"{prefix}:log:{events[0].data['stream']}")
    assert used is not None and text_bytes <= used <= 3 * text_bytes + 4096


# Metrics, and gunicorn.


async def test_any_process_answers_metrics_for_every_process_labelled_by_process(
    relays: Relays, provider: Ticking, http: aiohttp.ClientSession
) -> None:
    provider.count, provider.interval = 3, 0.0
    a, b = await relays(2)
    for relay in (a, b, b):
        async with http.post(relay.url("/stream"), json=HELLO) as response:
            await read_events(response)
    await asyncio.sleep(1.5)  # Each process publishes its metrics every heartbeat.

    async with http.get(a.url("/metrics")) as scraped:
        text = await scraped.text()

    done = dict(re.findall(r'thinkstream_streams_total\{outcome="done",process="([^"]+)"\} (\S+)', text))
    assert sorted(float(n) for n in done.values()) == [1.0, 2.0]
    assert {name.split(":")[1] for name in done} == {str(a.process.pid), str(b.process.pid)}
    assert text.count("# TYPE thinkstream_streams_total counter") == 1, "one family, however many processes"


@dataclass
class Gunicorn:
    process: asyncio.subprocess.Process
    port: int
    log: bytearray

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def gunicorn(provider: Ticking, redis_settings: dict[str, Any]) -> AsyncIterator[Gunicorn]:
    """``gunicorn 'server:app_factory'`` with two aiohttp workers on one Redis, as the README runs it."""
    port = free_port()
    env = clean_env(
        LLM_BASE_URL=provider.base_url,
        LLM_MODEL="m",
        REDIS_URL=redis_settings["redis_url"],
        THINKSTREAM_REDIS_PREFIX=redis_settings["redis_prefix"],
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gunicorn",
        "server:app_factory",
        "--worker-class",
        "aiohttp.GunicornWebWorker",
        "--workers",
        "2",
        "--bind",
        f"127.0.0.1:{port}",
        cwd=ROOT,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    log = bytearray()

    async def drain() -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            log.extend(line)

    draining = asyncio.ensure_future(drain())
    server = Gunicorn(process, port, log)
    async with aiohttp.ClientSession() as session:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(server.url("/readyz")) as ready:
                    if ready.status == 200:
                        break
            assert process.returncode is None, log.decode()
            assert loop.time() < deadline, f"gunicorn never became ready: {log.decode()}"
            await asyncio.sleep(0.2)
    try:
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await process.wait()
            await draining
        assert b"Traceback" not in log, log.decode()


async def test_gunicorn_with_two_workers_serves_the_page_end_to_end(
    gunicorn: Gunicorn, provider: Ticking, browser: Any
) -> None:
    provider.count, provider.interval = 20, 0.02
    page = await browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    try:
        await page.goto(gunicorn.url("/"))
        await page.wait_for_selector("#model option", state="attached", timeout=20_000)
        await page.fill("#prompt", "hello")
        await page.press("#prompt", "Enter")
        await page.wait_for_function(
            """() => {
                const answer = document.querySelector("#messages article.assistant");
                return answer && answer.getAttribute("aria-busy") === "false";
            }""",
            timeout=20_000,
        )
        shown = await page.locator("#messages article.assistant .answer").inner_text()
    finally:
        await page.close()

    assert shown.split() == provider.answer().split()
    assert problems == []


async def test_under_gunicorn_each_worker_serves_streams_and_metrics_count_both(
    gunicorn: Gunicorn, provider: Ticking
) -> None:
    provider.count, provider.interval = 2, 0.0
    # New connections every time, so that the kernel spreads them over the workers.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        streams = []
        for _ in range(20):
            async with http.post(gunicorn.url("/stream"), json=HELLO) as response:
                streams.append(await read_events(response))
        # Each stream replays whole whichever worker a resume lands on.
        for events in streams[:5]:
            async with http.get(gunicorn.url(f"/stream/{events[0].data['stream']}")) as replay:
                assert [e.id for e in await read_events(replay)] == [e.id for e in events]
        await asyncio.sleep(1.5)  # every worker has published its metrics
        async with http.get(gunicorn.url("/metrics")) as scraped:
            text = await scraped.text()

    processes = set(re.findall(r'thinkstream_active_streams\{process="([^"]+)"\}', text))
    assert len(processes) == 2, text
    assert gunicorn.log.count(b"stream ended stream=") >= 20, "each worker logs its streams"
    done = re.findall(r'thinkstream_streams_total\{outcome="done",process="[^"]+"\} (\S+)', text)
    assert sum(float(n) for n in done) == 20


class Balancer:
    """A reverse proxy in front of relay processes, as a load balancer is, with two habits for the test.

    It cuts the connection of the first stream after a few writes (a network drop), and sends each
    resume to the next process in turn that still takes connections.
    """

    def __init__(self, backends: list[RelayProcess]) -> None:
        self.backends = backends
        self.turn = 1  # the first resume goes to another process than the one the stream started on
        self.cut_after: int | None = 3
        self.served_by: list[int] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length", "connection")
        }
        resume = request.method == "GET" and request.path.startswith("/stream/")
        order = self.backends[self.turn :] + self.backends[: self.turn] if resume else self.backends
        if resume:
            self.turn = (self.turn + 1) % len(self.backends)
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            for backend in order:
                try:
                    upstream = await session.request(
                        request.method, backend.url(str(request.rel_url)), headers=headers, data=body
                    )
                except aiohttp.ClientConnectionError:
                    continue  # Not taking connections (shutting down): the next one.
                break
            else:
                return web.Response(status=502)
            self.served_by.append(backend.port)
            async with upstream:
                response = web.StreamResponse(status=upstream.status)
                for name in ("Content-Type", "Cache-Control"):
                    if name in upstream.headers:
                        response.headers[name] = upstream.headers[name]
                await response.prepare(request)
                cut = None
                if request.method == "POST":
                    cut, self.cut_after = self.cut_after, None
                writes = 0
                async for data in upstream.content.iter_any():
                    await response.write(data)
                    writes += 1
                    if cut is not None and writes >= cut:
                        assert request.transport is not None
                        request.transport.abort()
                        return response
                return response


async def test_the_page_follows_a_stream_across_processes_and_a_process_going_away(
    relays: Relays, provider: Ticking, aiohttp_server: Callable[..., Awaitable[TestServer]], browser: Any
) -> None:
    # Behind a balancer the page's resumes land on any process; one shutting down hands it back.
    provider.count, provider.interval = 80, 0.05
    a, b = await relays(2)
    balancer = Balancer([a, b])
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", balancer.handle)
    front = await aiohttp_server(app)
    page = await browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    try:
        await page.goto(str(front.make_url("/")))
        await page.wait_for_selector("#model option", state="attached", timeout=20_000)
        await page.fill("#prompt", "hello")
        await page.press("#prompt", "Enter")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while b.port not in balancer.served_by:  # the first drop was resumed on b
            assert loop.time() < deadline, f"the page never resumed on b: {balancer.served_by}"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        b.process.send_signal(signal.SIGTERM)
        await page.wait_for_function(
            """() => {
                const answer = document.querySelector("#messages article.assistant");
                return answer && answer.getAttribute("aria-busy") === "false";
            }""",
            timeout=30_000,
        )
        shown = await page.locator("#messages article.assistant .answer").inner_text()
        errors = await page.locator("#messages article.assistant .error").count()
    finally:
        await page.close()

    assert shown.split() == provider.answer().split()
    assert errors == 0 and problems == []
    assert len(provider.calls) == 1, "one generation, resumed twice"
    assert balancer.served_by.count(a.port) >= 2, "handed back to a after b went away"
