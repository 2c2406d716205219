"""Load generator, in its own process: N concurrent streams, one JSON report on stdout.

    python -m bench.loadgen --mode relay --url http://127.0.0.1:8080 --streams 100 --pace 0.1

``direct`` posts to the mock provider's ``/v1/chat/completions`` (the physical
limit of this machine); ``relay`` posts ``{"messages": […]}`` to thinkstream's
``/stream``. Both answers are parsed with the relay's own spec-exact
:class:`~handlers.provider.sse_decoder.SSEDecoder`.

Tokens are counted by the stamps in their text (``t<index>@<ns> ``, see
``bench.mock_upstream``), never by events, because the relay may merge deltas
that arrived together into one event. Each stamp gives that token's one-way
delay: the time its chunk was read here minus the time the mock wrote it
(both processes read the same clock).

Everything is bounded: streams start over ``--ramp`` seconds, each stream and
the whole run stop at ``--deadline``, and each read waits at most
``--read-timeout``. Only loopback addresses are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from yarl import URL

from handlers.provider.sse_decoder import SSEDecoder

from ._runtime import is_loopback, raise_nofile_limit, run, uvloop_version

__all__ = ["Plan", "main", "percentile", "run_load"]

_STAMP = re.compile(r"t(\d+)@(\d+) ")
MODES = ("direct", "relay")


@dataclass(frozen=True, slots=True)
class Plan:
    """One load run."""

    mode: str
    url: str
    streams: int
    tokens: int = 40
    reasoning: int = 10
    pace: float = 0.1
    ttft: float = 0.0
    burst: int = 16
    ramp: float = 1.0
    deadline: float = 60.0
    read_timeout: float = 30.0
    connect_timeout: float = 10.0
    # relay mode: start each stream at ``url`` but read it from this relay process (``GET /stream/{id}``).
    follow_url: str | None = None

    @property
    def expected(self) -> int:
        return self.tokens + self.reasoning

    @property
    def prompt(self) -> str:
        return (
            f"bench tokens={self.tokens} reasoning={self.reasoning} pace={self.pace:g} "
            f"ttft={self.ttft:g} burst={self.burst}"
        )


@dataclass(slots=True)
class _Tally:
    """What all streams of a run add up to."""

    ok: int = 0
    incomplete: int = 0
    failed: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    received: int = 0
    unexpected: int = 0
    reads: int = 0
    delays_ns: list[int] = field(default_factory=list)
    ttfts_ns: list[int] = field(default_factory=list)
    last_token_ns: int = 0


class _StreamState:
    """One stream's tokens: which arrived, and the text of a token split across events."""

    __slots__ = ("carry", "first_ns", "seen", "started_ns", "tally")

    def __init__(self, expected: int, started_ns: int, tally: _Tally) -> None:
        self.seen = bytearray(expected)
        self.carry: dict[str, str] = {}
        self.started_ns = started_ns
        self.first_ns = 0
        self.tally = tally

    def text(self, kind: str, text: str, now: int) -> None:
        if self.carry:
            text = self.carry.pop(kind, "") + text
        end = text.rfind(" ") + 1
        if end < len(text):
            self.carry[kind] = text[end:]
        tally, seen = self.tally, self.seen
        delays = tally.delays_ns
        stamps = _STAMP.findall(text, 0, end)
        for index, stamp in stamps:
            i = int(index)
            if i >= len(seen) or seen[i]:
                tally.unexpected += 1
                continue
            seen[i] = 1
            delays.append(now - int(stamp))
            tally.received += 1
        if stamps and not self.first_ns:
            self.first_ns = now
            tally.ttfts_ns.append(now - self.started_ns)
        if now > tally.last_token_ns:
            tally.last_token_ns = now

    @property
    def complete(self) -> bool:
        return all(self.seen)


def _direct_event(state: _StreamState, kind: str, data: str, now: int) -> str | None:
    """An OpenAI chunk; returns ``"done"`` at ``[DONE]`` or an error code."""
    if data == "[DONE]":
        return "done"
    chunk = orjson.loads(data)
    if chunk.get("error") is not None:
        return "error_upstream"
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning_content")
        if reasoning:
            state.text("reasoning", reasoning, now)
        content = delta.get("content")
        if content:
            state.text("content", content, now)
    return None


def _relay_event(state: _StreamState, kind: str, data: str, now: int) -> str | None:
    """A thinkstream contract event; returns ``"done"`` or ``error_<code>`` at the end."""
    if kind == "content" or kind == "reasoning":
        state.text(kind, orjson.loads(data)["text"], now)
    elif kind == "done":
        return "done"
    elif kind == "error":
        return f"error_{orjson.loads(data).get('code', 'unknown')}"
    return None


