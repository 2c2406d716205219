"""Test helpers: a fake provider that is a real aiohttp server, and readers of the relay's output.

The fake provider replays ``text/event-stream`` transcripts from ``tests/data``
(or any bytes a test gives it), split into network writes as the test says,
and records every request it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from handlers.provider.sse_decoder import SSEDecoder

DATA = Path(__file__).parent / "data"


# Every recorded provider stream, by file name.
TRANSCRIPTS = sorted(path.name for path in DATA.glob("*.sse"))


def transcript(name: str) -> bytes:
    """A recorded provider stream from ``tests/data``."""
    return (DATA / name).read_bytes()


def transcript_think(name: str) -> str:
    """The ``think`` setting a transcript's model needs: ``open_think_*`` had ``<think>`` opened in the prompt."""
    return "open" if name.startswith("open_think") else "auto"


@dataclass
class Reply:
    """What the fake provider answers to one request."""

    body: bytes = b""
    status: int = 200
    content_type: str = "text/event-stream"
    # Sizes of the network writes; the rest of the body goes in the last one.
    chunks: Sequence[int] = ()
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def error(cls, status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
        return cls(body=orjson.dumps(payload), status=status, content_type="application/json", headers=headers or {})


@dataclass
class FakeProvider:
    """An OpenAI-compatible provider that replays scripted replies."""

    reply: Reply = field(default_factory=Reply)
    # Replies for the next requests, in order, before ``reply`` again.
    script: list[Reply] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    base_url: str = ""

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        self.headers.append(dict(request.headers))
        reply = self.script.pop(0) if self.script else self.reply
        headers = {**reply.headers, "Content-Type": reply.content_type}
        response = web.StreamResponse(status=reply.status, headers=headers)
        await response.prepare(request)
        for piece in _split(reply.body, reply.chunks):
            await response.write(piece)
            if reply.delay:
                await asyncio.sleep(reply.delay)
        await response.write_eof()
        return response


RelayFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


async def serve_provider(
    aiohttp_server: Callable[..., Awaitable[TestServer]], chat_completions: Callable[..., Awaitable[web.StreamResponse]]
) -> str:
    """A fake provider's ``/chat/completions`` handler served on a real port; its base URL."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    server = await aiohttp_server(app)
    return str(server.make_url("/v1"))


def sse(*data: Any) -> bytes:
    """A provider stream: each item is one ``data:`` event (objects as JSON, strings as they are)."""
    return b"".join(b"data: " + (d.encode() if isinstance(d, str) else orjson.dumps(d)) + b"\n\n" for d in data)


def chunk(*, content: str | None = None, reasoning: str | None = None, finish: str | None = None) -> dict[str, Any]:
    """One OpenAI-style ``chat.completion.chunk``."""
    delta: dict[str, Any] = {}
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _split(body: bytes, sizes: Sequence[int]) -> list[bytes]:
    pieces, start = [], 0
    for size in sizes:
        if start >= len(body):
            break
        pieces.append(body[start : start + size])
        start += size
    if start < len(body):
        pieces.append(body[start:])
    return pieces


@dataclass(frozen=True)
class Received:
    """One event as a client of the relay received it."""

    event: str
    id: str
    data: dict[str, Any]
    retry: int | None = None


def parse_sse(body: bytes) -> list[Received]:
    """Decode the relay's SSE output (the decoder has its own spec tests)."""
    decoder = SSEDecoder()
    events = decoder.feed(body) + decoder.close()
    return [Received(e.event, e.id, orjson.loads(e.data), e.retry) for e in events]


async def collect(
    client: TestClient[web.Request, web.Application], method: str = "GET", path: str = "/stream", **kwargs: Any
) -> list[Received]:
    """Make one streaming request and return every event it produced."""
    async with client.request(method, path, **kwargs) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/event-stream"
        return parse_sse(await response.read())


def types(events: Sequence[Received]) -> list[str]:
    return [e.event for e in events]


def text_of(events: Sequence[Received], kind: str) -> str:
    return "".join(e.data["text"] for e in events if e.event == kind)


# The event types whose neighbours the relay may merge: the text deltas one network read brought.
TEXT_KINDS = ("reasoning", "content")


def kinds(events: Sequence[Received]) -> list[str]:
    """The event types in order, each run of ``reasoning`` or ``content`` events named once.

    How many events a run of text takes depends on how the network split the
    provider's stream (see :func:`merged`); the order of the kinds does not.
    """
    out: list[str] = []
    for e in events:
        if not (out and e.event == out[-1] and e.event in TEXT_KINDS):
            out.append(e.event)
    return out


def merged(events: Sequence[Received]) -> list[dict[str, Any]]:
    """The events' objects without timings, each run of ``reasoning`` or ``content`` events joined into one.

    What a client makes of a stream, whatever the network's reads were: the
    relay merges neighbouring text deltas of one kind that arrive in one read,
    and never merges other events.
    """
    out: list[dict[str, Any]] = []
    for e in events:
        data = without_timings(e.data)
        if out and e.event in TEXT_KINDS and out[-1]["type"] == e.event:
            out[-1] = {**out[-1], "text": out[-1]["text"] + data["text"]}
        else:
            out.append(data)
    return out


def without_timings(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in ("ttft_ms", "duration_ms")}


ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The test runner's environment without any provider settings, plus ``extra``."""
    prefixes = ("LLM_", "OPENAI_", "DEEPSEEK_", "THINKSTREAM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    return {**env, **extra}


async def start_server(
    *args: str, env: dict[str, str] | None = None, nofile: tuple[int, int] | None = None
) -> tuple[asyncio.subprocess.Process, int, bytes]:
    """Run ``python server.py`` on a free port; return it once it says where it listens.

    Python runs with ResourceWarnings shown, so a test can check that stopping
    it leaves no unclosed session or socket behind. ``nofile`` is the soft and
    hard limit on open files it starts with (``ulimit -Sn``, ``ulimit -Hn``).
    """
    port = free_port()

    def limit_open_files() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "always::ResourceWarning",
        "server.py",
        "--port",
        str(port),
        *args,
        cwd=ROOT,
        env=env if env is not None else clean_env(),
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=limit_open_files,
    )
    assert process.stderr is not None
    log = b""
    async with asyncio.timeout(20):
        while f":{port}/ (Ctrl+C".encode() not in log:
            line = await process.stderr.readline()
            assert line, f"server exited early: {log.decode()}"
            log += line
    return process, port, log


async def stop_server(process: asyncio.subprocess.Process, sig: int = signal.SIGINT) -> tuple[int, bytes]:
    """Signal the server; return its exit status and the rest of its log."""
    assert process.stderr is not None
    process.send_signal(sig)
    async with asyncio.timeout(20):
        rest = await process.stderr.read()
        code = await process.wait()
    return code, rest


class RelayProcess:
    """A real ``python server.py``, its log read as it goes (so that a busy one never blocks on a full pipe)."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, log: bytes) -> None:
        self.process = process
        self.port = port
        self.log = log
        self._drain = asyncio.ensure_future(self._read_log())

    @classmethod
    async def start(cls, *args: str, env: dict[str, str] | None = None) -> RelayProcess:
        return cls(*await start_server(*args, env=env))

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _read_log(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.log += line

    def kill(self) -> None:
        """SIGKILL: the process dies with no chance to tidy up, as on a crash or a lost machine."""
        if self.process.returncode is None:
            self.process.kill()

    async def stop(self, sig: int = signal.SIGINT) -> int:
        """Signal it (unless it is already dead) and wait for its exit status."""
        if self.process.returncode is None:
            self.process.send_signal(sig)
        async with asyncio.timeout(30):
            code = await self.process.wait()
            await self._drain
        return code


async def eventually(condition: Callable[[], bool], what: str, within: float = 5.0) -> None:
    """Wait until ``condition()`` holds, for things the relay does in its own time; fail saying ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.01)


REDIS_SERVER = shutil.which("redis-server") or shutil.which("valkey-server")


class RedisServer:
    """A real ``redis-server`` on a free loopback port, persistence off, that a test may stop and start again."""

    def __init__(self) -> None:
        assert REDIS_SERVER is not None
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert self._process.poll() is None, "redis-server exited at start-up"
            assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
            time.sleep(0.02)

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server's process stopped (SIGSTOP) for the block: what it is sent waits unread, and its replies."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._process.send_signal(signal.SIGCONT)
