"""The provider seam (`stream_chat`) as its callers see it: batches, and timeouts that are the provider's alone."""

from __future__ import annotations

import asyncio

import aiohttp
from helpers import FakeProvider, Reply, chunk, sse

from handlers.provider.upstream import Upstream, stream_chat


async def test_time_the_caller_spends_on_a_batch_never_counts_as_the_provider_going_silent(
    provider: FakeProvider,
) -> None:
    reads = [sse(chunk(content="a")), sse(chunk(content="b", finish="stop"), "[DONE]")]
    # The second read comes 0.15 s after the first: within the 0.2 s idle timeout.
    provider.reply = Reply(b"".join(reads), chunks=[len(r) for r in reads], delay=0.15)
    handled: list[list[str]] = []
    async with aiohttp.ClientSession() as session:
        batches = stream_chat(
            session, Upstream(provider.base_url), {}, max_line=1 << 20, first_byte_timeout=5, idle_timeout=0.2
        )
        async for batch in batches:
            handled.append([event["type"] for event in batch])
            if batch[-1]["type"] == "done":
                # A caller that waits on the last batch (a shared store's append, say) past the silence left.
                await asyncio.sleep(0.1)

    assert handled == [["content"], ["content", "done"]]
