"""How a stream leaves the relay: as few socket writes as its events allow, and never one held back.

A write is one of the dearest things the relay does per token, so a stream's
headers go out with its ``meta`` event, the events of one provider read in
one write, and the last event together with the end of the chunked body.
None of this may delay anything: a client that resumes a stream with nothing
new to send still gets its headers at once. And none of it may garble the
stream for a slow client: the keep-alive comments that go out while a write
waits fall between whole events, and never after the body's end.

The writes are counted as the client's kernel saw them: on loopback, with
``TCP_NODELAY`` (aiohttp sets it), each small write is one data segment, and
``TCP_INFO`` counts the data segments a socket received.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest
from aiohttp import web
from helpers import FakeProvider, RelayFactory, Reply, chunk, parse_sse, sse, text_of, types

from handlers.app import create_app
from handlers.config import Config

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="TCP_INFO's data segment count is Linux's")

# Offset of tcpi_data_segs_in in Linux's struct tcp_info (linux/tcp.h, since 4.6).
_DATA_SEGS_IN = 152

FIRST_READ = sse(chunk(content="Hel"))
SECOND_READ = sse(chunk(content="lo"), chunk(finish="stop"), "[DONE]")


def two_reads(pause: float) -> Reply:
    """A provider answer in two network writes ``pause`` seconds apart: a token, then a token and the end."""
    return Reply(body=FIRST_READ + SECOND_READ, chunks=[len(FIRST_READ)], delay=pause)


async def raw_request(
    port: int, path: str, headers: dict[str, str] | None = None, receive_buffer: int | None = None
) -> socket.socket:
    """A raw connection to the relay that has sent ``GET path``."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    lines = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}\r\n".encode())
    return sock


async def read_until(sock: socket.socket, pattern: bytes, within: float) -> bytes:
    """What the connection delivers until ``pattern`` shows up in it."""
    loop = asyncio.get_running_loop()
    received = b""
    async with asyncio.timeout(within):
        while not re.search(pattern, received):
            piece = await loop.sock_recv(sock, 1 << 16)
            assert piece, f"the connection ended before {pattern!r}: {received!r}"
            received += piece
    return received


async def read_slowly(sock: socket.socket, wait: float) -> bytes:
    """Nothing for ``wait`` seconds, then everything until the connection is quiet for a second or ends."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(wait)
    received = b""
    async with asyncio.timeout(30):
        while True:
            try:
                async with asyncio.timeout(1):
                    piece = await loop.sock_recv(sock, 1 << 16)
            except TimeoutError:
                return received
            if not piece:
                return received
            received += piece


async def quiet_stream(port: int) -> tuple[socket.socket, str]:
    """A stream's connection (still open) and id, once its first token has come and its provider has gone quiet."""
    sock = await raw_request(port, "/stream?prompt=hi")
    seen = await read_until(sock, rb'"text":"Hel"', within=5)
    return sock, re.search(rb"id: ([\w-]+):2\n", seen)[1].decode()  # type: ignore[index]


def data_segments_received(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    count = int(struct.unpack_from("I", info, _DATA_SEGS_IN)[0])
    if count == 0:
        pytest.skip("this kernel does not count a socket's data segments")
    return count


def body_of(response: bytes) -> bytes:
    """The payload of a chunked HTTP response, with its end marker checked and nothing after it."""
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    payload, at = b"", 0
    while (size := int(body[at : body.index(b"\r\n", at)], 16)) != 0:
        start = body.index(b"\r\n", at) + 2
        payload += body[start : start + size]
        at = start + size + 2
    assert body[at:] == b"0\r\n\r\n", f"after the body's end: {body[at + 5 : at + 85]!r}"
    return payload


SlowRelay = Callable[..., Awaitable[int]]


@pytest.fixture
async def slow_relay(provider: FakeProvider) -> AsyncIterator[SlowRelay]:
    """``await slow_relay(**settings)``: the port of a relay whose connections have a small send buffer.

    Its writes to a client that is not reading then back up after a few KiB,
    so that they wait on the client (and keep-alive comments fall due meanwhile).
    """
    runners: list[web.AppRunner] = []

    async def make(**settings: object) -> int:
        app = create_app(Config(base_url=provider.base_url, model="test-model", **settings))  # type: ignore[arg-type]
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)  # accepted sockets inherit it
        listener.bind(("127.0.0.1", 0))
        await web.SockSite(runner, listener).start()
        return int(listener.getsockname()[1])

    yield make
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize("fmt", ["sse", "ndjson"])
async def test_a_stream_of_two_provider_reads_reaches_its_client_in_three_writes(
    relay_to: RelayFactory, provider: FakeProvider, fmt: str
) -> None:
    # Headers with meta; the first read's token; the second read's token, done, and the body's end.
    provider.reply = two_reads(pause=1)
    client = await relay_to()
    assert client.server.port is not None
    sock = await raw_request(client.server.port, f"/stream?prompt=hi&format={fmt}", {"Connection": "close"})
    with sock:
        response = await read_until(sock, rb"\r\n0\r\n\r\n$", within=10)
        segments = data_segments_received(sock)

    body = body_of(response)
    if fmt == "sse":
        assert types(parse_sse(body)) == ["meta", "content", "content", "done"]
    else:
        assert [orjson.loads(line)["type"] for line in body.splitlines()] == ["meta", "content", "content", "done"]
    assert segments == 3