async def _stream(
    session: aiohttp.ClientSession, plan: Plan, start_at: float, deadline: float, body: bytes, tally: _Tally
) -> None:
    """Run one stream and add its outcome to ``tally``; never raises (except cancellation)."""
    loop = asyncio.get_running_loop()
    handle = _direct_event if plan.mode == "direct" else _relay_event
    path = "/v1/chat/completions" if plan.mode == "direct" else "/stream"
    state = _StreamState(plan.expected, 0, tally)
    responded = False
    end: str | None = None
    reason = "no_terminal_event"
    try:
        await asyncio.sleep(max(0.0, start_at - loop.time()))
        state.started_ns = time.time_ns()
        async with asyncio.timeout_at(deadline):
            reply = await (_elsewhere(session, plan, body) if plan.follow_url else _post(session, plan, path, body))
        async with asyncio.timeout_at(deadline), reply as response:
            if isinstance(response, _Refused):
                reason = f"http_{response.status}{response._code}"
                return
            if response.status != 200 or response.content_type != "text/event-stream":
                reason = f"http_{response.status}{await _error_code(response)}"
                return
            responded = True
            decoder = SSEDecoder()
            async for chunk in response.content.iter_any():
                now = time.time_ns()
                tally.reads += 1
                for event in decoder.feed(chunk):
                    end = handle(state, event.event, event.data, now)
                    if end is not None:
                        break
                if end is not None:
                    break
    except aiohttp.ServerTimeoutError:
        reason = "read_timeout"
    except TimeoutError:
        reason = "deadline"
    except aiohttp.ClientError as exc:
        reason = type(exc).__name__
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # A body that is not what the mode expects (bad JSON, wrong shape).
        reason = f"bad_event_{type(exc).__name__}"
    except asyncio.CancelledError:
        reason = "cancelled"
        raise
    finally:
        _count(tally, state, responded, end, reason)


def _post(
    session: aiohttp.ClientSession, plan: Plan, path: str, body: bytes
) -> Any:  # aiohttp's request context manager
    return session.post(plan.url.rstrip("/") + path, data=body, headers=_HEADERS)


async def _elsewhere(session: aiohttp.ClientSession, plan: Plan, body: bytes) -> Any:
    """Start the stream on ``url``, hang up after its ``meta`` event, and follow it on ``follow_url``."""
    async with session.post(plan.url.rstrip("/") + "/stream", data=body, headers=_HEADERS) as started:
        if started.status != 200:
            return _Refused(started.status, await _error_code(started))
        head = await started.content.readuntil(b"\n\n")
    stream_id = orjson.loads(head.split(b"data: ", 1)[1])["stream"]
    assert plan.follow_url is not None
    return session.get(f"{plan.follow_url.rstrip('/')}/stream/{stream_id}", headers=_HEADERS)


class _Refused:
    """A start refused before there was a stream to follow, shaped as a response the caller checks."""

    content_type = "application/json"

    def __init__(self, status: int, code: str) -> None:
        self.status = status
        self._code = code

    async def __aenter__(self) -> _Refused:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


def _count(tally: _Tally, state: _StreamState, responded: bool, end: str | None, reason: str) -> None:
    """ok: the terminal event and every token once; failed: refused or ended by an error; else incomplete."""
    if end == "done" and state.complete:
        tally.ok += 1
    elif not responded or (end is not None and end != "done"):
        tally.failed += 1
        tally.reasons[end if end is not None else reason] += 1
    else:
        tally.incomplete += 1
        tally.reasons["missing_tokens" if end == "done" else reason] += 1


_HEADERS = {"Accept": "text/event-stream", "Content-Type": "application/json"}


async def _error_code(response: aiohttp.ClientResponse) -> str:
    """``_<code>`` from a JSON error body (the relay's or OpenAI's shape), if there is one."""
    try:
        body = orjson.loads(await response.content.read(64 * 1024))
        error = body.get("error")
        code = error.get("code") or error.get("type") if isinstance(error, dict) else None
    except (aiohttp.ClientError, orjson.JSONDecodeError, AttributeError):
        return ""
    return f"_{code}" if isinstance(code, str) else ""


