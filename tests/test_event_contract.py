"""The event contract every client relies on: framing, ids, order, NDJSON."""

from __future__ import annotations

import orjson
import pytest
from helpers import FakeProvider, RelayFactory, Reply, collect, transcript, types


async def test_first_event_is_meta_with_stream_id_model_and_retry(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = Reply(transcript("deepseek_reasoner.sse"))
    events = await collect(await relay_to(retry_ms=1500), params={"prompt": "hi"})

    meta = events[0]
    assert meta.event == "meta"
    assert meta.data == {"type": "meta", "stream": meta.data["stream"], "model": "test-model"}
    assert meta.retry == 1500
    assert all(e.retry is None for e in events[1:])


async def test_ids_are_stream_id_and_sequence_from_one_without_gaps(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = Reply(transcript("deepseek_reasoner.sse"))
    events = await collect(await relay_to(), params={"prompt": "hi"})

    stream_id = events[0].data["stream"]
    assert [e.id for e in events] == [f"{stream_id}:{n}" for n in range(1, len(events) + 1)]


async def test_each_stream_gets_its_own_id(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = Reply(transcript("openai_content.sse"))
    client = await relay_to()
    first = await collect(client, params={"prompt": "a"})
    second = await collect(client, params={"prompt": "a"})

    assert first[0].data["stream"] != second[0].data["stream"]


async def test_event_field_is_the_objects_type_and_data_is_one_json_line(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = Reply(transcript("deepseek_reasoner.sse"))
    client = await relay_to()
    async with client.get("/stream", params={"prompt": "hi"}) as response:
        body = (await response.read()).decode()

    blocks = [block for block in body.split("\n\n") if block]
    for block in blocks:
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        assert orjson.loads(fields["data"])["type"] == fields["event"]
        assert set(fields) <= {"id", "event", "data", "retry"}


async def test_done_is_last_and_carries_timings(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = Reply(transcript("deepseek_reasoner.sse"))
    events = await collect(await relay_to(), params={"prompt": "hi"})

    done = events[-1].data
    assert types(events).count("done") == 1 and events[-1].event == "done"
    assert isinstance(done["ttft_ms"], float) and done["ttft_ms"] >= 0
    assert done["duration_ms"] >= done["ttft_ms"]


async def test_answer_without_tokens_has_no_time_to_first_token(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = Reply(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
    events = await collect(await relay_to(), params={"prompt": "hi"})

    assert types(events) == ["meta", "done"]
    assert events[-1].data["ttft_ms"] is None
    assert events[-1].data["usage"] is None


async def test_stream_headers_forbid_caching_and_proxy_buffering(
    relay_to: RelayFactory, provider: FakeProvider
) -> None:
    provider.reply = Reply(transcript("openai_content.sse"))
    client = await relay_to()
    async with client.get("/stream", params={"prompt": "hi"}, headers={"Accept-Encoding": "gzip"}) as response:
        await response.read()

    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Encoding" not in response.headers


async def test_post_with_messages_streams_a_multi_turn_answer(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = Reply(transcript("openai_content.sse"))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And its population?"},
    ]
    events = await collect(await relay_to(), "POST", json={"messages": messages, "temperature": 0.2})

    assert types(events)[-1] == "done"
    assert provider.requests[-1]["messages"] == messages
    assert provider.requests[-1]["temperature"] == 0.2


async def test_a_model_from_the_allow_list_is_sent_upstream(relay_to: RelayFactory, provider: FakeProvider) -> None:
    provider.reply = Reply(transcript("openai_content.sse"))
    events = await collect(await relay_to(models=("big-model",)), params={"prompt": "hi", "model": "big-model"})

    assert events[0].data["model"] == "big-model"
    assert provider.requests[-1]["model"] == "big-model"


@pytest.mark.parametrize(
    "how",
    [{"params": {"prompt": "hi", "format": "ndjson"}}, {"params": {"prompt": "hi"}, "accept": "application/x-ndjson"}],
    ids=["format-parameter", "accept-header"],
)
async def test_ndjson_carries_the_same_objects_one_per_line(
    relay_to: RelayFactory, provider: FakeProvider, how: dict[str, object]
) -> None:
    provider.reply = Reply(transcript("deepseek_reasoner.sse"))
    client = await relay_to()
    sse = await collect(client, params={"prompt": "hi"})
    headers = {"Accept": str(how["accept"])} if "accept" in how else {}
    async with client.get("/stream", params=how["params"], headers=headers) as response:
        assert response.content_type == "application/x-ndjson"
        body = await response.read()

    lines = body.decode().split("\n")
    assert lines[-1] == ""
    objects = [orjson.loads(line) for line in lines[:-1]]
    assert [o["type"] for o in objects] == [e.event for e in sse]
    strip = ("stream", "ttft_ms", "duration_ms")
    assert [{k: v for k, v in o.items() if k not in strip} for o in objects] == [
        {k: v for k, v in e.data.items() if k not in strip} for e in sse
    ]
