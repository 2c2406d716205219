"""What the stream itself tells the page, in a real browser: tool calls, and a proxy that buffers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
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
        # Every state the first card is shown in, as the DOM changes.
        await page.evaluate(
            """() => {
                window.__shown = [];
                new MutationObserver(() => {
                    const card = document.querySelector("#messages .tool-call");
                    if (!card) return;
                    const state = card.querySelector(".tool-state").textContent;
                    const shown = [state, card.querySelector(".tool-arguments").textContent];
                    if (String(window.__shown.at(-1)) !== String(shown)) window.__shown.push(shown);
                }).observe(document.getElementById("messages"), { subtree: true, childList: true });
            }"""
        )
        await ask(page, "Weather and time in Paris?")
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
        # While its arguments streamed: the raw text so far, and a state that said so.
        shown = await page.evaluate("() => window.__shown")
        assert ["writing arguments…", '{"city"'] in shown
        assert shown[-1] == ["requested", expected[0]["arguments"]]
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


# --- A proxy that buffers ---------------------------------------------------------------------------

session_key = web.AppKey("session_key", aiohttp.ClientSession)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}


def holding_proxy(target: str) -> web.Application:
    """A reverse proxy to ``target`` that answers only once it holds the whole response.

    What nginx does with ``proxy_buffering on`` when the stream fits its buffers, and what
    some CDNs do to every response.
    """

    async def session(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as client:
            app[session_key] = client
            yield

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "accept", "authorization")}
        async with request.app[session_key].request(
            request.method, target + str(request.rel_url), headers=headers, data=await request.read()
        ) as upstream:
            body = await upstream.read()
            kept = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            return web.Response(status=upstream.status, body=body, headers=kept)

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


# Two seconds of generation: twenty words a tenth of a second apart.
SLOW_ANSWER = [*(chunk(content=f"word{i} ") for i in range(20)), chunk(finish="stop"), "[DONE]"]


async def test_an_answer_held_back_by_a_buffering_proxy_says_so_under_it(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    relay = await serve(base_url=fake.base_url, model="m")
    proxy = await serve(holding_proxy(str(relay.make_url("")).rstrip("/")))
    fake.reply = paced(SLOW_ANSWER, delay=0.1)
    async with opened(browser, str(proxy.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "Through the proxy")
        await answered(page)

        assert (await page.locator("#messages .answer").inner_text()).startswith("word0 word1")
        warning = page.locator("#messages article.assistant .warning")
        text = await warning.inner_text()
        assert "all at once" in text and "buffering" in text
        assert "“A proxy that buffers” under Deploying in thinkstream's README" in text
        await page.reload()
        await ready(page)
        await warning.wait_for(timeout=5000)
        assert tab.problems == []


async def test_an_answer_read_straight_from_the_relay_raises_no_buffering_warning(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    relay = await serve(base_url=fake.base_url, model="m")
    fake.reply = paced(SLOW_ANSWER, delay=0.1)
    async with opened(browser, str(relay.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "Straight")
        await answered(page)

        stats = await page.locator("#messages article.assistant .stats").inner_text()
        assert stats.startswith("First token")
        assert await page.locator("#messages .answer").inner_text() == " ".join(f"word{i}" for i in range(20))
        assert await page.locator("#messages .warning").count() == 0
        assert tab.problems == []
