"""Operating a relay: the provider's key stays secret, ``/metrics`` counts, each stream logs one line, probes answer.

The key tests run many scenarios against a relay that holds a canary key and
scan everything the run produced that a client or an operator can read (every
status line, header and body, every log record of every logger at DEBUG) for
it. The metrics tests parse the Prometheus exposition with prometheus-client's
own parser. The start-up warning is read from a real ``server.py`` process.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import ClientResponse, HttpVersion11, web
from aiohttp.pytest_plugin import AiohttpServer
from aiohttp.test_utils import TestClient
from helpers import (
    ROOT,
    FakeProvider,
    RelayFactory,
    Reply,
    clean_env,
    collect,
    free_port,
    parse_sse,
    start_server,
    stop_server,
    text_of,
    transcript,
    types,
)
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from handlers.app import create_app
from handlers.config import Config
from handlers.errors import excerpt, redact
from handlers.keys import streams_key
from handlers.provider.upstream import Upstream

Client = TestClient[web.Request, web.Application]

# Generous bound on any one wait; a healthy run takes a fraction of a second.
PATIENCE = 10


def sse(*data: Any, event: str | None = None) -> bytes:
    """A provider stream: each item is one event (objects as JSON, strings as they are)."""
    head = f"event: {event}\n".encode() if event else b""
    return b"".join(head + b"data: " + (d.encode() if isinstance(d, str) else orjson.dumps(d)) + b"\n\n" for d in data)


def chunk(content: str) -> dict[str, Any]:
    """One OpenAI-style ``chat.completion.chunk`` with some answer text."""
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]}


def openai_error(message: str, type_: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": None}}


def slowly(body: bytes) -> Reply:
    """``body`` in small writes far apart, so the stream is still running when a test acts on it."""
    return Reply(body, chunks=(64,) * (len(body) // 64), delay=0.05)


async def first_event(response: ClientResponse) -> tuple[dict[str, Any], bytes]:
    """Read an open SSE stream up to its first event; that event, and the bytes read."""
    read = b""
    async with asyncio.timeout(PATIENCE):
        async for line in response.content:
            read += line
            if line.startswith(b"data:"):
                return orjson.loads(line.removeprefix(b"data:")), read
    raise AssertionError(f"the stream ended without an event: {read!r}")


def ask(prompt: str) -> dict[str, Any]:
    """A ``POST /stream`` body with one user message (a POST keeps the prompt out of any URL)."""
    return {"messages": [{"role": "user", "content": prompt}]}


# The provider's key is sent to the provider and shown nowhere else.


@pytest.fixture(
    params=[
        pytest.param("sk-canary-", id="an sk- key"),
        # Keys of other shapes get no help from the pattern that catches sk-… keys.
        pytest.param("tk_canary_", id="a key of another shape"),
    ]
)
def key(request: pytest.FixtureRequest) -> str:
    """The provider key of the relay under test: a canary no output may contain."""
    return str(request.param) + secrets.token_hex(16)


def masked(key: str) -> str:
    """The key as OpenAI echoes it in an error: prefix, stars, last four characters."""
    return key[:10] + "****" + key[-4:]


def runs_of(key: str) -> list[str]:
    """Every run of ten characters of the key: none may show, however the key was cut or masked."""
    return [key[start : start + 10] for start in range(len(key) - 9)]


class Seen:
    """Everything a test made readable: each response (status line, headers, body) and each log record."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self._caplog = caplog
        self._responses: list[str] = []

    async def fetch(self, client: Client, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
        """Make a request, keep all of its answer, and return its status and body."""
        async with client.request(method, path, **kwargs) as response:
            body = await response.read()
        self.record(response, body)
        return response.status, body

    def record(self, response: ClientResponse, body: bytes) -> None:
        version = response.version or HttpVersion11
        status_line = f"HTTP/{version.major}.{version.minor} {response.status} {response.reason}"
        headers = [f"{name.decode('latin-1')}: {value.decode('latin-1')}" for name, value in response.raw_headers]
        self._responses.append("\r\n".join([status_line, *headers, "", body.decode("utf-8", "replace")]))

    @property
    def responses(self) -> int:
        return len(self._responses)

    def text(self) -> str:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        # vars() as well: arguments and ``extra`` fields a handler may serialise though the message does not show them.
        logs = [formatter.format(record) + " " + repr(vars(record)) for record in self._caplog.records]
        return "\n".join([*self._responses, *logs])

    def assert_never_shows(self, key: str) -> None:
        text = self.text()
        for secret in (key, key[-8:], masked(key), *runs_of(key)):
            assert secret not in text, f"{secret!r} leaked:\n{_around(text, secret)}"


def _around(text: str, secret: str) -> str:
    at = text.index(secret)
    return text[max(0, at - 300) : at + len(secret) + 100]


@pytest.fixture
def seen(caplog: pytest.LogCaptureFixture) -> Seen:
    """A :class:`Seen` with every logger recording at DEBUG."""
    caplog.set_level(logging.DEBUG)
    for name in list(logging.root.manager.loggerDict):
        caplog.set_level(logging.DEBUG, logger=name)
    return Seen(caplog)


Scenario = Callable[[RelayFactory, FakeProvider, str, Seen], Awaitable[None]]


async def stream_over_sse(relay_to: RelayFactory, provider: FakeProvider, key: str, seen: Seen) -> None:
    provider.reply = Reply(transcript("openai_content.sse"))
    client = await relay_to(api_key=key)
    _, body = await seen.fetch(client, "GET", "/stream", params={"prompt": "hi"})
    assert types(parse_sse(body))[-1] == "done"


async def stream_over_ndjson(relay_to: RelayFactory, provider: FakeProvider, key: str, seen: Seen) -> None:
    provider.reply = Reply(transcript("deepseek_reasoner.sse"))
    client = await relay_to(api_key=key)
    _, body = await seen.fetch(client, "POST", "/stream", json=ask("hi"), headers={"Accept": "application/x-ndjson"})
    assert orjson.loads(body.splitlines()[-1])["type"] == "done"


def provider_fails(reply: Callable[[str], Reply], code: str) -> Scenario:
    """The provider answers ``reply(key)``; the stream ends with an ``error`` event of ``code``."""

    async def scenario(relay_to: RelayFactory, provider: FakeProvider, key: str, seen: Seen) -> None:
        provider.reply = reply(key)
        client = await relay_to(api_key=key)
        _, body = await seen.fetch(client, "GET", "/stream", params={"prompt": "hi"})
        events = parse_sse(body)
        assert events[-1].event == "error"
        assert events[-1].data["code"] == code

    return scenario


async def provider_unreachable(relay_to: RelayFactory, provider: FakeProvider, key: str, seen: Seen) -> None:
    client = await relay_to(api_key=key, base_url=f"http://127.0.0.1:{free_port()}/v1")
    _, body = await seen.fetch(client, "GET", "/stream", params={"prompt": "hi"})
    assert parse_sse(body)[-1].data["code"] == "upstream_unreachable"


async def page_and_probes(relay_to: RelayFactory, provider: FakeProvider, key: str, seen: Seen) -> None:
    provider.reply = Reply(transcript("openai_content.sse"))
    # The fake provider has no GET /models, so the readiness check gets a 404 from it and answers 503.
    client = await relay_to(api_key=key, ready_check=True)
    await seen.fetch(client, "GET", "/stream", params={"prompt": "hi"})
    status, page = await seen.fetch(client, "GET", "/")
    assets = re.findall(r'(?:src|href)="(static/[^"]+)"', page.decode())
    assert status == 200 and any(asset.endswith(".js") for asset in assets)
    statuses = {}
    for path in (*(f"/{asset}" for asset in assets), "/models", "/metrics", "/healthz", "/readyz", "/no-such-route"):
        statuses[path], _ = await seen.fetch(client, "GET", path)
    assert statuses == {
        **{f"/{asset}": 200 for asset in assets},
        "/models": 200,
        "/metrics": 200,
        "/healthz": 200,
        "/readyz": 503,
        "/no-such-route": 404,
    }


async def resume_and_cancel(relay_to: RelayFactory, provider: FakeProvider, key: str, seen: Seen) -> None:
    provider.reply = slowly(transcript("deepseek_reasoner.sse"))
    client = await relay_to(api_key=key)
    async with client.post("/stream", json=ask("hi")) as response:
        meta, read = await first_event(response)
        stream_id = meta["stream"]
        status, _ = await seen.fetch(client, "POST", f"/stream/{stream_id}/cancel")
        assert status == 200
        seen.record(response, read + await response.read())
    _, body = await seen.fetch(client, "GET", f"/stream/{stream_id}", headers={"Last-Event-ID": f"{stream_id}:1"})
    assert parse_sse(body)[-1].data["code"] == "cancelled"
    status, _ = await seen.fetch(client, "DELETE", f"/stream/{stream_id}")
    assert status == 200


SCENARIOS: dict[str, Scenario] = {
    "a stream over SSE": stream_over_sse,
    "a stream over NDJSON": stream_over_ndjson,
    "a 401 whose message echoes the key": provider_fails(
        lambda key: Reply.error(401, openai_error(f"Incorrect API key provided: {key}. Find yours at example.com.")),
        "upstream_auth",
    ),
    "a 401 whose message echoes the key masked": provider_fails(
        lambda key: Reply.error(401, openai_error(f"Incorrect API key provided: {masked(key)}.")), "upstream_auth"
    ),
    "a 500 whose page echoes the key": provider_fails(
        lambda key: Reply(f"<h1>Internal error</h1><p>request by {key}</p>".encode(), 500, "text/html"),
        "upstream_unavailable",
    ),
    "a 200 that is no event stream and echoes the key": provider_fails(
        lambda key: Reply(f"<p>Welcome, {key}</p>".encode(), 200, "text/html"), "upstream_protocol"
    ),
    "an error object in the stream that echoes the key": provider_fails(
        lambda key: Reply(sse(chunk("Hel"), openai_error(f"key {key} is over quota", "server_error"))),
        "upstream_error",
    ),
    "an error event in the stream that echoes the key": provider_fails(
        lambda key: Reply(sse(chunk("Hel")) + sse(f"invalid key {key}", event="error")), "upstream_error"
    ),
    # The relay cuts provider messages short (to 200, 500 or 2,000 characters): a key the cut splits must still go.
    "a 401 whose long message has the key where the relay cuts it": provider_fails(
        lambda key: Reply.error(401, openai_error("x" * 1980 + f"{key} is not a valid key")), "upstream_auth"
    ),
    "a 500 whose long page has the key where the relay cuts it": provider_fails(
        lambda key: Reply(("y" * 480 + f"{key} made this request").encode(), 500, "text/html"),
        "upstream_unavailable",
    ),
    "an error event whose long text has the key where the relay cuts it": provider_fails(
        lambda key: Reply(sse(chunk("Hel")) + sse("z" * 480 + f"{key} is over quota", event="error")),
        "upstream_error",
    ),
    "an error object in the stream whose long message has the key where the relay cuts it": provider_fails(
        lambda key: Reply(sse(chunk("Hel"), openai_error("x" * 1980 + f"{key} is over quota", "server_error"))),
        "upstream_error",
    ),
    "a line that is not JSON with the key where the relay cuts it": provider_fails(
        lambda key: Reply(sse(chunk("Hel"), "{" + "w" * 180 + key)), "upstream_bad_json"
    ),
    "a 401 that shows the end of the key": provider_fails(
        lambda key: Reply.error(401, openai_error(f"The key ending in {key[-20:]} was revoked.")), "upstream_auth"
    ),
    "a provider that redirects forever": provider_fails(
        lambda key: Reply(status=307, headers={"Location": "/v1/chat/completions"}), "upstream_error"
    ),
    "an unreachable provider": provider_unreachable,
    "the page and its assets, models, metrics, probes and a 404": page_and_probes,
    "a cancel and a resume": resume_and_cancel,
}


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
async def test_the_key_appears_in_no_response_and_no_log_record(
    scenario: Scenario, relay_to: RelayFactory, provider: FakeProvider, key: str, seen: Seen
) -> None:
    await scenario(relay_to, provider, key, seen)

    assert seen.responses > 0
    seen.assert_never_shows(key)


CANARY = "tk_canary_0123456789abcdefABCDEF0123456789abcdef"
# Text, or the slice of the key between two offsets.
_PIECES = st.lists(st.one_of(st.text(max_size=12), st.tuples(st.integers(0, 48), st.integers(0, 48))), max_size=8)


@given(pieces=_PIECES, limit=st.integers(0, 200))
def test_no_run_of_ten_characters_of_the_key_survives_redaction_or_a_cut(
    pieces: list[str | tuple[int, int]], limit: int
) -> None:
    text = "".join(piece if isinstance(piece, str) else CANARY[piece[0] : piece[1]] for piece in pieces)

    for shown in (redact(text, CANARY), excerpt(text, limit, CANARY)):
        assert not [run for run in runs_of(CANARY) if run in shown], shown


def test_redaction_keeps_the_text_around_the_key() -> None:
    assert redact(f"key {CANARY[:12]}, then {CANARY[20:]}{CANARY} end", CANARY) == "key [redacted], then [redacted] end"


async def test_the_provider_receives_the_key_as_a_bearer_token(
    relay_to: RelayFactory, provider: FakeProvider, key: str
) -> None:
    provider.reply = Reply(transcript("openai_content.sse"))
    client = await relay_to(api_key=key)

    await collect(client, params={"prompt": "hi"})

    assert provider.headers[0]["Authorization"] == f"Bearer {key}"


async def test_a_redirect_to_another_origin_does_not_carry_the_key(
    relay: RelayFactory, aiohttp_server: AiohttpServer, key: str
) -> None:
    elsewhere_saw: list[str | None] = []

    async def elsewhere(request: web.Request) -> web.Response:
        elsewhere_saw.append(request.headers.get("Authorization"))
        return web.Response(body=transcript("openai_content.sse"), content_type="text/event-stream")

    other = web.Application()
    other.router.add_post("/v1/chat/completions", elsewhere)
    other_url = (await aiohttp_server(other)).make_url("/v1/chat/completions")

    async def redirects(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(other_url)

    provider = web.Application()
    provider.router.add_post("/v1/chat/completions", redirects)
    client = await relay(base_url=str((await aiohttp_server(provider)).make_url("/v1")), model="m", api_key=key)

    await collect(client, params={"prompt": "hi"})

    assert len(elsewhere_saw) == 1, "the redirect was followed"
    assert elsewhere_saw == [None]


def test_the_configuration_repr_shows_neither_the_key_nor_the_access_tokens(key: str) -> None:
    token = "tok-" + secrets.token_hex(8)
    config = Config(base_url="https://api.example.com/v1", model="m", api_key=key, tokens=(token,))

    for text in (repr(config), str(config), repr(Upstream(config.base_url or "", key))):
        assert key not in text
        assert token not in text
    assert "api.example.com" in repr(config), "the repr still shows the other settings"


async def test_server_help_does_not_show_a_key_from_the_environment(key: str) -> None:
    env = clean_env(LLM_BASE_URL="https://api.example.com/v1", LLM_API_KEY=key, LLM_MODEL="m")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "server.py",
        "--help",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(PATIENCE):
        out, err = await process.communicate()

    assert process.returncode == 0
    assert b"LLM_API_KEY" in out
    assert key.encode() not in out + err
    assert key[-8:].encode() not in out + err


async def test_server_py_logs_the_key_nowhere_even_at_debug(provider: FakeProvider, key: str) -> None:
    provider.reply = Reply.error(401, openai_error(f"Incorrect API key provided: {key}."))
    env = clean_env(LLM_BASE_URL=provider.base_url, LLM_API_KEY=key, LLM_MODEL="m", THINKSTREAM_LOG_LEVEL="DEBUG")
    process, port, log = await start_server("--ready-check", "true", env=env)
    assert process.stderr is not None
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/stream", params={"prompt": "hi"}) as response:
                events = parse_sse(await response.read())
            async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                await response.read()
    finally:
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(PATIENCE):
            log += await process.stderr.read()
            await process.wait()

    assert events[-1].data["code"] == "upstream_auth"
    assert provider.headers[0]["Authorization"] == f"Bearer {key}"
    assert b"stream ended" in log
    assert key.encode() not in log
    assert key[-8:].encode() not in log


# /metrics: Prometheus text, changing as streams run and end.


class Scrape:
    """One ``/metrics`` answer, parsed by prometheus-client: sample values by name and labels."""

    def __init__(self, exposition: str) -> None:
        self._samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(exposition)
            for sample in family.samples
        }

    def __call__(self, name: str, **labels: str) -> float | None:
        """The value of ``name`` with exactly these labels; None when there is no such sample."""
        return self._samples.get((name, frozenset(labels.items())))

    def labelled(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        """Every sample of ``name``, by its labels."""
        return {labels: value for (sample, labels), value in self._samples.items() if sample == name}


async def scrape(client: Client, **kwargs: Any) -> Scrape:
    async with client.get("/metrics", **kwargs) as response:
        assert response.status == 200
        return Scrape(await response.text())


async def test_metrics_are_in_prometheus_text_format(relay: RelayFactory) -> None:
    client = await relay()

    async with client.get("/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        exposition = await response.text()

    assert "# TYPE thinkstream_active_streams gauge" in exposition
    assert Scrape(exposition)("thinkstream_active_streams") == 0


async def test_before_any_stream_no_stream_is_counted_or_active(relay: RelayFactory) -> None:
    client = await relay()

    metrics = await scrape(client)

    assert metrics("thinkstream_active_streams") == 0
    assert metrics("thinkstream_active_readers") == 0
    assert metrics.labelled("thinkstream_streams_total") == {}
    assert metrics.labelled("thinkstream_events_total") == {}
    assert metrics("thinkstream_stream_duration_seconds_count") == 0


async def test_a_running_stream_and_its_reader_are_active_until_it_ends(relay: RelayFactory) -> None:
    client = await relay(demo_delay=0.005, demo_tokens=5)

    async with client.get("/stream", params={"prompt": "hi"}) as response:
        await first_event(response)
        during = await scrape(client)
        await response.read()
    after = await scrape(client)

    assert (during("thinkstream_active_streams"), during("thinkstream_active_readers")) == (1, 1)
    assert during.labelled("thinkstream_streams_total") == {}
    assert (after("thinkstream_active_streams"), after("thinkstream_active_readers")) == (0, 0)


async def test_a_finished_stream_is_counted_as_done_with_its_timings(relay: RelayFactory) -> None:
    client = await relay()

    await collect(client, params={"prompt": "hi"})
    metrics = await scrape(client)

    assert metrics.labelled("thinkstream_streams_total") == {frozenset({("outcome", "done")}): 1}
    assert metrics("thinkstream_time_to_first_token_seconds_count") == 1
    assert metrics("thinkstream_stream_duration_seconds_count") == 1


async def test_the_events_relayed_are_counted_by_type(relay: RelayFactory) -> None:
    # Paced, so that tokens arrive in separate reads and are relayed as separate events (tokens that arrive
    # together are merged into one): the count is of the events relayed, not one per stream.
    client = await relay(demo_delay=0.005, demo_tokens=5)

    events = await collect(client, params={"prompt": "hi"})
    metrics = await scrape(client)

    assert types(events).count("content") > 1
    for kind in ("reasoning", "content", "done"):
        assert metrics("thinkstream_events_total", type=kind) == types(events).count(kind), kind


async def test_the_meta_event_that_opens_every_stream_is_counted_too(relay: RelayFactory) -> None:
    client = await relay()

    events = await collect(client, params={"prompt": "hi"})
    metrics = await scrape(client)

    assert types(events)[0] == "meta"
    assert metrics("thinkstream_events_total", type="meta") == 1
    assert sum(metrics.labelled("thinkstream_events_total").values()) == len(events)


async def test_the_tokens_the_provider_reported_are_counted_by_kind(relay: RelayFactory) -> None:
    client = await relay()

    events = await collect(client, params={"prompt": "hi"})
    usage = events[-1].data["usage"]
    metrics = await scrape(client)

    assert metrics("thinkstream_tokens_total", kind="prompt", provider="demo") == usage["prompt_tokens"]
    assert metrics("thinkstream_tokens_total", kind="completion", provider="demo") == usage["completion_tokens"]
    assert metrics("thinkstream_tokens_total", kind="reasoning", provider="demo") == usage["reasoning_tokens"]


async def test_a_provider_429_is_counted_as_an_upstream_error_and_an_outcome(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = Reply.error(429, openai_error("Rate limit reached", "requests"))
    client = await relay_to()

    events = await collect(client, params={"prompt": "hi"})
    metrics = await scrape(client)

    assert types(events) == ["meta", "error"]
    assert metrics.labelled("thinkstream_upstream_errors_total") == {
        frozenset({("status", "429"), ("provider", "127.0.0.1")}): 1
    }
    assert metrics.labelled("thinkstream_streams_total") == {frozenset({("outcome", "upstream_rate_limited")}): 1}
    assert metrics("thinkstream_events_total", type="error") == 1


async def test_an_unreachable_provider_is_counted_as_an_upstream_error_without_status(relay: RelayFactory) -> None:
    client = await relay(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m")

    await collect(client, params={"prompt": "hi"})
    metrics = await scrape(client)

    assert metrics.labelled("thinkstream_upstream_errors_total") == {
        frozenset({("status", "none"), ("provider", "127.0.0.1")}): 1
    }
    assert metrics("thinkstream_streams_total", outcome="upstream_unreachable") == 1


async def test_a_resume_is_counted(relay: RelayFactory) -> None:
    client = await relay()
    events = await collect(client, params={"prompt": "hi"})
    before = await scrape(client)

    await collect(client, path=f"/stream/{events[0].data['stream']}", headers={"Last-Event-ID": events[1].id})
    after = await scrape(client)

    assert (before("thinkstream_resumes_total"), after("thinkstream_resumes_total")) == (0, 1)


async def test_a_cancelled_stream_is_counted_as_cancelled(relay: RelayFactory) -> None:
    client = await relay(demo_delay=0.05)

    async with client.get("/stream", params={"prompt": "hi"}) as response:
        meta, _ = await first_event(response)
        async with client.post(f"/stream/{meta['stream']}/cancel") as cancel:
            assert (await cancel.json())["cancelled"] is True
        await response.read()
    metrics = await scrape(client)

    assert metrics.labelled("thinkstream_streams_total") == {frozenset({("outcome", "cancelled")}): 1}
    assert metrics.labelled("thinkstream_upstream_errors_total") == {}, "a cancel is not the provider's failure"
    assert metrics("thinkstream_active_streams") == 0


@dataclass(frozen=True)
class Refusal:
    """A request the relay refuses before any stream starts, and the reason it counts."""

    reason: str
    method: str = "GET"
    request: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


REFUSALS = {
    "a body that is not JSON": Refusal(
        "invalid_json", "POST", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}
    ),
    "no prompt": Refusal("missing_prompt"),
    "no access token": Refusal("unauthorized", request={"params": {"prompt": "hi"}}, settings={"tokens": ("tok-1",)}),
}


@pytest.mark.parametrize("refusal", REFUSALS.values(), ids=REFUSALS.keys())
async def test_a_refused_request_is_counted_by_its_reason(relay: RelayFactory, refusal: Refusal) -> None:
    client = await relay(**refusal.settings)

    async with client.request(refusal.method, "/stream", **refusal.request) as response:
        assert response.status in (400, 401)
        code = (await response.json())["error"]["code"]
    metrics = await scrape(client, headers={"Authorization": "Bearer tok-1"})

    assert code == refusal.reason
    assert metrics.labelled("thinkstream_rejections_total") == {frozenset({("reason", refusal.reason)}): 1}
    assert metrics.labelled("thinkstream_streams_total") == {}


async def test_two_apps_in_one_process_keep_separate_counts(relay: RelayFactory) -> None:
    first, second = await relay(), await relay()

    await collect(first, params={"prompt": "one"})
    await collect(first, params={"prompt": "two"})
    await collect(second, params={"prompt": "three"})

    assert (await scrape(first))("thinkstream_streams_total", outcome="done") == 2
    assert (await scrape(second))("thinkstream_streams_total", outcome="done") == 1


# The per-stream log line.


LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def logfmt(line: str) -> dict[str, str | None]:
    """``name=value`` pairs; quoted values are JSON strings, ``-`` means none."""
    fields: dict[str, str | None] = {}
    for name, raw in LOGFMT.findall(line):
        value = orjson.loads(raw) if raw.startswith('"') else raw
        fields[name] = None if value == "-" else value
    return fields


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def stream_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, str | None]]:
    """The fields of each "stream ended" line, in order."""
    records = [
        r
        for r in caplog.records
        if r.name == "handlers.streams.generation" and r.getMessage().startswith("stream ended")
    ]
    return [logfmt(r.getMessage().removeprefix("stream ended")) for r in records]


def everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{record.getMessage()} {vars(record)!r}" for record in caplog.records)


PROMPT = "Which quokka guards the zebra-7f3a vault?"

ENDINGS = {
    "done": (Reply(transcript("deepseek_reasoner.sse")), "done"),
    "refused by the provider": (Reply.error(429, openai_error("slow down", "requests")), "upstream_rate_limited"),
    "broken off": (Reply(sse(chunk("half an answer"))), "upstream_incomplete"),
}


@pytest.mark.parametrize("ending", ENDINGS, ids=ENDINGS.keys())
async def test_each_stream_ends_with_exactly_one_log_line_naming_its_outcome(
    relay_to: RelayFactory, provider: FakeProvider, logs: pytest.LogCaptureFixture, ending: str
) -> None:
    provider.reply, outcome = ENDINGS[ending]
    client = await relay_to()

    events = await collect(client, "POST", json=ask(PROMPT))
    lines = stream_lines(logs)

    assert len(lines) == 1
    assert lines[0]["stream"] == events[0].data["stream"]
    assert lines[0]["outcome"] == outcome


async def test_a_cancelled_stream_ends_with_one_log_line_naming_the_cancel(
    relay_to: RelayFactory, provider: FakeProvider, logs: pytest.LogCaptureFixture
) -> None:
    provider.reply = slowly(transcript("deepseek_reasoner.sse"))
    client = await relay_to()

    async with client.post("/stream", json=ask(PROMPT)) as response:
        meta, _ = await first_event(response)
        async with client.post(f"/stream/{meta['stream']}/cancel") as cancel:
            assert cancel.status == 200
        await response.read()

    assert [(line["stream"], line["outcome"]) for line in stream_lines(logs)] == [(meta["stream"], "cancelled")]


async def test_the_log_line_names_the_stream_model_client_and_the_done_events_usage(
    relay_to: RelayFactory, provider: FakeProvider, logs: pytest.LogCaptureFixture
) -> None:
    provider.reply = Reply(transcript("deepseek_reasoner.sse"))
    client = await relay_to()

    events = await collect(client, "POST", json=ask(PROMPT))
    [line] = stream_lines(logs)
    done = events[-1].data

    assert {name: line[name] for name in ("stream", "model", "provider", "client", "outcome")} == {
        "stream": events[0].data["stream"],
        "model": "test-model",
        "provider": "127.0.0.1",  # the single-provider shorthand is named after its host
        "client": "127.0.0.1",
        "outcome": "done",
    }
    usage = done["usage"]
    assert (line["prompt_tokens"], line["completion_tokens"], line["reasoning_tokens"]) == (
        str(usage["prompt_tokens"]),
        str(usage["completion_tokens"]),
        str(usage["reasoning_tokens"]),
    )
    assert float(line["ttft_ms"] or "nan") == done["ttft_ms"]
    # Measured a moment after the done event's own duration, and in whole milliseconds.
    assert int(line["duration_ms"] or "-1") >= done["duration_ms"] - 1


async def test_a_stream_that_fails_before_any_token_logs_dashes_for_ttft_and_usage(
    relay_to: RelayFactory, provider: FakeProvider, logs: pytest.LogCaptureFixture
) -> None:
    provider.reply = Reply.error(429, openai_error("slow down", "requests"))
    client = await relay_to()

    await collect(client, "POST", json=ask(PROMPT))
    [line] = stream_lines(logs)

    assert line["ttft_ms"] is None
    assert (line["prompt_tokens"], line["completion_tokens"], line["reasoning_tokens"]) == (None, None, None)
    assert line["duration_ms"] is not None and line["duration_ms"].isdigit()


async def test_with_tokens_the_client_is_a_fingerprint_never_the_token(
    relay_to: RelayFactory, provider: FakeProvider, logs: pytest.LogCaptureFixture
) -> None:
    token = "tok-" + secrets.token_hex(12)
    provider.reply = Reply(transcript("openai_content.sse"))
    client = await relay_to(tokens=(token,))

    await collect(client, "POST", json=ask(PROMPT), headers={"Authorization": f"Bearer {token}"})
    [line] = stream_lines(logs)

    assert re.fullmatch(r"token:[0-9a-f]{12}", line["client"] or ""), line["client"]
    assert token not in everything_logged(logs)


async def test_prompts_and_answers_are_not_logged_by_default(
    relay_to: RelayFactory, provider: FakeProvider, logs: pytest.LogCaptureFixture
) -> None:
    provider.reply = Reply(transcript("openai_content.sse"))
    client = await relay_to()

    events = await collect(client, "POST", json=ask(PROMPT))
    answer = text_of(events, "content")
    logged = everything_logged(logs)

    assert stream_lines(logs), "the stream did log its line"
    assert PROMPT not in logged
    assert "zebra-7f3a" not in logged
    assert answer not in logged


async def test_with_log_content_the_prompt_and_answer_are_in_the_log_line(
    relay_to: RelayFactory, provider: FakeProvider, logs: pytest.LogCaptureFixture
) -> None:
    provider.reply = Reply(transcript("openai_content.sse"))
    client = await relay_to(log_content=True)

    events = await collect(client, "POST", json=ask(PROMPT))
    [line] = stream_lines(logs)

    assert line["prompt"] == PROMPT
    assert line["answer"] == text_of(events, "content")


AWKWARD = {
    "words and spaces": "what is 2 + 2?",
    "quotes, equals signs and backslashes": 'say "a=b" and C:\\temp',
    "several lines": "first line\nsecond line",
    "a row of tab-separated values": "Name\tAge\tCity",
}


@pytest.mark.parametrize("prompt", AWKWARD.values(), ids=AWKWARD.keys())
async def test_with_log_content_any_prompt_reads_back_whole_from_the_log_line(
    relay_to: RelayFactory, provider: FakeProvider, logs: pytest.LogCaptureFixture, prompt: str
) -> None:
    provider.reply = Reply(transcript("openai_content.sse"))
    client = await relay_to(log_content=True)

    events = await collect(client, "POST", json=ask(prompt))
    [line] = stream_lines(logs)

    assert line["prompt"] == prompt
    assert line["stream"] == events[0].data["stream"]
    assert line["outcome"] == "done"


# Probes: /healthz and /readyz.


class ModelList:
    """A provider that answers only ``GET /v1/models``, with the status a test sets."""

    def __init__(self) -> None:
        self.status = 200
        self.base_url = ""
        self.authorization: list[str | None] = []

    async def models(self, request: web.Request) -> web.Response:
        self.authorization.append(request.headers.get("Authorization"))
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]}, status=self.status)


