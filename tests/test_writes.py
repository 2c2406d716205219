"""How a stream leaves the relay: as few socket writes as its events allow, and never one held back.

A write is one of the dearest things the relay does per token, so a stream's
headers go out with its ``meta`` event, the events of one provider read in
one write, and the last event together with the end of the chunked body.
None of this may delay anything: a client that resumes a stream with nothing
new to send still gets its headers at once.

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

import pytest
from helpers import FakeProvider, RelayFactory, Reply, chunk, parse_sse, sse, types

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="TCP_INFO's data segment count is Linux's")

# Offset of tcpi_data_segs_in in Linux's struct tcp_info (linux/tcp.h, since 4.6).
_DATA_SEGS_IN = 152

FIRST_READ = sse(chunk(content="Hel"))
SECOND_READ = sse(chunk(content="lo"), chunk(finish="stop"), "[DONE]")


def two_reads(pause: float) -> Reply:
    """A provider answer in two network writes ``pause`` seconds apart: a token, then a token and the end."""
    return Reply(body=FIRST_READ + SECOND_READ, chunks=[len(FIRST_READ)], delay=pause)


async def raw_request(port: int, path: str, headers: dict[str, str] | None = None) -> socket.socket:
    """A raw connection to the relay that has sent ``GET path``."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
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


def data_segments_received(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, _DATA_SEGS_IN)[0])


def body_of(response: bytes) -> bytes:
    """The payload of a chunked HTTP response, with its end marker checked."""
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    payload, at = b"", 0
    while (size := int(body[at : body.index(b"\r\n", at)], 16)) != 0:
        start = body.index(b"\r\n", at) + 2
        payload += body[start : start + size]
        at = start + size + 2
    assert body[at:] == b"0\r\n\r\n"
    return payload


@pytest.mark.parametrize("fmt", ["sse", "ndjson"])
async def test_a_stream_of_two_provider_reads_reaches_its_client_in_three_writes(
    relay_to: RelayFactory, provider: FakeProvider, fmt: str
) -> None:
    # Headers with meta; the first read's token; the second read's token, done, and the body's end.
    provider.reply = two_reads(pause=0.3)
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
        assert [re.search(rb'"type":"(\w+)"', line)[1] for line in body.splitlines()] == [  # type: ignore[index]
            b"meta",
            b"content",
            b"content",
            b"done",
        ]
    assert segments == 3


async def test_a_client_resuming_a_stream_with_nothing_new_gets_its_headers_at_once(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    # The provider falls silent for 5 s after its first token; the resume asks for what follows that token.
    provider.reply = two_reads(pause=5)
    client = await relay_to()
    assert client.server.port is not None
    first = await raw_request(client.server.port, "/stream?prompt=hi")
    with first:
        seen = await read_until(first, rb'"text":"Hel"', within=5)
        stream_id = re.search(rb"id: ([\w-]+):2\n", seen)[1].decode()  # type: ignore[index]
        second = await raw_request(client.server.port, f"/stream/{stream_id}", {"Last-Event-ID": f"{stream_id}:2"})
        with second:
            head = await read_until(second, rb"\r\n\r\n", within=2)

    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"text/event-stream" in head
