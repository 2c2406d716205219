"""A generation's life: cancelled, abandoned, resumed, kept alive, timed out, broken, or held up by a reader.

The provider here is a real aiohttp server whose handler each test scripts: it
sends a few chunks, falls silent, resets its connection… and notes the moment
the relay hangs up on it, so that a test can tell whether, and when, the relay
let go of the provider's request.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import socket
import sys
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, cast

import aiohttp
import orjson
import pytest
from aiohttp import ClientResponse, web
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner
from helpers import (
    Received,
    RedisServer,
    RelayFactory,
    chunk,
    collect,
    eventually,
    kinds,
    parse_sse,
    sse,
    text_of,
    types,
)

from handlers.app import create_app
from handlers.config import Config
from handlers.keys import streams_key
from handlers.provider.sse_decoder import SSEDecoder
from handlers.provider.upstream import Upstream
from handlers.routes.chat_request import ChatRequest
from handlers.stores.log import Events
from handlers.stores.memory import MemoryStreamLog, MemoryStreamStore
from handlers.streams.generation import Generation, Streams, cancelled

Client = TestClient[web.Request, web.Application]

# Long enough never to end by itself in a test; the relay hangs up or the test releases it first.
FOREVER = 20.0


class Call:
    """One request from the relay to the scripted provider, as its script sees it."""

    def __init__(self, request: web.Request, provider: ScriptedProvider) -> None:
        self.request = request
        self.response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        self.prompt = ""
        self._provider = provider

    @property
    def relay_hung_up(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    async def headers(self) -> None:
        """Send the status line and headers, no body yet."""
        if not self.response.prepared:
            await self.response.prepare(self.request)

    async def send(self, *texts: str) -> None:
        """One network write holding a content chunk for each text (the relay may merge them into one event)."""
        await self.headers()
        await self.response.write(sse(*(chunk(content=text) for text in texts)))

    async def comment(self) -> None:
        await self.headers()
        await self.response.write(b": keep-alive\n\n")

    async def finish(self) -> None:
        """End the answer properly: a finish reason, then ``[DONE]``."""
        await self.headers()
        await self.response.write(sse(chunk(finish="stop"), "[DONE]"))
        await self.response.write_eof()

    async def silence(self, seconds: float = FOREVER) -> None:
        """Send nothing for ``seconds``, or until the test releases the provider.

        aiohttp tells a handler nothing when its client goes (unless it cancels
        the handler), so the socket is looked at while waiting; a hang-up is
        recorded and ends the script with :class:`ConnectionResetError`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while loop.time() < deadline and not self._provider.released.is_set():
            if self.relay_hung_up:
                raise ConnectionResetError("the relay hung up")
            await asyncio.sleep(0.02)

    def reset(self) -> None:
        """Abort the connection: the relay sees a TCP reset, not an orderly end."""
        assert self.request.transport is not None
        self.request.transport.abort()


Script = Callable[[Call], Awaitable[None]]


class ScriptedProvider:
    """An OpenAI-compatible provider that runs ``script`` for each request and notes when the relay hangs up."""

    def __init__(self) -> None:
        self.script: Script = finishes
        self.base_url = ""
        self.calls = 0
        self.hung_up = asyncio.Event()
        self.hung_up_at: float | None = None
        # Ends every silence early: the test's way to let a silent provider go on.
        self.released = asyncio.Event()

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        call = Call(request, self)
        call.prompt = (await request.json())["messages"][-1]["content"]
        try:
            await self.script(call)
        except (ConnectionResetError, asyncio.CancelledError):
            # The test server cancels a handler whose client left; a run_app server would not.
            self._note_hang_up()
            raise
        return call.response

    def _note_hang_up(self) -> None:
        if not self.hung_up.is_set():
            self.hung_up_at = asyncio.get_running_loop().time()
            self.hung_up.set()


# Scripts.


async def finishes(call: Call) -> None:
    await call.send("Hel", "lo")
    await call.finish()


async def sends_one_chunk_then_falls_silent(call: Call) -> None:
    await call.send("Hel")
    await call.silence()


async def pauses_after_one_chunk_until_released(call: Call) -> None:
    await call.send("Hel")
    await call.silence()
    await call.send("lo", " there")
    await call.finish()


async def pauses_a_second_after_one_chunk(call: Call) -> None:
    await call.send("Hel")
    await call.silence(1.0)
    await call.send("lo")
    await call.finish()


async def waits_a_second_before_its_headers(call: Call) -> None:
    await call.silence(1.0)
    await finishes(call)


async def sends_headers_then_waits_a_second(call: Call) -> None:
    await call.headers()
    await call.silence(1.0)
    await finishes(call)


