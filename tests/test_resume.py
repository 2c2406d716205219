"""A generation outlives its connection: a client that reconnects with the last id it saw loses nothing.

Every event arrives exactly once and in order across any number of dropped
connections, the provider is asked once per stream however often a client
reconnects, and a resume that cannot be served says why: ``204`` when nothing
more will come, ``404`` for a stream that never was or has expired, ``400``
for an id that is not ``<stream-id>:<seq>``, ``410`` when the events asked for
are no longer kept.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from helpers import FakeProvider, Received, RelayFactory, Reply, collect, parse_sse, text_of, types, without_timings

from handlers.keys import streams_key

Client = TestClient[web.Request, web.Application]

# Generous bound on any one wait; a healthy run takes a fraction of a second.
PATIENCE = 10

REASONING = ["The user", " says hi", " so I", " greet", " them back."]
ANSWER = ["Hello", " there", "!", " How", " can", " I", " help", " you", " with", " your", " question", " today", "?"]
# With each delta in its own read (:func:`paced_answer`), the relay makes ``meta``, a ``reasoning`` event per
# thought, a ``content`` event per token, and ``done``. Deltas that arrive in one read are merged into one event
# per kind, so a stream sent all at once (``paced_answer(delay=0)``) has fewer: its tests count what it gave.
EVENT_COUNT = 1 + len(REASONING) + len(ANSWER) + 1


def sse(*data: Any) -> list[bytes]:
    """Provider events, one ``data:`` block each (objects as JSON, strings as they are)."""
    return [b"data: " + (d.encode() if isinstance(d, str) else orjson.dumps(d)) + b"\n\n" for d in data]


def delta(**fields: str) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": fields}]}


FINISH = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
}


def paced_answer(delay: float = 0.01) -> Reply:
    """:data:`REASONING` then :data:`ANSWER`, one provider event per write, so the stream is live for a while."""
    writes = sse(
        *(delta(reasoning_content=t) for t in REASONING),
        *(delta(content=t) for t in ANSWER),
        FINISH,
        "[DONE]",
    )
    return Reply(b"".join(writes), chunks=[len(w) for w in writes], delay=delay)


def long_answer(tokens: int) -> Reply:
    """An answer of ``tokens`` words, all at once (so relayed in few events, but with all their text)."""
    return Reply(b"".join(sse(*(delta(content=f" word{n}") for n in range(tokens)), FINISH, "[DONE]")))


def words_in_writes(tokens: int, per_write: int) -> Reply:
    """An answer of ``tokens`` words, ``per_write`` words a provider write, each relayed as an event of its own."""
    writes = [
        *(
            b"".join(sse(*(delta(content=f" word{n}") for n in range(i, min(i + per_write, tokens)))))
            for i in range(0, tokens, per_write)
        ),
        b"".join(sse(FINISH, "[DONE]")),
    ]
    return Reply(b"".join(writes), chunks=[len(w) for w in writes], delay=0.002)


def seq(event: Received) -> int:
    return int(event.id.rpartition(":")[2])


def as_run(events: Sequence[Received]) -> list[tuple[str, dict[str, Any]]]:
    """What a run says, without what differs between two runs of one answer: the stream id and timings."""
    return [(e.event, {k: v for k, v in without_timings(e.data).items() if k != "stream"}) for e in events]


def assert_whole_stream(events: Sequence[Received]) -> None:
    """Every event of one stream, each once, in order: ids ``<stream>:1`` … ``<stream>:n`` without gaps."""
    stream_id = events[0].data["stream"]
    assert [e.id for e in events] == [f"{stream_id}:{n}" for n in range(1, len(events) + 1)]


async def next_events(response: ClientResponse, count: int | None = None) -> list[Received]:
    """Read events off an open SSE response as they arrive: ``count`` of them, or every one until it ends."""
    events: list[Received] = []
    block = b""
    async with asyncio.timeout(PATIENCE):
        while count is None or len(events) < count:
            line = await response.content.readline()
            if not line:
                break
            block += line
            if line in (b"\n", b"\r\n"):
                events += parse_sse(block)
                block = b""
    return events


async def hang_up_after(
    client: Client, count: int, path: str = "/stream", method: str = "GET", **kwargs: Any
) -> list[Received]:
    """Follow a stream, and drop the connection once ``count`` whole events have arrived."""
    async with client.request(method, path, **kwargs) as response:
        assert response.status == 200, await response.text()
        events = await next_events(response, count)
        response.close()
    assert len(events) == count
    return events


async def read_all(client: Client, path: str, **kwargs: Any) -> list[Received]:
    """Every event a ``GET`` gives, within :data:`PATIENCE`."""
    async with asyncio.timeout(PATIENCE):
        return await collect(client, "GET", path, **kwargs)


async def resume(client: Client, last: Received, **kwargs: Any) -> list[Received]:
    """Reconnect to ``last``'s stream the way the README says: ``GET /stream/{id}`` with ``Last-Event-ID``."""
    stream_id = last.id.rpartition(":")[0]
    return await read_all(client, f"/stream/{stream_id}", headers={"Last-Event-ID": last.id}, **kwargs)


