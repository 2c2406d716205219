"""Shutdown on SIGTERM/SIGINT: running streams finish or end cleanly, and nothing leaks.

These run the real ``server.py`` in its own process and signal it, with a
provider in the test process that streams slowly and records when the
relay hung up on it.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import Received, clean_env, parse_sse, start_server

from handlers.config import Config
from handlers.keys import streams_key
from server import create_app

ServerFactory = Callable[..., Awaitable[TestServer]]

LEAK_SIGNS = (b"Traceback", b"Task was destroyed", b"Unclosed", b"ResourceWarning", b"was never awaited")


class SlowProvider:
    """Streams ``tokens`` content chunks ``pace`` seconds apart, then ``[DONE]``."""

    def __init__(self, tokens: int, pace: float) -> None:
        self.tokens = tokens
        self.pace = pace
        self.hung_up = asyncio.Event()

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(self.tokens):
                chunk = {"choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                await asyncio.sleep(self.pace)
            await response.write(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionError, asyncio.CancelledError):
            # A write to the closed socket fails, or the test server cancels this handler.
            self.hung_up.set()
            raise
        return response


async def serve(aiohttp_server: ServerFactory, provider: SlowProvider) -> str:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", provider.chat_completions)
    server = await aiohttp_server(app)
    return str(server.make_url("/v1"))


async def read_stream(session: aiohttp.ClientSession, url: str, started: asyncio.Event) -> list[Received]:
    """Read one stream to its end, setting ``started`` once its first event is in."""
    body = b""
    async with session.get(url, params={"prompt": "go"}) as response:
        async for piece in response.content.iter_any():
            body += piece
            if b"\n\n" in body:
                started.set()
    return parse_sse(body)


async def run_and_stop(base_url: str, shutdown_timeout: float, streams: int) -> tuple[list[list[Received]], int, bytes]:
    """Start ``server.py``, open ``streams`` streams, SIGTERM it once they run, collect everything."""
    env = clean_env(LLM_BASE_URL=base_url, LLM_MODEL="slow-model")
    process, port, _ = await start_server("--shutdown-timeout", str(shutdown_timeout), env=env)
    assert process.stderr is not None
    url = f"http://127.0.0.1:{port}/stream"
    async with aiohttp.ClientSession() as session:
        started = [asyncio.Event() for _ in range(streams)]
        readers = [asyncio.create_task(read_stream(session, url, flag)) for flag in started]
        async with asyncio.timeout(10):
            for flag in started:
                await flag.wait()
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            results = await asyncio.gather(*readers)
            stderr = await process.stderr.read()
            code = await process.wait()
    return results, code, stderr


async def test_streams_that_finish_within_the_deadline_complete(aiohttp_server: ServerFactory) -> None:
    provider = SlowProvider(tokens=10, pace=0.1)
    results, code, stderr = await run_and_stop(await serve(aiohttp_server, provider), 10, streams=2)

    for events in results:
        assert events[-1].event == "done"
        assert sum(e.event == "content" for e in events) == 10
    assert code == 0
    assert not [sign for sign in LEAK_SIGNS if sign in stderr], stderr.decode()


async def test_streams_past_the_deadline_end_with_a_retryable_server_shutdown(aiohttp_server: ServerFactory) -> None:
    provider = SlowProvider(tokens=1000, pace=0.05)
    results, code, stderr = await run_and_stop(await serve(aiohttp_server, provider), 0.5, streams=2)

    for events in results:
        assert events[-1].event == "error"
        assert events[-1].data["code"] == "server_shutdown"
        assert events[-1].data["retryable"] is True
        assert "done" not in [e.event for e in events]
    async with asyncio.timeout(5):
        await provider.hung_up.wait()
    assert code == 0
    assert not [sign for sign in LEAK_SIGNS if sign in stderr], stderr.decode()


async def test_new_streams_are_refused_with_503_while_draining(
    aiohttp_client: Callable[..., Awaitable[aiohttp.test_utils.TestClient[web.Request, web.Application]]],
) -> None:
    client = await aiohttp_client(create_app(Config(demo_delay=0)))
    await client.app[streams_key].drain()

    async with client.get("/stream", params={"prompt": "hi"}) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
        assert (await response.json())["error"]["code"] == "server_shutdown"


async def test_the_whole_shutdown_fits_in_the_shutdown_timeout_and_a_second_or_two(
    aiohttp_server: ServerFactory,
) -> None:
    # Orchestrators allow a grace period (Docker 10 s, Kubernetes 30 s) and then kill: every connection a
    # server may hold at that moment must be done with by then, not only the running streams.
    provider = SlowProvider(tokens=1000, pace=0.05)
    env = clean_env(LLM_BASE_URL=await serve(aiohttp_server, provider), LLM_MODEL="slow-model")
    process, port, _ = await start_server("--shutdown-timeout", "2", env=env)
    assert process.stderr is not None
    url = f"http://127.0.0.1:{port}/stream"
    held: list[asyncio.StreamWriter] = []

    async def connection(sent: bytes) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(sent)
        await writer.drain()
        held.append(writer)

    async with aiohttp.ClientSession() as session:
        started = asyncio.Event()
        stream = asyncio.create_task(read_stream(session, url, started))
        # An idle keep-alive connection, one that sent half its headers, one that sent half its body.
        _, idle = await asyncio.open_connection("127.0.0.1", port)
        idle.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        held.append(idle)
        await connection(b"GET /healthz HTTP/1.1\r\nHost: 127")
        await connection(
            b"POST /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"messages":'
        )
        async with asyncio.timeout(10):
            await started.wait()
        await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        signalled = loop.time()
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.sleep(0.3)
            # The listener closes at once: while the streams drain, new connections are refused.
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)
            async with asyncio.timeout(30):
                events = await stream
                stderr = await process.stderr.read()
                code = await process.wait()
            took = loop.time() - signalled
        finally:
            for writer in held:
                writer.close()

    assert events[-1].event == "error" and events[-1].data["code"] == "server_shutdown"
    assert code == 0
    assert took < 2 + 2, f"the process took {took:.1f} s to exit"
    assert not [sign for sign in LEAK_SIGNS if sign in stderr], stderr.decode()