async def sends_only_comments_for_a_second(call: Call) -> None:
    for _ in range(10):
        await asyncio.sleep(0.1)
        await call.comment()
    await call.send("Hel", "lo")
    await call.finish()


async def resets_after_two_chunks_once_released(call: Call) -> None:
    await call.send("Hel")
    await call.send("lo")
    await call.silence()
    call.reset()


# Fixtures.


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> AsyncIterator[ScriptedProvider]:
    fake = ScriptedProvider()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat_completions)
    server = await aiohttp_server(app)
    fake.base_url = str(server.make_url("/v1"))
    yield fake
    # Silent scripts end now, so that the server's graceful shutdown does not wait for them.
    fake.released.set()


@pytest.fixture
def relay_to_upstream(relay: RelayFactory, upstream: ScriptedProvider) -> RelayFactory:
    """``await relay_to_upstream(**settings)``: a relay pointed at the scripted provider."""

    async def make(**settings: Any) -> Client:
        return await relay(base_url=upstream.base_url, model="m", **settings)

    return make


class RunAppServer(TestServer):
    """Serves an app as ``web.run_app`` does: a handler runs on after its client hangs up.

    aiohttp's test server cancels it instead, which would hide how the relay
    notices a dropped connection in production.
    """

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return await super()._make_runner(**{**kwargs, "handler_cancellation": False})


@pytest.fixture(
    params=[
        pytest.param(True, id="handler cancelled on hang-up"),
        pytest.param(False, id="handler left running, as web.run_app serves"),
    ]
)
def served_relay(
    request: pytest.FixtureRequest, aiohttp_client: AiohttpClient, upstream: ScriptedProvider
) -> RelayFactory:
    """A relay pointed at the scripted provider, served both ways aiohttp may treat a hang-up."""

    async def make(**settings: Any) -> Client:
        app = create_app(Config(base_url=upstream.base_url, model="m", **settings))
        if request.param:
            return await aiohttp_client(app)
        # Typed as a client of a bare server, but it serves ``app`` (``client.app`` is it).
        return cast(Client, await aiohttp_client(RunAppServer(app)))

    return make


# Helpers.


def now() -> float:
    return asyncio.get_running_loop().time()


def streams_of(client: Client) -> Streams:
    return client.app[streams_key]


def received(raw: Any) -> Received:
    return Received(raw.event, raw.id, orjson.loads(raw.data), raw.retry)


async def read_until(response: ClientResponse, kind: str, text: str | None = None) -> list[Received]:
    """Read an open stream up to and including its first ``kind`` event, or until its ``kind`` events spell ``text``.

    ``text`` rather than a number of events, because text that arrives in one
    read may come as one event or several.
    """
    decoder = SSEDecoder()
    events: list[Received] = []
    async with asyncio.timeout(5):
        async for line in response.content:
            events += [received(e) for e in decoder.feed(line)]
            if kind in types(events) and (text is None or text_of(events, kind) == text):
                return events
    wanted = f"{kind} text {text!r}" if text is not None else f"a {kind} event"
    raise AssertionError(f"the stream ended before {wanted}: {types(events)}")


async def read_rest(response: ClientResponse) -> list[Received]:
    decoder = SSEDecoder()
    async with asyncio.timeout(5):
        body = await response.read()
    return [received(e) for e in decoder.feed(body) + decoder.close()]


async def wait_for_hang_up(upstream: ScriptedProvider, within: float = 5.0) -> float:
    """When the relay closed the provider's connection."""
    async with asyncio.timeout(within):
        await upstream.hung_up.wait()
    assert upstream.hung_up_at is not None
    return upstream.hung_up_at


def the_error(events: list[Received]) -> dict[str, Any]:
    """The stream's last event, checked to be its only ``error`` and not followed by ``done``."""
    assert types(events).count("error") == 1 and events[-1].event == "error", types(events)
    assert "done" not in types(events)
    return events[-1].data


def cancel(client: Client, method: str, stream_id: str) -> Any:
    path = f"/stream/{stream_id}/cancel" if method == "POST" else f"/stream/{stream_id}"
    return client.request(method, path)


CANCEL_METHODS = [
    pytest.param("POST", id="POST /stream/{id}/cancel"),
    pytest.param("DELETE", id="DELETE /stream/{id}"),
]


# Cancel.


@pytest.mark.parametrize("method", CANCEL_METHODS)
async def test_cancelling_a_running_stream_answers_cancelled_true(
    relay_to_upstream: RelayFactory, upstream: ScriptedProvider, method: str
) -> None:
    upstream.script = sends_one_chunk_then_falls_silent
    client = await relay_to_upstream()
    async with client.get("/stream", params={"prompt": "hi"}) as stream:
        stream_id = (await read_until(stream, "content"))[0].data["stream"]
        async with cancel(client, method, stream_id) as answer:
            assert answer.status == 200
            assert await answer.json() == {"stream": stream_id, "cancelled": True}


