"""What the stream itself tells the page, in a real browser: tool calls, and a proxy that buffers."""

from __future__ import annotations

from typing import Any

from browsing import Serve, answered, ask, opened, paced, ready
from helpers import FakeProvider, chunk


def tool_delta(index: int, *, arguments: str, id: str | None = None, name: str | None = None) -> dict[str, Any]:
    """An OpenAI-style chunk carrying one fragment of tool call ``index``."""
    function: dict[str, Any] = {"arguments": arguments}
    call: dict[str, Any] = {"index": index, "function": function}
    if id is not None:
        call |= {"id": id, "type": "function"}
    if name is not None:
        function["name"] = name
    delta = {"tool_calls": [call]}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": delta}],
    }


TWO_CALLS = [
    chunk(reasoning="The user wants the weather and the time in Paris."),
    tool_delta(0, id="call_1", name="get_weather", arguments=""),
    tool_delta(0, arguments='{"city"'),
    tool_delta(0, arguments=': "Paris", "unit": "C"}'),
    tool_delta(1, id="call_2", name="get_time", arguments='{"tz": "Europe/Paris"}'),
    chunk(finish="tool_calls"),
    "[DONE]",
]


async def test_a_streamed_tool_call_shows_as_a_card_that_fills_in_and_stays_in_history(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = paced(TWO_CALLS, delay=0.4)
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "Weather and time in Paris?")
        first = page.locator("#messages .tool-call").first
        # While its arguments stream: the raw text so far, and a state that says so.
        await first.locator(".tool-arguments", has_text='{"city"').wait_for(timeout=5000)
        assert await first.locator(".tool-name").inner_text() == "get_weather"
        assert await first.locator(".tool-state").inner_text() == "writing arguments…"
        await answered(page)

        async def cards() -> list[dict[str, str]]:
            result: list[dict[str, str]] = await page.evaluate(
                """() => [...document.querySelectorAll("#messages .tool-call")].map((c) => ({
                    name: c.querySelector(".tool-name").textContent,
                    state: c.querySelector(".tool-state").textContent,
                    arguments: c.querySelector(".tool-arguments").textContent,
                }))"""
            )
            return result

        expected = [
            {"name": "get_weather", "state": "requested", "arguments": '{\n  "city": "Paris",\n  "unit": "C"\n}'},
            {"name": "get_time", "state": "requested", "arguments": '{\n  "tz": "Europe/Paris"\n}'},
        ]
        assert await cards() == expected
        status = page.locator("#messages article.assistant .status")
        assert await status.inner_text() == (
            "The model asked to call get_weather, get_time instead of answering. This page does not run tools."
        )
        assert await status.get_attribute("role") is None, "not an error"
        assert await page.locator("#messages article.assistant .actions .copy").count() == 0

        await page.reload()
        await ready(page)
        await page.wait_for_selector("#messages article.assistant[aria-busy=false]", timeout=5000)
        assert await cards() == expected
        assert await status.is_visible()
        assert tab.problems == []


async def test_a_tool_call_cut_short_by_stop_reads_as_interrupted(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = paced(
        [tool_delta(0, id="c", name="search", arguments='{"q": "kat'), *[tool_delta(0, arguments="e")] * 50], 0.2
    )
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "Search")
        await page.locator("#messages .tool-call .tool-arguments", has_text='{"q": "kat').wait_for(timeout=5000)
        await page.click("#stop")
        await answered(page)

        card = page.locator("#messages .tool-call")
        assert await card.locator(".tool-state").inner_text() == "interrupted"
        assert (await card.locator(".tool-arguments").inner_text()).startswith('{"q": "kat')
        assert await page.locator("#messages article.assistant .status").inner_text() == "Stopped."
        assert tab.problems == []