def _body(plan: Plan) -> bytes:
    messages = [{"role": "user", "content": plan.prompt}]
    if plan.mode == "direct":
        return orjson.dumps(
            {"model": "bench", "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        )
    return orjson.dumps({"messages": messages})


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values (``None`` when there are none)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _summary_ms(values_ns: list[int]) -> dict[str, float | None]:
    values = sorted(values_ns)
    out: dict[str, float | None] = {}
    for name, p in (("p50", 50.0), ("p99", 99.0), ("max", 100.0)):
        value = percentile(values, p)
        out[name] = None if value is None else round(value / 1e6, 3)
    out["mean"] = round(sum(values) / len(values) / 1e6, 3) if values else None
    return out


async def run_load(plan: Plan) -> dict[str, Any]:
    """Run ``plan`` and return its report."""
    loop = asyncio.get_running_loop()
    tally = _Tally()
    body = _body(plan)
    timeout = aiohttp.ClientTimeout(
        total=None, connect=plan.connect_timeout, sock_connect=plan.connect_timeout, sock_read=plan.read_timeout
    )
    # Every stream holds its own connection for its whole life.
    connector = aiohttp.TCPConnector(limit=max(plan.streams, 100), limit_per_host=0, force_close=False)
    cpu_before = _cpu_seconds()
    started = loop.time()
    started_ns = time.time_ns()
    deadline = started + plan.deadline
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [
            asyncio.create_task(_stream(session, plan, started + plan.ramp * i / plan.streams, deadline, body, tally))
            for i in range(plan.streams)
        ]
        # Each stream stops itself at the deadline; this bound only guards against a bug.
        _, late = await asyncio.wait(tasks, timeout=plan.deadline + 5)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=5)
    elapsed = loop.time() - started
    span = (tally.last_token_ns - started_ns) / 1e9 if tally.last_token_ns else 0.0
    expected = plan.streams * plan.expected
    return {
        "mode": plan.mode,
        "url": plan.url,
        "follow_url": plan.follow_url,
        "streams": plan.streams,
        "tokens_per_stream": plan.expected,
        "pace_s": plan.pace,
        "ttft_s": plan.ttft,
        "ramp_s": plan.ramp,
        "ok": tally.ok,
        "incomplete": tally.incomplete,
        "failed": tally.failed,
        "reasons": dict(tally.reasons.most_common()),
        "tokens_expected": expected,
        "tokens_received": tally.received,
        "tokens_lost": expected - tally.received,
        "tokens_unexpected": tally.unexpected,
        # How many tokens each socket read brought: whether the server batches its writes.
        "reads": tally.reads,
        "tokens_per_read": round(tally.received / tally.reads, 2) if tally.reads else None,
        "delay_ms": _summary_ms(tally.delays_ns),
        "ttft_ms": _summary_ms(tally.ttfts_ns),
        "tokens_per_s": round(tally.received / span, 1) if span > 0 else 0.0,
        "elapsed_s": round(elapsed, 3),
        "loadgen_cpu_s": round(_cpu_seconds() - cpu_before, 3),
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not (math.isfinite(value) and value >= 0):
            raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text!r}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mode", choices=MODES, required=True, help="direct: the mock; relay: thinkstream")
    parser.add_argument("--url", required=True, help="base URL on loopback, e.g. http://127.0.0.1:8080")
    parser.add_argument("--streams", type=int, required=True, help="concurrent streams")
    parser.add_argument("--tokens", type=_positive(int), default=40, help="content tokens a stream (default 40)")
    parser.add_argument("--reasoning", type=_positive(int), default=10, help="reasoning tokens first (default 10)")
    parser.add_argument("--pace", type=_positive(float), default=0.1, help="seconds between tokens; 0: unpaced")
    parser.add_argument("--ttft", type=_positive(float), default=0.0, help="mock's seconds before the first token")
    parser.add_argument("--burst", type=int, default=16, help="tokens per mock write when unpaced (default 16)")
    parser.add_argument("--ramp", type=_positive(float), default=1.0, help="seconds over which streams start")
    parser.add_argument("--deadline", type=_positive(float), default=60.0, help="seconds the whole run may take")
    parser.add_argument("--read-timeout", type=_positive(float), default=30.0, help="seconds a read may wait")
    parser.add_argument(
        "--follow-url",
        help="relay mode: read each stream from this other relay process (same Redis) instead of where it started",
    )
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop even with uvloop")
    args = parser.parse_args(argv)
    for name, value in (("--url", args.url), ("--follow-url", args.follow_url)):
        if value is None:
            continue
        url = URL(value)
        if url.scheme != "http" or not url.host or not is_loopback(url.host):
            parser.error(f"{name} must be http:// on a loopback address (127.0.0.1, ::1, localhost), not {value!r}")
    if args.follow_url and args.mode != "relay":
        parser.error("--follow-url goes with --mode relay")
    if not 1 <= args.streams <= 100_000:
        parser.error("--streams must be between 1 and 100000")
    if not 1 <= args.burst <= 4096:
        parser.error("--burst must be between 1 and 4096")
    limit = raise_nofile_limit()
    if limit < args.streams + 100:
        parser.error(f"the open-files limit is {limit}: too low for {args.streams} streams")
    plan = Plan(
        mode=args.mode,
        url=args.url,
        streams=args.streams,
        tokens=args.tokens,
        reasoning=args.reasoning,
        pace=args.pace,
        ttft=args.ttft,
        burst=args.burst,
        ramp=args.ramp,
        deadline=args.deadline,
        read_timeout=args.read_timeout,
        follow_url=args.follow_url,
    )
    use_uvloop = not args.no_uvloop and uvloop_version() is not None
    report = run(run_load(plan), use_uvloop=use_uvloop)
    report["uvloop"] = use_uvloop
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