@pytest.mark.parametrize("method", CANCEL_METHODS)
async def test_a_cancelled_stream_ends_with_a_cancelled_error_and_no_done(
    relay_to_upstream: RelayFactory, upstream: ScriptedProvider, method: str
) -> None:
    upstream.script = sends_one_chunk_then_falls_silent
    client = await relay_to_upstream()
    async with client.get("/stream", params={"prompt": "hi"}) as stream:
        before = await read_until(stream, "content")
        async with cancel(client, method, before[0].data["stream"]):
            pass
        events = before + await read_rest(stream)

    assert types(events) == ["meta", "content", "error"]
    assert text_of(events, "content") == "Hel"
    assert the_error(events)["code"] == "cancelled"


@pytest.mark.parametrize("method", CANCEL_METHODS)
async def test_cancelling_closes_the_providers_connection_at_once(
    relay_to_upstream: RelayFactory, upstream: ScriptedProvider, method: str
) -> None:
    upstream.script = sends_one_chunk_then_falls_silent
    client = await relay_to_upstream()
    async with client.get("/stream", params={"prompt": "hi"}) as stream:
        stream_id = (await read_until(stream, "content"))[0].data["stream"]
        cancelled_at = now()
        async with cancel(client, method, stream_id):
            pass

        assert await wait_for_hang_up(upstream) - cancelled_at < 2.0


async def test_a_stream_cancelled_while_waiting_for_the_providers_first_byte_ends_with_cancelled(
    relay_to_upstream: RelayFactory, upstream: ScriptedProvider
) -> None:
    upstream.script = waits_a_second_before_its_headers
    client = await relay_to_upstream()
    async with client.get("/stream", params={"prompt": "hi"}) as stream:
        before = await read_until(stream, "meta")
        async with cancel(client, "POST", before[0].data["stream"]) as answer:
            assert (await answer.json())["cancelled"] is True
        events = before + await read_rest(stream)

    assert types(events) == ["meta", "error"]
    assert the_error(events)["code"] == "cancelled"
    await wait_for_hang_up(upstream)


async def test_a_cancelled_stream_replays_to_its_cancelled_error_for_a_late_reader(
    relay_to_upstream: RelayFactory, upstream: ScriptedProvider
) -> None:
    upstream.script = sends_one_chunk_then_falls_silent
    client = await relay_to_upstream()
    async with client.get("/stream", params={"prompt": "hi"}) as stream:
        live = await read_until(stream, "content")
        stream_id = live[0].data["stream"]
        async with cancel(client, "POST", stream_id):
            pass
        live += await read_rest(stream)

    replayed = await collect(client, path=f"/stream/{stream_id}")

    assert replayed == live


async def test_a_stop_while_the_streams_end_waits_on_a_frozen_redis_leaves_it_ended_counted_and_logged(
    relay_to_upstream: RelayFactory,
    upstream: ScriptedProvider,
    redis_settings: dict[str, Any],
    own_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="handlers.streams.generation")
    upstream.script = sends_one_chunk_then_falls_silent
    client = await relay_to_upstream(**{**redis_settings, "redis_url": own_redis.url})
    async with client.get("/stream", params={"prompt": "hi"}) as stream:
        meta = orjson.loads((await stream.content.readuntil(b"\n\n")).split(b"data: ")[1])
        with own_redis.frozen():
            rest = asyncio.create_task(stream.read())
            # The chunk's append is given up on after 5 s; the stream's end then waits on Redis too.
            await asyncio.sleep(7.5)
            generation = streams_of(client).get(meta["stream"])
            assert generation is not None and generation.stop(cancelled())
        await asyncio.wait_for(rest, 15)

    assert b"event: error" in rest.result()
    ended = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stream ended")]
    assert len(ended) == 1 and "outcome=store_unavailable" in ended[0]


@pytest.mark.parametrize("method", CANCEL_METHODS)
async def test_cancelling_a_finished_stream_answers_cancelled_false(
    relay_to_upstream: RelayFactory, upstream: ScriptedProvider, method: str
) -> None:
    upstream.script = finishes
    client = await relay_to_upstream()
    events = await collect(client, params={"prompt": "hi"})
    assert types(events)[-1] == "done"
    stream_id = events[0].data["stream"]

    async with cancel(client, method, stream_id) as answer:
        assert answer.status == 200
        assert await answer.json() == {"stream": stream_id, "cancelled": False}


