"""A fast mock OpenAI-compatible provider, in its own process: ``python -m bench.mock_upstream --port N``.

``POST /v1/chat/completions`` (``"stream": true``) streams ``chat.completion.chunk``
events the way DeepSeek's reasoner does: a role chunk, reasoning tokens
(``delta.reasoning_content``), content tokens, a chunk with the finish reason,
a usage chunk with empty ``choices`` (when ``stream_options.include_usage``)
and ``data: [DONE]``.

The relay forwards only messages, model and sampling fields, so a request's
shape rides in its last user message (every setting optional)::

    bench tokens=40 reasoning=10 pace=0.1 ttft=0 burst=16

``tokens`` content and ``reasoning`` tokens; ``pace`` seconds between tokens
(0: as fast as the socket takes them); ``ttft`` seconds before the first one;
``burst`` tokens per write when unpaced, each still its own SSE event, as a
fast real server's socket would carry them.

Each token's text is ``t<index>@<time.time_ns()> `` (index counting reasoning
then content from 0), stamped just before the write, so a client on the same
machine can measure one-way delay and count tokens whatever the relay merged.

It is a stand-in provider whose only job is to cost little CPU, so, unlike
the relay, it hand-formats its HTTP/1.1 and SSE bytes from templates made once
per request, runs on a bare asyncio protocol with timer callbacks instead of
tasks, and understands only what HTTP clients such as aiohttp send
(``Content-Length`` bodies, keep-alive). It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import http
import itertools
import logging
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson

from ._runtime import raise_nofile_limit, run, uvloop_version

__all__ = ["BadShape", "MockUpstream", "Shape", "main", "parse_shape"]

logger = logging.getLogger(__name__)

_HEAD_LIMIT = 64 * 1024
_BODY_LIMIT = 8 * 1024 * 1024
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
# What follows a token's stamp: the space that ends its text, then the rest of the chunk.
_TOKEN_END = b' "},"logprobs":null,"finish_reason":null}]}\n\n'
_DONE = b"data: [DONE]\n\n"
_LAST_CHUNK = b"0\r\n\r\n"

# name: (type, lowest, highest)
_SETTINGS: dict[str, tuple[type, float, float]] = {
    "tokens": (int, 0, 1_000_000),
    "reasoning": (int, 0, 1_000_000),
    "pace": (float, 0.0, 60.0),
    "ttft": (float, 0.0, 600.0),
    "burst": (int, 1, 4096),
}


@dataclass(frozen=True, slots=True)
class Shape:
    """How one response streams."""

    tokens: int = 20
    reasoning: int = 0
    pace: float = 0.0
    ttft: float = 0.0
    burst: int = 16

    @property
    def total(self) -> int:
        return self.reasoning + self.tokens


class BadShape(ValueError):
    """The ``bench …`` line of a prompt has a setting the mock does not understand."""


def parse_shape(prompt: str) -> Shape:
    """``bench tokens=40 pace=0.1 …`` → :class:`Shape`; any other prompt gets the defaults."""
    words = prompt.split()
    if not words or words[0] != "bench":
        return Shape()
    values: dict[str, Any] = {}
    for word in words[1:]:
        name, equals, raw = word.partition("=")
        if not equals or name not in _SETTINGS:
            raise BadShape(f"unknown setting {word!r}: use name=value with names {', '.join(_SETTINGS)}")
        kind, low, high = _SETTINGS[name]
        try:
            value = kind(raw)
        except ValueError:
            raise BadShape(f"{name} must be {'an integer' if kind is int else 'a number'}, not {raw!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise BadShape(f"{name} must be between {low:g} and {high:g}")
        values[name] = value
    return Shape(**values)


class MockUpstream:
    """What the connections of one server share: chunk ids and counters."""

    def __init__(self) -> None:
        self._serial = itertools.count(1)
        self.streams = 0
        self.tokens = 0

    def next_id(self) -> int:
        return next(self._serial)

    def connection(self) -> _Connection:
        return _Connection(self)


class _Connection(asyncio.Protocol):
    """One client connection: requests one after another, keep-alive."""

    def __init__(self, mock: MockUpstream) -> None:
        self.mock = mock
        self.paused = False
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._stream: _Stream | None = None
        self._close_after = False

    @property
    def closed(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._stream is not None:
            self._stream.resume()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._stream is None:
            self._next_request()
        elif len(self._buffer) > _HEAD_LIMIT:
            # A client pipelining megabytes while we stream: not one we serve.
            self._abort()

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def stream_ended(self) -> None:
        self._stream = None
        if self._close_after:
            self._close()
        elif self._buffer:
            self._next_request()

    def _next_request(self) -> None:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > _HEAD_LIMIT:
                self._reply(431, _error("request headers too large"), close=True)
            return
        lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        target, _, version = rest.partition(" ")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._reply(411, _error("send the body with a Content-Length"), close=True)
            return
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            self._reply(400, _error("bad Content-Length"), close=True)
            return
        if not 0 <= length <= _BODY_LIMIT:
            self._reply(413, _error("body too large"), close=True)
            return
        if len(buffer) < end + 4 + length:
            return
        body = bytes(buffer[end + 4 : end + 4 + length])
        del buffer[: end + 4 + length]
        self._close_after = version != "HTTP/1.1" or headers.get("connection", "").lower() == "close"
        self._route(method, target.partition("?")[0], body)

    def _route(self, method: str, path: str, body: bytes) -> None:
        if path == "/v1/chat/completions":
            if method != "POST":
                self._reply(405, _error("use POST"))
            else:
                self._chat(body)
        elif path == "/healthz" and method == "GET":
            self._reply(200, {"status": "ok", "streams": self.mock.streams, "tokens": self.mock.tokens})
        elif path == "/v1/models" and method == "GET":
            self._reply(200, {"object": "list", "data": [{"id": "bench", "object": "model", "owned_by": "bench"}]})
        else:
            self._reply(404, _error(f"no route {method} {path}"))

    def _chat(self, body: bytes) -> None:
        try:
            request = orjson.loads(body)
            prompt = _last_user_text(request["messages"])
            shape = parse_shape(prompt)
        except BadShape as exc:
            self._reply(400, _error(str(exc)))
            return
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self._reply(400, _error("send a JSON body with a 'messages' list that ends with a user message"))
            return
        if request.get("stream") is not True:
            self._reply(400, _error('this mock only streams: send "stream": true'))
            return
        model = request.get("model")
        options = request.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        self.mock.streams += 1
        self._stream = _Stream(
            self,
            shape,
            model=model if isinstance(model, str) else "bench",
            prompt_tokens=max(1, len(prompt) // 4),
            usage=usage,
        )
        self._stream.start()

    def _reply(self, status: int, body: dict[str, Any], *, close: bool = False) -> None:
        payload = orjson.dumps(body)
        close = close or self._close_after
        head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n" % (
            status,
            http.HTTPStatus(status).phrase.encode(),
            len(payload),
            b"Connection: close\r\n" if close else b"",
        )
        self.write(head + payload)
        if close:
            self._close()
        elif self._buffer:
            self._next_request()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class _Stream:
    """One streaming response, driven by loop callbacks (no task per stream)."""

    def __init__(self, connection: _Connection, shape: Shape, *, model: str, prompt_tokens: int, usage: bool) -> None:
        self._connection = connection
        self._shape = shape
        self._loop = asyncio.get_running_loop()
        self._next = 0
        self._start = 0.0
        self._handle: asyncio.Handle | None = None
        self._waiting = False
        self._pending = _STREAM_HEAD
        chunk_id = connection.mock.next_id()
        created = int(time.time())
        # Everything up to the delta's fields; tokens only fill in their stamp.
        head = b'data: {"id":"chatcmpl-bench-%d","object":"chat.completion.chunk","created":%d,"model":%s,' % (
            chunk_id,
            created,
            orjson.dumps(model),
        )
        delta = head + b'"choices":[{"index":0,"delta":{'
        self._reasoning = delta + b'"reasoning_content":"t'
        self._content = delta + b'"content":"t'
        self._role = delta + b'"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
        tail = [delta + b'},"logprobs":null,"finish_reason":"stop"}]}\n\n']
        if usage:
            counts = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": shape.total,
                "total_tokens": prompt_tokens + shape.total,
                "completion_tokens_details": {"reasoning_tokens": shape.reasoning},
            }
            tail.append(head + b'"choices":[],"usage":' + orjson.dumps(counts) + b"}\n\n")
        tail.append(_DONE)
        self._tail = b"".join(tail)

    def start(self) -> None:
        self._start = self._loop.time() + self._shape.ttft
        if self._shape.ttft > 0:
            # The headers now, as a provider does once it accepts the request.
            self._connection.write(self._pending)
            self._pending = b""
            self._handle = self._loop.call_at(self._start, self._send)
        else:
            self._send()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def resume(self) -> None:
        if self._waiting:
            self._waiting = False
            self._handle = self._loop.call_soon(self._send)

    def _send(self) -> None:
        self._handle = None
        connection = self._connection
        if connection.closed:
            return
        if connection.paused:
            self._waiting = True
            return
        shape = self._shape
        first, total = self._next, shape.total
        last = min(total, first + (1 if shape.pace > 0 else shape.burst))
        stamp = time.time_ns()
        parts = [self._role] if first == 0 else []
        reasoning, content, split = self._reasoning, self._content, shape.reasoning
        parts += [
            b"%s%d@%d%s" % (reasoning if i < split else content, i, stamp, _TOKEN_END) for i in range(first, last)
        ]
        finished = last == total
        if finished:
            parts.append(self._tail)
        payload = b"".join(parts)
        frame = b"%s%x\r\n%s\r\n%s" % (self._pending, len(payload), payload, _LAST_CHUNK if finished else b"")
        self._pending = b""
        self._next = last
        connection.mock.tokens += last - first
        connection.write(frame)
        if finished:
            connection.stream_ended()
        elif shape.pace > 0:
            self._handle = self._loop.call_at(self._start + last * shape.pace, self._send)
        else:
            # Yield between bursts so that every stream gets its turn, as on a busy real server.
            self._handle = self._loop.call_soon(self._send)


def _last_user_text(messages: Any) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            raise ValueError("the last user message has no text")
    raise ValueError("no user message")


def _error(message: str) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": "invalid_request_error"}}


async def serve(port: int) -> None:
    """Listen on 127.0.0.1:``port`` (0: any free port) until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    mock = MockUpstream()
    server = await loop.create_server(mock.connection, "127.0.0.1", port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # The runner reads this line to learn the port.
    print(f"mock upstream listening on http://127.0.0.1:{bound}/v1", flush=True)
    async with server:
        await stop.wait()
    logger.info("stopped after %d streams, %d tokens", mock.streams, mock.tokens)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port, printed)")
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop even with uvloop")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    raise_nofile_limit()
    logger.info("event loop: %s", "asyncio" if args.no_uvloop or uvloop_version() is None else "uvloop")
    run(serve(args.port), use_uvloop=not args.no_uvloop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