@pytest.mark.parametrize("fmt", ["sse", "ndjson"])
async def test_a_client_resuming_a_stream_with_nothing_new_gets_its_headers_at_once(
    relay_to: RelayFactory, provider: FakeProvider, fmt: str
) -> None:
    # The provider falls silent for 5 s after its first token; the resume asks for what follows that token.
    provider.reply = two_reads(pause=5)
    client = await relay_to()
    assert client.server.port is not None
    first, stream_id = await quiet_stream(client.server.port)
    with first:
        second = await raw_request(
            client.server.port, f"/stream/{stream_id}?format={fmt}", {"Last-Event-ID": f"{stream_id}:2"}
        )
        with second:
            head = await read_until(second, rb"\r\n\r\n", within=2)

    assert head.startswith(b"HTTP/1.1 200 ")
    assert (b"text/event-stream" if fmt == "sse" else b"application/x-ndjson") in head


async def test_keep_alive_comments_to_a_slow_client_fall_between_whole_events(
    slow_relay: SlowRelay, provider: FakeProvider
) -> None:
    # One event of 200 KB: its write waits on the client for a second, while comments fall due every 50 ms.
    provider.reply = Reply(body=sse(chunk(content="x" * 200_000), chunk(content="!", finish="stop"), "[DONE]"))
    port = await slow_relay(keepalive=0.05)
    sock = await raw_request(port, "/stream?prompt=hi", receive_buffer=4096)
    with sock:
        body = body_of(await read_slowly(sock, wait=1))

    events = parse_sse(body)
    assert types(events) == ["meta", "content", "done"]
    assert text_of(events, "content") == "x" * 200_000 + "!"
    assert b": ping" in body  # the comments did fall due, between the events


async def test_nothing_follows_the_end_of_the_body_for_a_slow_client(
    slow_relay: SlowRelay, provider: FakeProvider
) -> None:
    # 1,300 events that cannot be merged, so a resume from the start sends a backlog of several writes,
    # the last of which ends the body while earlier ones still wait on the client.
    deltas = [chunk(reasoning=f"r{i:05}") if i % 2 else chunk(content=f"c{i:05}") for i in range(1300)]
    provider.reply = Reply(body=sse(*deltas, chunk(finish="stop"), "[DONE]"))
    port = await slow_relay(keepalive=0.05)
    first = await raw_request(port, "/stream?prompt=hi")
    with first:
        whole = await read_until(first, rb"\r\n0\r\n\r\n$", within=10)
    stream_id = re.search(rb"id: ([\w-]+):1\n", whole)[1].decode()  # type: ignore[index]

    for fmt in ("sse", "ndjson"):
        sock = await raw_request(port, f"/stream/{stream_id}?format={fmt}", receive_buffer=4096)
        with sock:
            body = body_of(await read_slowly(sock, wait=1))
        if fmt == "sse":
            assert parse_sse(body) == parse_sse(body_of(whole))
        else:
            lines = [line for line in body.splitlines() if line]  # empty lines are keep-alives
            assert len(lines) == len(parse_sse(body_of(whole)))
            assert lines[-1].startswith(b'{"type":"done"') and body.endswith(b"}\n")


async def test_a_slow_but_steady_reader_of_one_long_event_is_not_taken_for_a_stalled_one(
    slow_relay: SlowRelay, provider: FakeProvider
) -> None:
    # Every write holds whole events, so this 900 KB event is one write that takes the client about 3 s to read:
    # three stall timeouts. The client takes some of it all along, so the write is not stalled.
    provider.reply = Reply(body=sse(chunk(content="y" * 900_000, finish="stop"), "[DONE]"))
    port = await slow_relay(stall_timeout=1.0)
    loop = asyncio.get_running_loop()
    sock = await raw_request(port, "/stream?prompt=hi", receive_buffer=4096)
    started = loop.time()
    received = b""
    with sock:
        async with asyncio.timeout(30):
            while piece := await loop.sock_recv(sock, 1 << 14):
                received += piece
                if received.endswith(b"\r\n0\r\n\r\n"):
                    break
                # 300 KB a second, never faster.
                await asyncio.sleep(max(0.0, len(received) / 300_000 - (loop.time() - started)))
    took = loop.time() - started

    events = parse_sse(body_of(received))
    assert types(events) == ["meta", "content", "done"]
    assert text_of(events, "content") == "y" * 900_000
    assert took > 2


async def test_clients_that_drop_at_once_leave_no_error_in_the_log(
    relay_to: RelayFactory, provider: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    # New streams, and resumes of a quiet stream (whose headers go out alone), each dropped with a reset at once.
    provider.reply = two_reads(pause=5)
    client = await relay_to()
    port = client.server.port
    assert port is not None
    first, stream_id = await quiet_stream(port)
    with first:
        for path, headers in [
            (f"/stream/{stream_id}", {"Last-Event-ID": f"{stream_id}:2"}),
            (f"/stream/{stream_id}?format=ndjson", {"Last-Event-ID": f"{stream_id}:2"}),
            ("/stream?prompt=hi", {}),
        ]:
            for _ in range(10):
                sock = await raw_request(port, path, headers)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
        await asyncio.sleep(0.5)

    assert not [record for record in caplog.records if record.levelname == "ERROR"], caplog.text