@pytest.mark.parametrize("method", CANCEL_METHODS)
async def test_cancelling_twice_answers_cancelled_false_the_second_time(
    relay_to_upstream: RelayFactory, upstream: ScriptedProvider, method: str
) -> None:
    upstream.script = sends_one_chunk_then_falls_silent
    client = await relay_to_upstream()
    async with client.get("/stream", params={"prompt": "hi"}) as stream:
        stream_id = (await read_until(stream, "content"))[0].data["stream"]
        async with cancel(client, method, stream_id) as first:
            assert (await first.json())["cancelled"] is True
        async with cancel(client, method, stream_id) as second:
            assert await second.json() == {"stream": stream_id, "cancelled": False}


@pytest.mark.parametrize("method", CANCEL_METHODS)
async def test_cancelling_an_unknown_stream_is_404_stream_not_found(
    relay_to_upstream: RelayFactory, method: str
) -> None:
    client = await relay_to_upstream()
    async with cancel(client, method, "no-such-stream") as answer:
        assert answer.status == 404
        assert answer.content_type == "application/json"
        error = (await answer.json())["error"]
    assert error["code"] == "stream_not_found"
    assert "no-such-stream" in error["message"]


# The last client leaves.


async def test_without_grace_a_dropped_client_closes_the_silent_providers_connection_within_a_second(
    served_relay: RelayFactory, upstream: ScriptedProvider
) -> None:
    upstream.script = sends_one_chunk_then_falls_silent
    client = await served_relay(disconnect_grace=0)
    async with client.get("/stream", params={"prompt": "hi"}) as stream:
        stream_id = (await read_until(stream, "content"))[0].data["stream"]
        stream.close()
        dropped_at = now()

    assert await wait_for_hang_up(upstream) - dropped_at < 2.5
    generation = streams_of(client).get(stream_id)
    assert generation is not None
    await eventually(lambda: not generation.running, "the generation ends")
    assert generation.outcome == "cancelled"


async def test_a_client_that_returns_within_the_grace_keeps_the_generation_and_gets_every_event(
    served_relay: RelayFactory, upstream: ScriptedProvider
) -> None:
    grace = 0.6
    upstream.script = pauses_after_one_chunk_until_released
    client = await served_relay(disconnect_grace=grace)
    async with client.get("/stream", params={"prompt": "hi"}) as stream:
        before = await read_until(stream, "content")
        stream.close()
    generation = streams_of(client).get(before[0].data["stream"])
    assert generation is not None
    await eventually(lambda: generation.readers == 0, "the relay notices the client left")
    abandoned_at = now()

    # An EventSource reconnects to the URL it had, with the last id it received.
    resumed = {"Last-Event-ID": before[-1].id}
    async with client.get("/stream", params={"prompt": "hi"}, headers=resumed) as stream:
        await eventually(lambda: generation.readers == 1, "the returning client is attached")
        # Well past the moment the grace would have run out had nobody come back.
        await asyncio.sleep(max(0.0, abandoned_at + grace + 0.5 - now()))
        upstream.released.set()
        after = await read_rest(stream)

    events = before + after
    stream_id = before[0].data["stream"]
    assert [e.id for e in events] == [f"{stream_id}:{n}" for n in range(1, len(events) + 1)]
    assert kinds(events) == ["meta", "content", "done"]
    assert text_of(before, "content") == "Hel"
    assert text_of(events, "content") == "Hello there"
    assert not upstream.hung_up.is_set()
    assert upstream.calls == 1


async def test_when_nobody_returns_the_providers_connection_is_closed_after_the_grace_not_before(
    served_relay: RelayFactory, upstream: ScriptedProvider
) -> None:
    grace = 1.0
    upstream.script = sends_one_chunk_then_falls_silent
    client = await served_relay(disconnect_grace=grace)
    async with client.get("/stream", params={"prompt": "hi"}) as stream:
        stream_id = (await read_until(stream, "content"))[0].data["stream"]
        stream.close()
        dropped_at = now()

    waited = await wait_for_hang_up(upstream) - dropped_at
    assert grace <= waited < grace + 2.0
    generation = streams_of(client).get(stream_id)
    assert generation is not None
    await eventually(lambda: not generation.running, "the generation ends")
    assert generation.outcome == "cancelled"


# Keep-alive.


async def test_a_silent_provider_leaves_keep_alive_comments_between_the_events(
    relay_to_upstream: RelayFactory, upstream: ScriptedProvider
) -> None:
    upstream.script = pauses_a_second_after_one_chunk
    client = await relay_to_upstream(keepalive=0.2)
    async with client.get("/stream", params={"prompt": "hi"}) as stream:
        body = (await stream.read()).decode()

    blocks = body.split("\n\n")
    first = next(i for i, block in enumerate(blocks) if "event: content" in block)
    second = next(i for i, block in enumerate(blocks) if i > first and "event: content" in block)
    assert any(block.startswith(":") for block in blocks[first + 1 : second]), blocks[first : second + 1]