@pytest.fixture
async def model_list(aiohttp_server: AiohttpServer) -> ModelList:
    fake = ModelList()
    app = web.Application()
    app.router.add_get("/v1/models", fake.models)
    server = await aiohttp_server(app)
    fake.base_url = str(server.make_url("/v1"))
    return fake


async def test_healthz_answers_ok(relay: RelayFactory) -> None:
    client = await relay()

    async with client.get("/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


async def readyz(client: Client) -> int:
    async with client.get("/readyz") as response:
        await response.read()
        return response.status


async def test_readyz_is_ready_with_the_demo_model(relay: RelayFactory) -> None:
    client = await relay()

    assert await readyz(client) == 200


async def test_readyz_without_ready_check_is_ready_for_a_configured_provider_it_does_not_call(
    relay: RelayFactory,
) -> None:
    client = await relay(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m")

    assert await readyz(client) == 200


async def test_readyz_with_ready_check_is_not_ready_when_the_provider_is_unreachable(relay: RelayFactory) -> None:
    client = await relay(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", ready_check=True)

    assert await readyz(client) == 503


@pytest.mark.parametrize("status", [401, 404, 500, 503])
async def test_readyz_with_ready_check_is_not_ready_when_the_provider_answers_an_error(
    relay: RelayFactory, model_list: ModelList, status: int
) -> None:
    model_list.status = status
    client = await relay(base_url=model_list.base_url, model="m", ready_check=True)

    assert await readyz(client) == 503


async def test_readyz_with_ready_check_is_ready_when_the_provider_lists_its_models(
    relay: RelayFactory, model_list: ModelList, key: str
) -> None:
    client = await relay(base_url=model_list.base_url, model="m", api_key=key, ready_check=True)

    assert await readyz(client) == 200
    assert model_list.authorization == [f"Bearer {key}"]


async def test_readyz_is_not_ready_while_draining(relay: RelayFactory) -> None:
    client = await relay()
    assert await readyz(client) == 200

    await client.app[streams_key].drain()

    assert await readyz(client) == 503


# The start-up warning for a relay open to the network.


async def start_up_log(*args: str) -> bytes:
    """Start ``server.py`` with ``args``, stop it with SIGINT once it listens; its whole log."""
    process, _, log = await start_server(*args)
    code, rest = await stop_server(process)
    assert code == 0, (log + rest).decode()
    return log + rest


OPEN_WARNING = b"without access tokens"


async def test_listening_beyond_loopback_without_tokens_warns_at_start_up() -> None:
    log = await start_up_log("--host", "0.0.0.0")

    [warning] = [line for line in log.splitlines() if OPEN_WARNING in line]
    assert b"WARNING" in warning
    assert b"0.0.0.0" in warning


@pytest.mark.parametrize(
    "args",
    [("--host", "0.0.0.0", "--token", "x"), ("--host", "127.0.0.1")],
    ids=["beyond loopback with a token", "on loopback without tokens"],
)
async def test_no_warning_with_tokens_or_on_loopback(args: tuple[str, ...]) -> None:
    log = await start_up_log(*args)

    assert OPEN_WARNING not in log
    assert b"WARNING" not in log


async def test_an_unexpected_error_is_logged_on_one_line_whatever_the_url(
    aiohttp_client: Callable[..., Awaitable[Client]], logs: pytest.LogCaptureFixture
) -> None:
    app = create_app(Config())

    async def fails(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app.router.add_get(r"/fails/{rest:[\s\S]*}", fails)  # any path, newlines included
    client = await aiohttp_client(app)

    async with client.get("/fails/x%0A2026-01-01 00:00:00,000 ERROR forged: a line of our own") as response:
        assert response.status == 500
        assert (await response.json())["error"]["code"] == "internal_error"
    [record] = [r for r in logs.records if r.getMessage().startswith("unhandled error")]
    assert "\n" not in record.getMessage()
    assert "forged" in record.getMessage()