async def finished(client: Client, stream_id: str) -> None:
    """Wait until the stream's generation has ended (with ``done`` or ``error``)."""
    generation = client.app[streams_key].get(stream_id)
    assert generation is not None and generation.task is not None
    await asyncio.wait([generation.task], timeout=PATIENCE)
    assert not generation.running


async def until(condition: Callable[[], bool]) -> None:
    """Wait for something the server does in its own time, such as noticing a dropped connection."""
    async with asyncio.timeout(PATIENCE):
        # Polling, because the server offers nothing to wait on: it notices a dropped connection when it
        # next writes, or at its watchdog's next look.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def json_error(client: Client, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with client.get(path, **kwargs) as response:
        assert response.content_type == "application/json"
        body = await response.json()
    return response.status, body["error"]


# Resume after a dropped connection.


@pytest.mark.parametrize(
    "dropped_after",
    [
        pytest.param(1, id="after meta only"),
        pytest.param(2, id="after the first thought"),
        pytest.param(1 + len(REASONING), id="after the last thought"),
        pytest.param(2 + len(REASONING), id="after the first token"),
        pytest.param(EVENT_COUNT // 2, id="in the middle"),
        pytest.param(EVENT_COUNT - 2, id="two before done"),
        pytest.param(EVENT_COUNT - 1, id="just before done"),
    ],
)
async def test_resuming_after_a_drop_gives_exactly_the_uninterrupted_run(
    relay_to: RelayFactory, provider: FakeProvider, dropped_after: int
) -> None:
    provider.reply = paced_answer()
    client = await relay_to()
    before = await hang_up_after(client, dropped_after, params={"prompt": "hi"})
    after = await resume(client, before[-1])
    uninterrupted = await read_all(client, "/stream", params={"prompt": "hi"})

    assert len(uninterrupted) == EVENT_COUNT
    assert_whole_stream(before + after)
    assert as_run(before + after) == as_run(uninterrupted)


async def test_a_resumed_stream_is_the_very_events_a_full_replay_gives(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = paced_answer()
    client = await relay_to()
    before = await hang_up_after(client, 4, params={"prompt": "hi"})
    after = await resume(client, before[-1])
    replay = await read_all(client, f"/stream/{before[0].data['stream']}")

    assert before + after == replay


async def test_a_stream_survives_several_drops_in_a_row(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = paced_answer()
    client = await relay_to()
    received = await hang_up_after(client, 2, params={"prompt": "hi"})
    stream_id = received[0].data["stream"]
    for count in (1, 3, 5, 2, 6):
        received += await hang_up_after(
            client, count, f"/stream/{stream_id}", headers={"Last-Event-ID": received[-1].id}
        )
    received += await resume(client, received[-1])
    uninterrupted = await read_all(client, "/stream", params={"prompt": "hi"})

    assert_whole_stream(received)
    assert as_run(received) == as_run(uninterrupted)
    assert len(provider.requests) == 2


async def test_resumed_events_carry_their_stream_ids_and_only_the_first_event_carries_retry(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = paced_answer()
    client = await relay_to(retry_ms=1500)
    before = await hang_up_after(client, 3, params={"prompt": "hi"})
    after = await resume(client, before[-1])

    assert before[0].retry == 1500
    assert [e.retry for e in after] == [None] * len(after)
    assert [seq(e) for e in after] == list(range(4, EVENT_COUNT + 1))


# The ways to reconnect.


async def test_an_eventsource_reconnect_on_the_get_url_continues_the_same_generation(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = paced_answer()
    client = await relay_to()
    before = await hang_up_after(client, 3, params={"prompt": "hi"})
    after = await read_all(client, "/stream", params={"prompt": "hi"}, headers={"Last-Event-ID": before[-1].id})

    assert len(provider.requests) == 1
    assert [seq(e) for e in after] == list(range(4, EVENT_COUNT + 1))
    assert_whole_stream(before + after)


async def test_a_post_generation_is_resumed_by_its_id(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = paced_answer()
    client = await relay_to()
    messages = [{"role": "user", "content": "hi"}]
    before = await hang_up_after(client, 2, method="POST", json={"messages": messages})
    after = await resume(client, before[-1])

    assert len(provider.requests) == 1
    assert provider.requests[0]["messages"] == messages
    assert_whole_stream(before + after)
    assert text_of(before + after, "content") == "".join(ANSWER)


@pytest.mark.parametrize(
    "how",
    [
        pytest.param(lambda stream_id: {"params": {"last_event_id": f"{stream_id}:3"}}, id="?last_event_id=<id>:<seq>"),
        pytest.param(lambda stream_id: {"params": {"last_event_id": "3"}}, id="?last_event_id=<seq>"),
        pytest.param(lambda stream_id: {"headers": {"Last-Event-ID": "3"}}, id="Last-Event-ID: <seq>"),
    ],
)
async def test_other_spellings_of_the_last_id_work_like_the_header(
    relay_to: RelayFactory, provider: FakeProvider, how: Callable[[str], dict[str, Any]]
) -> None:
    provider.reply = paced_answer(delay=0)
    client = await relay_to()
    events = await read_all(client, "/stream", params={"prompt": "hi"})
    stream_id = events[0].data["stream"]
    with_header = await read_all(client, f"/stream/{stream_id}", headers={"Last-Event-ID": f"{stream_id}:3"})
    spelled_otherwise = await read_all(client, f"/stream/{stream_id}", **how(stream_id))

    assert [seq(e) for e in with_header] == list(range(4, len(events) + 1))
    assert with_header == events[3:]
    assert spelled_otherwise == with_header


async def test_following_a_stream_without_a_last_id_replays_it_from_meta(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = paced_answer(delay=0)
    client = await relay_to()
    first = await read_all(client, "/stream", params={"prompt": "hi"})
    replay = await read_all(client, f"/stream/{first[0].data['stream']}")

    assert replay[0].event == "meta"
    assert replay == first


async def test_resume_works_with_ndjson(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = paced_answer()
    client = await relay_to()
    before = await hang_up_after(client, 4, params={"prompt": "hi"})
    stream_id = before[0].data["stream"]
    async with asyncio.timeout(PATIENCE):
        async with client.get(
            f"/stream/{stream_id}", params={"format": "ndjson"}, headers={"Last-Event-ID": before[-1].id}
        ) as response:
            assert response.status == 200
            assert response.content_type == "application/x-ndjson"
            body = await response.read()
    replay = await read_all(client, f"/stream/{stream_id}")

    lines = body.decode().split("\n")
    assert lines[-1] == ""
    assert [orjson.loads(line) for line in lines[:-1]] == [e.data for e in replay[4:]]


# Finished streams.


async def test_resuming_a_finished_stream_after_its_last_event_is_204_with_no_body(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = paced_answer(delay=0)
    client = await relay_to()
    events = await read_all(client, "/stream", params={"prompt": "hi"})
    stream_id = events[0].data["stream"]
    async with client.get(f"/stream/{stream_id}", headers={"Last-Event-ID": events[-1].id}) as response:
        assert response.status == 204
        assert await response.read() == b""


async def test_an_eventsource_reconnect_after_the_end_is_204_with_no_body(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = paced_answer(delay=0)
    client = await relay_to()
    events = await read_all(client, "/stream", params={"prompt": "hi"})
    async with client.get("/stream", params={"prompt": "hi"}, headers={"Last-Event-ID": events[-1].id}) as response:
        assert response.status == 204
        assert await response.read() == b""
    assert len(provider.requests) == 1


async def test_resuming_a_finished_stream_from_the_middle_gives_the_rest_then_ends(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = paced_answer(delay=0)
    client = await relay_to()
    events = await read_all(client, "/stream", params={"prompt": "hi"})
    middle = events[len(events) // 2 - 1]
    rest = await resume(client, middle)

    assert rest == events[len(events) // 2 :]
    assert rest[-1].event == "done"


# Resumes that cannot be served.


@pytest.mark.parametrize(
    "how",
    [
        pytest.param({"path": "/stream/nosuchstream"}, id="GET /stream/{id}"),
        pytest.param(
            {"path": "/stream/nosuchstream", "headers": {"Last-Event-ID": "nosuchstream:3"}},
            id="GET /stream/{id} with Last-Event-ID",
        ),
        pytest.param(
            {"path": "/stream", "params": {"prompt": "hi"}, "headers": {"Last-Event-ID": "nosuchstream:3"}},
            id="EventSource reconnect",
        ),
    ],
)
async def test_an_unknown_stream_is_404_stream_not_found(
    relay_to: RelayFactory, provider: FakeProvider, how: dict[str, Any]
) -> None:
    client = await relay_to()
    status, error = await json_error(client, **how)

    assert (status, error["code"]) == (404, "stream_not_found")
    assert "nosuchstream" in error["message"]
    assert provider.requests == []


async def test_a_stream_past_its_retention_is_404_stream_not_found(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = paced_answer(delay=0)
    client = await relay_to(retention=0.2)
    events = await read_all(client, "/stream", params={"prompt": "hi"})
    await asyncio.sleep(0.6)
    status, error = await json_error(
        client, f"/stream/{events[0].data['stream']}", headers={"Last-Event-ID": events[3].id}
    )

    assert (status, error["code"]) == (404, "stream_not_found")


@pytest.mark.parametrize(
    "last_event_id",
    [
        pytest.param("abc", id="not a number"),
        pytest.param("x:y", id="not a sequence number"),
        pytest.param("id:-1", id="negative"),
        pytest.param("{stream}:-1", id="this stream, negative"),
        pytest.param("{stream}:", id="this stream, no sequence number"),
        pytest.param("{stream}:2.5", id="this stream, fraction"),
        pytest.param("{stream}:+2", id="this stream, signed"),
        pytest.param("{stream}:\u0663", id="this stream, non-ASCII digit"),
    ],
)
async def test_a_malformed_last_event_id_is_400(
    relay_to: RelayFactory, provider: FakeProvider, last_event_id: str
) -> None:
    provider.reply = paced_answer(delay=0)
    client = await relay_to()
    stream_id = (await read_all(client, "/stream", params={"prompt": "hi"}))[0].data["stream"]
    value = last_event_id.format(stream=stream_id)
    status, error = await json_error(client, f"/stream/{stream_id}", headers={"Last-Event-ID": value})

    assert (status, error["code"]) == (400, "invalid_last_event_id")


@pytest.mark.parametrize(
    ("path", "kwargs"),
    [
        pytest.param("/stream/{stream}", lambda seq: {"headers": {"Last-Event-ID": f"{{stream}}:{seq}"}}, id="header"),
        pytest.param("/stream/{stream}", lambda seq: {"params": {"last_event_id": seq}}, id="?last_event_id="),
        pytest.param(
            "/stream",
            lambda seq: {"params": {"prompt": "hi"}, "headers": {"Last-Event-ID": f"{{stream}}:{seq}"}},
            id="header on GET /stream",
        ),
    ],
)
async def test_a_last_event_id_of_thousands_of_digits_is_400(
    relay_to: RelayFactory, provider: FakeProvider, path: str, kwargs: Callable[[str], dict[str, Any]]
) -> None:
    # Past 4,300 digits Python refuses to make an int of them at all.
    provider.reply = paced_answer(delay=0)
    client = await relay_to()
    stream_id = (await read_all(client, "/stream", params={"prompt": "hi"}))[0].data["stream"]
    asked = orjson.loads(orjson.dumps(kwargs("9" * 5000)).replace(b"{stream}", stream_id.encode()))

    status, error = await json_error(client, path.format(stream=stream_id), **asked)

    assert (status, error["code"]) == (400, "invalid_last_event_id")


async def test_a_malformed_last_event_id_parameter_is_400(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = paced_answer(delay=0)
    client = await relay_to()
    stream_id = (await read_all(client, "/stream", params={"prompt": "hi"}))[0].data["stream"]
    status, error = await json_error(client, f"/stream/{stream_id}", params={"last_event_id": "x:y"})

    assert (status, error["code"]) == (400, "invalid_last_event_id")


async def test_an_eventsource_reconnect_with_a_bare_sequence_number_is_400(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    client = await relay_to()
    status, error = await json_error(client, "/stream", params={"prompt": "hi"}, headers={"Last-Event-ID": "3"})

    assert (status, error["code"]) == (400, "invalid_last_event_id")
    assert provider.requests == []


async def test_a_last_event_id_of_another_stream_is_400(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = paced_answer(delay=0)
    client = await relay_to()
    one = await read_all(client, "/stream", params={"prompt": "hi"})
    other = await read_all(client, "/stream", params={"prompt": "hi"})
    status, error = await json_error(client, f"/stream/{one[0].data['stream']}", headers={"Last-Event-ID": other[2].id})

    assert (status, error["code"]) == (400, "invalid_last_event_id")


async def test_a_last_event_id_beyond_the_streams_last_event_is_400(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = paced_answer(delay=0)
    client = await relay_to()
    events = await read_all(client, "/stream", params={"prompt": "hi"})
    stream_id = events[0].data["stream"]
    status, error = await json_error(
        client, f"/stream/{stream_id}", headers={"Last-Event-ID": f"{stream_id}:{len(events) + 5}"}
    )

    assert (status, error["code"]) == (400, "invalid_last_event_id")


async def test_resuming_from_evicted_events_is_410_resume_gap(relay: RelayFactory) -> None:
    client = await relay(demo_delay=0, demo_tokens=200, stream_buffer_bytes=1024, buffer_total_bytes=1024)
    meta = await hang_up_after(client, 1, params={"prompt": "hi"})
    await finished(client, meta[0].data["stream"])
    status, error = await json_error(client, f"/stream/{meta[0].data['stream']}", headers={"Last-Event-ID": meta[0].id})

    assert (status, error["code"]) == (410, "resume_gap")


async def test_a_finished_stream_forgotten_to_free_memory_is_410_resume_gap(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    # README: finished streams are evicted first when --buffer-total-bytes runs short, and "a resume that
    # reaches past what is kept gets resume_gap".
    client = await relay_to(stream_buffer_bytes=8192, buffer_total_bytes=8192)
    # A finished stream that holds about 5 KiB of the 8 KiB ...
    provider.reply = long_answer(tokens=500)
    early = await read_all(client, "/stream", params={"prompt": "hi"})
    # ... and a running one that keeps up to 8 KiB on its own, in small events, so that together they overflow.
    provider.reply = words_in_writes(tokens=2000, per_write=40)
    late = await hang_up_after(client, 1, params={"prompt": "go on"})
    await finished(client, late[0].data["stream"])
    status, error = await json_error(
        client, f"/stream/{early[0].data['stream']}", headers={"Last-Event-ID": early[-2].id}
    )

    assert (status, error["code"]) == (410, "resume_gap")


# Cancelled streams.


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("POST", "/stream/{id}/cancel", id="POST cancel"),
        pytest.param("DELETE", "/stream/{id}", id="DELETE"),
    ],
)
async def test_a_cancelled_stream_replays_to_its_cancelled_error_without_done(
    relay: RelayFactory, method: str, path: str
) -> None:
    client = await relay(demo_delay=0.01, demo_tokens=400)
    before = await hang_up_after(client, 3, params={"prompt": "hi"})
    stream_id = before[0].data["stream"]
    async with client.request(method, path.format(id=stream_id)) as response:
        assert response.status == 200
        assert await response.json() == {"stream": stream_id, "cancelled": True}
    after = await resume(client, before[-1])
    replay = await read_all(client, f"/stream/{stream_id}")

    assert_whole_stream(before + after)
    assert before + after == replay
    assert "done" not in types(replay)
    assert types(replay).count("error") == 1
    assert replay[-1].event == "error" and replay[-1].data["code"] == "cancelled"


# Several readers of one stream.


async def test_two_readers_of_one_live_stream_each_get_every_event_once(relay: RelayFactory) -> None:
    client = await relay(demo_delay=0.005, demo_tokens=200)
    async with client.get("/stream", params={"prompt": "hi"}) as first:
        first_events = await next_events(first, 1)
        stream_id = first_events[0].data["stream"]
        async with client.get(f"/stream/{stream_id}") as second:
            second_events = await next_events(second, 1)
            generation = client.app[streams_key].get(stream_id)
            assert generation is not None and generation.running
            assert generation.readers == 2
            first_rest, second_rest = await asyncio.gather(next_events(first), next_events(second))
    first_events += first_rest
    second_events += second_rest

    assert_whole_stream(first_events)
    assert first_events[-1].event == "done"
    assert second_events == first_events


async def test_one_reader_leaving_does_not_end_the_stream_for_another(relay: RelayFactory) -> None:
    # With no grace time, the generation would be cancelled at once if the leaver were taken for the last reader.
    client = await relay(demo_delay=0.005, demo_tokens=100, disconnect_grace=0)
    async with client.get("/stream", params={"prompt": "hi"}) as first:
        stream_id = (await next_events(first, 1))[0].data["stream"]
        generation = client.app[streams_key].get(stream_id)
        assert generation is not None
        async with client.get(f"/stream/{stream_id}") as second:
            events = await next_events(second, 1)
            first.close()
            await until(lambda: generation.readers == 1)
            events += await next_events(second)

    assert_whole_stream(events)
    assert events[-1].event == "done"


async def test_a_client_that_resumes_within_the_grace_time_finds_the_generation_still_going(
    relay: RelayFactory,
) -> None:
    client = await relay(demo_delay=0.005, demo_tokens=200, disconnect_grace=5)
    before = await hang_up_after(client, 2, params={"prompt": "hi"})
    generation = client.app[streams_key].get(before[0].data["stream"])
    assert generation is not None
    await until(lambda: generation.readers == 0)
    assert generation.running
    after = await resume(client, before[-1])

    assert_whole_stream(before + after)
    assert after[-1].event == "done"


class _LogThatFailsToRead:
    """A stream's log whose reads for sending fail, as a bug in the relay would (its resume check still works)."""

    def __init__(self, log: Any) -> None:
        self._log = log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)

    async def read(self, after: int, max_bytes: int = 1) -> Any:
        if max_bytes == 0:
            return await self._log.read(after, max_bytes=0)
        raise KeyError("a bug in the relay")


@pytest.mark.parametrize("fmt", ["sse", "ndjson"])
async def test_a_failure_in_the_relay_after_a_resume_began_ends_it_with_an_error_event(
    relay_to: RelayFactory, provider: FakeProvider, caplog: pytest.LogCaptureFixture, fmt: str
) -> None:
    # Once a response has begun, a JSON error answer is no longer possible: the stream's own error event it is.
    provider.reply = paced_answer(delay=0)
    client = await relay_to()
    events = await read_all(client, "/stream", params={"prompt": "hi"})
    streams = client.app[streams_key]
    log = await streams.open(events[0].data["stream"], None)
    assert log is not None

    async def failing(stream_id: str, principal: str | None) -> Any:
        return _LogThatFailsToRead(log)

    streams.open = failing  # type: ignore[method-assign]

    async with client.get(f"/stream/{log.stream_id}", params={"format": fmt}) as response:
        assert response.status == 200
        body = await response.read()

    error = parse_sse(body)[0].data if fmt == "sse" else orjson.loads(body)
    assert error["type"] == "error"
    assert error["code"] == "internal_error"
    assert "a bug in the relay" not in error["message"]
    assert "a bug in the relay" in caplog.text