async def test_a_silent_provider_leaves_empty_lines_between_the_events_of_an_ndjson_stream(
    relay_to_upstream: RelayFactory, upstream: ScriptedProvider
) -> None:
    # The page reads NDJSON: behind a proxy with an idle timeout it needs keep-alives as much as SSE does.
    upstream.script = pauses_a_second_after_one_chunk
    client = await relay_to_upstream(keepalive=0.2)
    async with client.get("/stream", params={"prompt": "hi", "format": "ndjson"}) as stream:
        lines = (await stream.read()).decode().split("\n")

    kinds = [orjson.loads(line)["type"] if line else "" for line in lines[:-1]]
    first = kinds.index("content")
    second = kinds.index("content", first + 1)
    assert "" in kinds[first + 1 : second], kinds
    assert kinds[-1] == "done" and lines[-1] == "", "nothing follows the last event's line"


# Timeouts.


SLOW_FIRST_BYTE = [
    pytest.param(waits_a_second_before_its_headers, id="no headers yet"),
    pytest.param(sends_headers_then_waits_a_second, id="headers but no body yet"),
]


@pytest.mark.parametrize("script", SLOW_FIRST_BYTE)
async def test_a_provider_slow_to_send_its_first_byte_is_upstream_first_byte_timeout(
    relay_to_upstream: RelayFactory, upstream: ScriptedProvider, script: Script
) -> None:
    upstream.script = script
    events = await collect(await relay_to_upstream(first_byte_timeout=0.3), params={"prompt": "hi"})

    assert types(events) == ["meta", "error"]
    error = the_error(events)
    assert (error["code"], error["retryable"]) == ("upstream_first_byte_timeout", True)


@pytest.mark.parametrize("script", SLOW_FIRST_BYTE)
async def test_the_idle_timeout_does_not_cut_short_the_wait_for_the_first_byte(
    relay_to_upstream: RelayFactory, upstream: ScriptedProvider, script: Script
) -> None:
    # README: --first-byte-timeout bounds the wait for the first byte, --idle-timeout the silence between bytes.
    upstream.script = script
    events = await collect(await relay_to_upstream(first_byte_timeout=5, idle_timeout=0.3), params={"prompt": "hi"})

    assert kinds(events) == ["meta", "content", "done"]
    assert text_of(events, "content") == "Hello"


async def test_a_provider_silent_after_its_first_chunk_is_upstream_idle_timeout(
    relay_to_upstream: RelayFactory, upstream: ScriptedProvider
) -> None:
    upstream.script = sends_one_chunk_then_falls_silent
    events = await collect(await relay_to_upstream(idle_timeout=0.3), params={"prompt": "hi"})

    assert types(events) == ["meta", "content", "error"]
    assert text_of(events, "content") == "Hel"
    error = the_error(events)
    assert (error["code"], error["retryable"]) == ("upstream_idle_timeout", True)


@pytest.mark.parametrize(
    "setting",
    [
        pytest.param({"first_byte_timeout": 0.3}, id="for the first-byte timeout"),
        pytest.param({"idle_timeout": 0.3}, id="for the idle timeout"),
    ],
)
async def test_keep_alive_comments_from_the_provider_count_as_activity(
    relay_to_upstream: RelayFactory, upstream: ScriptedProvider, setting: dict[str, float]
) -> None:
    upstream.script = sends_only_comments_for_a_second
    events = await collect(await relay_to_upstream(**setting), params={"prompt": "hi"})

    assert types(events)[-1] == "done"
    assert text_of(events, "content") == "Hello"


@contextlib.contextmanager
def listener_with_a_full_backlog() -> Iterator[int]:
    """A loopback port whose accept queue is full, so the kernel drops new connection attempts (SYNs).

    With ``listen(0)`` Linux queues one connection; the ones opened here fill
    the queue and are never accepted, so a further ``connect`` neither
    succeeds nor fails until the client gives up.
    """
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port: int = server.getsockname()[1]
        for _ in range(3):
            filler = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        yield port


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux dropping SYNs when the accept queue is full")
async def test_a_provider_that_never_accepts_the_connection_is_upstream_connect_timeout(relay: RelayFactory) -> None:
    with listener_with_a_full_backlog() as port:
        client = await relay(base_url=f"http://127.0.0.1:{port}/v1", model="m", connect_timeout=0.3)
        events = await collect(client, params={"prompt": "hi"})

    assert types(events) == ["meta", "error"]
    error = the_error(events)
    assert (error["code"], error["retryable"]) == ("upstream_connect_timeout", True)


# Faults after events were relayed.


async def test_a_provider_reset_mid_stream_keeps_the_events_relayed_and_ends_upstream_disconnected(
    relay_to_upstream: RelayFactory, upstream: ScriptedProvider
) -> None:
    upstream.script = resets_after_two_chunks_once_released
    client = await relay_to_upstream()
    async with client.get("/stream", params={"prompt": "hi"}) as stream:
        before = await read_until(stream, "content", text="Hello")
        upstream.released.set()
        events = before + await read_rest(stream)

    assert kinds(events) == ["meta", "content", "error"]
    assert text_of(events, "content") == "Hello"
    error = the_error(events)
    assert (error["code"], error["retryable"]) == ("upstream_disconnected", True)


# A reader that stops reading.

FLOOD_CHUNKS = 4000
FLOOD_TEXT = "x" * 2000  # 4000 chunks of 2 KB: 8 MB, more than loopback buffers hold.


async def floods_or_keeps_a_steady_pace(call: Call) -> None:
    if call.prompt == "flood":
        for _ in range(FLOOD_CHUNKS // 100):
            await call.send(*[FLOOD_TEXT] * 100)
    else:
        for n in range(10):
            await call.send(f"{n} ")
            await asyncio.sleep(0.05)
    await call.finish()


async def sends_one_chunk_then_floods_once_released(call: Call) -> None:
    await call.send("Hel")
    await call.silence()
    for _ in range(FLOOD_CHUNKS // 100):
        await call.send(*[FLOOD_TEXT] * 100)
    await call.finish()


async def raw_get(client: Client, path: str, headers: dict[str, str] | None = None) -> socket.socket:
    """A raw connection to the relay that has sent ``GET path`` and read nothing yet."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small receive window, set before connecting, so that the relay's writes back up quickly.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    assert client.server.port is not None
    await loop.sock_connect(sock, ("127.0.0.1", client.server.port))
    lines = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}\r\n".encode())
    return sock


async def stalled_reader(client: Client, path: str) -> tuple[socket.socket, str]:
    """A raw connection that asks for ``path``, reads just enough to learn the stream id, then never reads again."""
    loop = asyncio.get_running_loop()
    sock = await raw_get(client, path)
    head = b""
    async with asyncio.timeout(5):
        while (found := re.search(rb'"stream":"([A-Za-z0-9_-]+)"', head)) is None:
            head += await loop.sock_recv(sock, 256)
    return sock, found[1].decode()


async def read_what_is_left(sock: socket.socket) -> bytes:
    """Everything the connection still delivers until it ends or is reset."""
    loop = asyncio.get_running_loop()
    rest = b""
    with contextlib.suppress(ConnectionResetError):
        async with asyncio.timeout(5):
            while piece := await loop.sock_recv(sock, 1 << 16):
                rest += piece
    return rest


def events_in(response: bytes) -> list[Received]:
    """The events of a raw HTTP response from the relay: a 200 with a chunked ``text/event-stream`` body."""
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"Transfer-Encoding: chunked" in head, head
    payload, at = bytearray(), 0
    while (size := int(body[at : body.index(b"\r\n", at)], 16)) != 0:
        start = body.index(b"\r\n", at) + 2
        payload += body[start : start + size]
        at = start + size + 2
    return parse_sse(bytes(payload))


async def read_steadily(sock: socket.socket, rate: float) -> bytes:
    """Everything the connection delivers until it ends or is reset, read at ``rate`` bytes a second, never faster."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    received = bytearray()
    with contextlib.suppress(ConnectionResetError):
        async with asyncio.timeout(30):
            while piece := await loop.sock_recv(sock, 1 << 14):
                received += piece
                ahead = len(received) / rate - (loop.time() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
    return bytes(received)


# Big buffers, so that the reader is dropped for stalling and not for falling past what the stream keeps.
ROOMY = {"stream_buffer_bytes": 32 << 20, "buffer_total_bytes": 64 << 20}


@pytest.mark.parametrize(
    ("path", "done"),
    [
        pytest.param("/stream?prompt=flood", b"event: done", id="sse"),
        pytest.param("/stream?prompt=flood&format=ndjson", b'"type":"done"', id="ndjson"),
    ],
)
async def test_a_reader_that_stops_reading_is_dropped_after_the_stall_timeout(
    relay_to_upstream: RelayFactory, upstream: ScriptedProvider, path: str, done: bytes
) -> None:
    upstream.script = floods_or_keeps_a_steady_pace
    client = await relay_to_upstream(stall_timeout=0.5, **ROOMY)
    streams = streams_of(client)
    sock, stalled_id = await stalled_reader(client, path)
    with sock:
        stalled = streams.get(stalled_id)
        assert stalled is not None
        await eventually(lambda: stalled.readers == 0, "the stalled reader is dropped")

        # Cut off, not served to the end.
        assert done not in await read_what_is_left(sock)
    assert streams.reader_count == 0


async def test_a_stalled_reader_holds_up_neither_another_stream_nor_its_own_generation(
    relay_to_upstream: RelayFactory, upstream: ScriptedProvider
) -> None:
    upstream.script = floods_or_keeps_a_steady_pace
    client = await relay_to_upstream(stall_timeout=3.0, **ROOMY)
    sock, stalled_id = await stalled_reader(client, "/stream?prompt=flood")
    with sock:
        stalled = streams_of(client).get(stalled_id)
        assert stalled is not None
        async with asyncio.timeout(2.5):
            steady = await collect(client, params={"prompt": "steady"})
        await eventually(lambda: not stalled.running, "the flooded generation ends", within=2.5)
        # All that happened while the stalled reader was still stuck on a write.
        assert stalled.readers == 1

    assert types(steady)[-1] == "done"
    assert text_of(steady, "content") == "".join(f"{n} " for n in range(10))
    assert stalled.outcome == "done"


async def test_a_reader_that_stops_reading_does_not_hold_up_another_reader_of_the_same_stream(
    relay_to_upstream: RelayFactory, upstream: ScriptedProvider
) -> None:
    # README, "Slow readers": a client that stops reading "never holds up other streams or the generation". Nor,
    # then, the other readers of its own stream, which that generation feeds: they get the answer as it comes.
    upstream.script = sends_one_chunk_then_floods_once_released
    stall_timeout = 6.0
    client = await relay_to_upstream(stall_timeout=stall_timeout, **ROOMY)
    async with client.get("/stream", params={"prompt": "flood"}) as reading:
        before = await read_until(reading, "content", text="Hel")
        stream_id = before[0].data["stream"]
        generation = streams_of(client).get(stream_id)
        assert generation is not None
        # A second connection to the stream, resumed after meta, that never reads a byte of its response.
        stuck = await raw_get(client, f"/stream/{stream_id}", {"Last-Event-ID": before[0].id, "Connection": "close"})
        with stuck:
            await eventually(lambda: generation.readers == 2, "the stuck connection follows the stream")
            upstream.released.set()
            started = now()
            after = await read_rest(reading)
            took = now() - started
            # It has read nothing, so it has been sent no more than its receive buffer holds.
            delivered = stuck.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            # Once it reads (through a wider window, to be quick about it), it gets its answer too: it was kept
            # waiting, not dropped.
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            unread = await read_what_is_left(stuck)

    events = before + after
    assert [e.id for e in events] == [f"{stream_id}:{n}" for n in range(1, len(events) + 1)]
    assert kinds(events) == ["meta", "content", "done"]
    assert text_of(events, "content") == "Hel" + FLOOD_TEXT * FLOOD_CHUNKS
    assert took < stall_timeout / 3, f"the reading connection took {took:.1f} s"
    # While the reading connection got all 8 MB, megabytes of the stuck one's answer were waiting at the relay.
    assert len(unread) - delivered > 4 << 20
    assert events_in(unread) == events[1:]


# A reader that reads slowly, but steadily.


async def test_a_slow_but_steady_reader_of_a_long_backlog_is_not_taken_for_a_stalled_one(
    relay_to_upstream: RelayFactory, upstream: ScriptedProvider
) -> None:
    # README, "Slow readers": a client that *stops reading* for --stall-timeout seconds is dropped. One that keeps
    # reading is not, however many stall timeouts its backlog takes to read.
    upstream.script = floods_or_keeps_a_steady_pace
    stall_timeout = 1.0
    client = await relay_to_upstream(stall_timeout=stall_timeout, **ROOMY)
    events = await collect(client, params={"prompt": "flood"})
    stream_id = events[0].data["stream"]
    # Resumed after meta, the whole 8 MB answer is a backlog: read at 1.6 MB/s, it takes 5 s, and each 64 KiB 40 ms.
    # The connection's small receive buffer leaves most of the backlog waiting at the relay, not in the client's kernel.
    sock = await raw_get(client, f"/stream/{stream_id}", {"Last-Event-ID": events[0].id, "Connection": "close"})
    with sock:
        started = now()
        response = await read_steadily(sock, rate=1.6e6)
        took = now() - started

    # Served to the end, not cut off part way by the watchdog.
    assert response.endswith(b"\r\n0\r\n\r\n"), f"cut off after {len(response)} bytes, in {took:.1f} s"
    assert events_in(response) == events[1:]
    # It did take several stall timeouts, but no one write was left unread for that long.
    assert took > 3 * stall_timeout


class _SlowToEnd(MemoryStreamStore):
    """A store that takes a moment over a log's last event, as a shared store does over the network."""

    async def create(self, stream_id: str, *, client: str = "", principal: str | None = None) -> MemoryStreamLog:
        log = await super().create(stream_id, client=client, principal=principal)
        append = log.append

        async def slow_append(events: Sequence[tuple[str, bytes]]) -> Events:
            if events[-1][0] == "error":
                await asyncio.sleep(0.2)
            return await append(events)

        log.append = slow_append  # type: ignore[method-assign]
        return log


async def test_a_stop_heard_twice_still_ends_the_log_for_its_readers(upstream: ScriptedProvider) -> None:
    # A cancel from another process reaches the owner twice (a wake-up and the re-read of its flag);
    # the second must not land in the middle of writing the log's end.
    upstream.script = sends_one_chunk_then_falls_silent
    config = Config(base_url=upstream.base_url, model="m")
    store = _SlowToEnd(stream_bytes=1 << 20, total_bytes=1 << 20)
    streams = Streams(config, store)
    chat = ChatRequest(messages=({"role": "user", "content": "hi"},), model="m", options={})
    async with aiohttp.ClientSession() as session:
        generation = await streams.start(session, Upstream(upstream.base_url), chat, "client")
        log = generation.log
        await eventually(lambda: upstream.calls == 1, "the provider is called")
        generation.stop_requested()
        await asyncio.sleep(0.1)  # writing the cancelled error now
        generation.stop_requested()
        assert generation.task is not None
        await asyncio.wait([generation.task], timeout=5)
        events, finished = await log.read(0)
    await streams.close()

    assert finished and events is not None
    assert [kind for _, kind, _ in events][-1] == "error"
    assert orjson.loads(events.items[-1][1])["code"] == "cancelled"


# Memory: what a stream leaves behind is freed by reference counting alone. The collector, tuned for throughput
# (handlers/runtime.py), runs seldom, and a cycle a stream leaves (an exception whose traceback holds the frames
# that hold it) pins its connections and buffers until then: repeated disconnect storms grew the process.


@contextlib.contextmanager
def no_garbage_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def sends_one_chunk_then_ends(call: Call) -> None:
    await call.send("Hel")  # and no finish: the relay ends the stream with upstream_incomplete


STORM = 10


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(sends_one_chunk_then_falls_silent, id="clients that drop: generations cancelled"),
        pytest.param(sends_one_chunk_then_ends, id="a provider that fails: generations ending in an error"),
    ],
)
async def test_a_storms_generations_are_freed_without_the_garbage_collector(
    served_relay: RelayFactory, upstream: ScriptedProvider, script: Script
) -> None:
    upstream.script = script
    client = await served_relay(disconnect_grace=0, retention=0.1, client_streams=STORM, rate_limit="1000/minute")
    streams = streams_of(client)
    generations: list[weakref.ref[Generation]] = []
    with no_garbage_collector():
        for _ in range(STORM):
            async with client.get("/stream", params={"prompt": "hi"}) as stream:
                stream_id = (await read_until(stream, "content"))[0].data["stream"]
                generation = streams.get(stream_id)
                assert generation is not None
                generations.append(weakref.ref(generation))
                del generation
                stream.close()
        # Once expired (--retention), each is let go of; the handlers of the dropped clients end meanwhile.
        await eventually(
            lambda: all(ref() is None for ref in generations), "every generation is freed by reference counting"
        )


async def test_the_demo_models_answers_to_dropped_streams_are_freed_without_the_garbage_collector(
    aiohttp_client: AiohttpClient,
) -> None:
    app = create_app(Config(demo_delay=0.05, demo_tokens=1000, disconnect_grace=0, retention=0.1))
    answers: list[weakref.ref[web.StreamResponse]] = []

    async def note(request: web.Request, response: web.StreamResponse) -> None:
        if request.path.endswith("/chat/completions"):
            answers.append(weakref.ref(response))

    app.on_response_prepare.append(note)
    client = cast(Client, await aiohttp_client(RunAppServer(app)))
    streams = streams_of(client)
    with no_garbage_collector():
        for _ in range(STORM):
            async with client.get("/stream", params={"prompt": "hi"}) as stream:
                await read_until(stream, "reasoning")
                stream.close()
        await eventually(lambda: len(answers) == STORM and len(streams) == 0, "every stream ends")
        await eventually(lambda: all(ref() is None for ref in answers), "every answer is freed by reference counting")
