"""The chat page, in a real browser, against a real relay.

Each test opens a fresh page (its own browser context, so its own
localStorage) on a relay served by ``aiohttp_server``; providers are real
aiohttp servers too. Console errors and uncaught page errors fail a test
unless it expects them: a Content-Security-Policy violation is a console
error, so every test also checks that the page keeps to its own CSP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from browsing import LIVE_MARKDOWN, WAIT, Serve, answer, answered, ask, demo_answer, opened, paced, ready, stored_chats
from helpers import ROOT, FakeProvider, Reply, chunk, eventually, sse

from handlers.app import create_app
from handlers.config import Config
from handlers.keys import streams_key


@dataclass
class SlowProvider:
    """A provider that writes one word every 50 ms for 20 s, and notes when the relay hangs up."""

    hung_up: asyncio.Event = field(default_factory=asyncio.Event)
    hung_up_at: float | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(400):
                await response.write(sse(chunk(content=f"word{i} ")))
                await asyncio.sleep(0.05)
            await response.write(sse(chunk(finish="stop"), "[DONE]"))
        except (ConnectionError, asyncio.CancelledError):
            self.hung_up_at = asyncio.get_running_loop().time()
            self.hung_up.set()
            raise
        return response


@pytest.fixture
async def slow(serve: Serve) -> tuple[SlowProvider, str]:
    provider = SlowProvider()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", provider.chat_completions)
    server = await serve(app)
    return provider, str(server.make_url("/v1"))


@dataclass(frozen=True)
class Seen:
    """One request as the relay received it."""

    method: str
    path_qs: str
    authorization: str | None


def record_requests(app: web.Application) -> list[Seen]:
    """Every request ``app`` answers (its demo model's included), in order."""
    seen: list[Seen] = []

    async def note(request: web.Request, response: web.StreamResponse) -> None:
        seen.append(Seen(request.method, request.path_qs, request.headers.get("Authorization")))

    app.on_response_prepare.append(note)
    return seen


# --- Answering ------------------------------------------------------------------------


async def streaming(page: Any) -> None:
    """Ask the slow provider's question and wait until its answer, still streaming, has shown a few words."""
    await ask(page, "Count slowly")
    await page.wait_for_function(
        "() => document.querySelector('#messages .answer')?.textContent.includes('word3')", timeout=WAIT
    )


async def test_a_demo_answer_shows_thinking_then_rendered_markdown_and_stats(serve: Serve, browser: Any) -> None:
    server = await serve(demo_delay=0.01)
    question = "Which is better for a chat relay?"
    reasoning, _ = demo_answer(question)
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, question)
        await page.wait_for_selector("details.thinking[open] .reasoning", state="visible", timeout=WAIT)
        await answered(page)

        thinking = page.locator("#messages details.thinking")
        assert await thinking.get_attribute("open") is None
        assert re.fullmatch(r"Thought for \d+\.\d s", await thinking.locator("summary").inner_text())
        assert (await thinking.locator(".reasoning").text_content() or "").strip() == reasoning

        body = page.locator("#messages article.assistant .answer")
        assert await body.locator("table th").all_inner_texts() == ["Aspect", "Score"]
        assert await body.locator("pre code.hljs span").count() > 0
        link = body.locator('a[href="https://html.spec.whatwg.org/multipage/server-sent-events.html"]')
        assert await link.get_attribute("rel") == "noopener noreferrer"
        assert await link.get_attribute("target") == "_blank"

        stats = await page.locator("#messages article.assistant .stats").inner_text()
        assert re.search(r"First token \d+ ms", stats), stats
        assert re.search(r"\d[\d,]* tokens \(\d[\d,]* reasoning\)", stats), stats
        assert tab.problems == []


async def test_stop_hangs_up_on_the_provider_and_keeps_the_partial_answer(
    serve: Serve, slow: tuple[SlowProvider, str], browser: Any
) -> None:
    provider, base_url = slow
    server = await serve(base_url=base_url, model="m")
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await streaming(page)
        await page.click("#stop")
        stopped_at = asyncio.get_running_loop().time()
        await answered(page)

        await asyncio.wait_for(provider.hung_up.wait(), 5)
        assert provider.hung_up_at is not None
        assert provider.hung_up_at - stopped_at < 2.0
        assert await page.locator("#messages article.assistant .status").inner_text() == "Stopped."
        partial = await page.locator("#messages article.assistant .answer").inner_text()
        assert partial.startswith("word0 word1 word2 word3")
        assert "word399" not in partial
        assert tab.problems == []


async def test_stop_before_the_answer_begins_reads_as_stopped(serve: Serve, fake: FakeProvider, browser: Any) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = answer("Too late.")
    stopped = asyncio.Event()

    async def held_until_stopped(route: Any) -> None:
        await stopped.wait()
        with contextlib.suppress(Exception):  # the page gave up on it
            await route.continue_()

    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await page.route("**/stream?format=ndjson", held_until_stopped)
        await ask(page, "Hi")
        await page.click("#stop")
        stopped.set()
        await answered(page)

        assert await page.locator("#messages article.assistant .status").inner_text() == "Stopped."
        [chat] = await stored_chats(page)
        assert chat["messages"][-1] == {
            "role": "assistant",
            "content": "",
            "reasoning": "",
            "thoughtSeconds": None,
            "stopped": True,
        }
        assert tab.problems == []


async def test_regenerate_asks_again_with_the_same_messages_and_replaces_the_answer(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = answer("First ", "answer.")
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "Say something")
        await answered(page)
        fake.reply = answer("Second ", "answer.")
        await page.get_by_role("button", name="Regenerate").click()
        await answered(page)

        assert len(fake.requests) == 2
        assert fake.requests[1]["messages"] == fake.requests[0]["messages"]
        assert await page.locator("#messages article.assistant .answer").all_inner_texts() == ["Second answer."]
        assert tab.problems == []


# --- Conversations and settings -------------------------------------------------------------


async def test_history_survives_a_reload_and_chats_can_be_added_and_deleted(serve: Serve, browser: Any) -> None:
    server = await serve()
    question = "Remember this question"
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, question)
        await answered(page)
        await page.reload()
        await ready(page)

        assert await page.locator("#chat-list .chat-open").all_inner_texts() == [question]
        assert await page.locator("#chat-title").inner_text() == question
        assert await page.locator("#messages article.user .bubble").all_inner_texts() == [question]
        assert await page.locator("#messages article.assistant .answer table").count() == 1

        await page.click("#new-chat")
        assert await page.locator("#messages article").count() == 0
        assert await page.locator("#empty").is_visible()
        assert await page.locator("#chat-list .chat-open").all_inner_texts() == ["New chat", question]

        await page.get_by_role("button", name=f"Delete “{question}”").click()
        assert await page.locator("#chat-list .chat-open").all_inner_texts() == ["New chat"]
        assert all(chat["title"] != question for chat in await stored_chats(page))
        assert tab.problems == []


async def test_a_conversation_deleted_while_its_answer_streams_stays_deleted(
    serve: Serve, slow: tuple[SlowProvider, str], browser: Any
) -> None:
    provider, base_url = slow
    server = await serve(base_url=base_url, model="m")
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await streaming(page)
        await page.get_by_role("button", name="Delete “Count slowly”").click()
        await asyncio.wait_for(provider.hung_up.wait(), 5)
        await page.wait_for_selector("#stop", state="hidden", timeout=WAIT)

        assert await stored_chats(page) == []
        await page.reload()
        await ready(page)
        assert await page.locator("#chat-list .chat-open").all_inner_texts() == ["New chat"]
        assert tab.problems == []


async def test_settings_persist_across_a_reload_and_are_sent(serve: Serve, fake: FakeProvider, browser: Any) -> None:
    server = await serve(base_url=fake.base_url, model="m", models=("other-model",))
    fake.reply = answer("Fine.")
    system = "Answer in one word."
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await page.click("#open-settings")
        await page.select_option("#model", "other-model")
        await page.fill("#system", system)
        await page.fill("#temperature", "0.3")
        await page.click("#settings-dialog button[value=save]")
        await page.reload()
        await page.wait_for_selector('#model option[value="other-model"]', state="attached", timeout=WAIT)

        await page.click("#open-settings")
        assert await page.input_value("#model") == "other-model"
        assert await page.input_value("#system") == system
        assert await page.input_value("#temperature") == "0.3"
        await page.click("#settings-dialog button[value=cancel]")
        await ask(page, "How are you?")
        await answered(page)

        [sent] = fake.requests
        assert sent["model"] == "other-model"
        assert sent["messages"][0] == {"role": "system", "content": system}
        assert sent["temperature"] == 0.3
        assert tab.problems == []


async def test_edit_puts_the_last_question_back_and_removes_its_exchange(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = answer("An answer.")
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "Wht is 2 + 2?")
        await answered(page)
        await page.get_by_role("button", name="Edit").click()

        assert await page.input_value("#prompt") == "Wht is 2 + 2?"
        assert await page.locator("#messages article").count() == 0
        await ask(page, "What is 2 + 2?")
        await answered(page)
        assert fake.requests[1]["messages"] == [{"role": "user", "content": "What is 2 + 2?"}]
        assert await page.locator("#messages article.user .bubble").all_inner_texts() == ["What is 2 + 2?"]
        assert tab.problems == []


# --- A dropped connection ---------------------------------------------------------------------


class CuttingProxy:
    """A TCP proxy in front of the relay that cuts one connection mid-answer.

    The first connection that carries ``POST /stream`` is closed on both sides
    once ``cut_after`` bytes of its answer went through; everything else is
    forwarded as it is.
    """

    def __init__(self, port: int, cut_after: int = 2048) -> None:
        self.port = port
        self.cut_after = cut_after
        self.cut = False
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for transport in self._transports:
            transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _connection(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        relay_reader, relay_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._transports |= {client_writer.transport, relay_writer.transport}
        victim = asyncio.Event()

        async def upstream() -> None:
            while data := await client_reader.read(65536):
                if not self.cut and b"POST /stream" in data:
                    self.cut = True
                    victim.set()
                relay_writer.write(data)
                await relay_writer.drain()

        async def downstream() -> None:
            forwarded = 0
            while data := await relay_reader.read(65536):
                client_writer.write(data)
                await client_writer.drain()
                if victim.is_set():
                    forwarded += len(data)
                    if forwarded >= self.cut_after:
                        break

        try:
            tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
            # Either side ending (or the cut) ends the connection.
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            client_writer.transport.abort()
            relay_writer.transport.abort()
            self._transports -= {client_writer.transport, relay_writer.transport}


async def test_a_dropped_connection_resumes_with_the_whole_answer_exactly_once(serve: Serve, browser: Any) -> None:
    app = create_app(Config(demo_delay=0.01, demo_tokens=300))
    seen = record_requests(app)
    server = await serve(app)
    assert server.port is not None
    proxy = CuttingProxy(server.port)
    port = await proxy.start()
    question = "Tell me a long story"
    reasoning, expected = demo_answer(question, 300)
    try:
        async with opened(browser, f"http://127.0.0.1:{port}/") as tab:
            page = tab.page
            await ask(page, question)
            await answered(page)

            assert proxy.cut
            [chat] = await stored_chats(page)
            [_, stored] = chat["messages"]
            assert "error" not in stored
            assert stored["reasoning"] == reasoning
            assert stored["content"] == expected
            shown = await page.locator("#messages article.assistant .answer").inner_text()
            assert shown.count("A demo answer") == 1
            assert re.findall(r"Paragraph \d+", shown) == re.findall(r"Paragraph \d+", expected)

            starts = [s for s in seen if s.method == "POST" and s.path_qs.startswith("/stream")]
            resumes = [s for s in seen if s.method == "GET" and s.path_qs.startswith("/stream/")]
            to_the_demo = [s for s in seen if s.path_qs == "/demo/v1/chat/completions"]
            assert len(starts) == 1
            assert len(resumes) >= 1
            assert len(to_the_demo) == 1
            registry = app[streams_key].metrics.registry
            assert registry.get_sample_value("thinkstream_streams_total", {"outcome": "done"}) == 1
            # Chromium reports the cut body read; nothing else may go wrong.
            assert [p for p in tab.problems if "net::ERR_" not in p] == []
    finally:
        await proxy.close()


async def test_a_resume_the_server_is_too_busy_for_is_tried_again_after_its_retry_after(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = answer("one ", "two ", "three")
    loop = asyncio.get_running_loop()
    resumes: list[float] = []

    async def cut_after_meta(route: Any) -> None:
        # The relay's whole answer, of which only the first event reaches the page: the connection drops.
        response = await route.fetch()
        meta = (await response.text()).split("\n")[0]
        await route.fulfill(status=200, headers={"Content-Type": "application/x-ndjson"}, body=meta + "\n")

    async def busy_once(route: Any) -> None:
        resumes.append(loop.time())
        if len(resumes) == 1:
            await route.fulfill(status=503, headers={"Retry-After": "2"}, body="<html>Busy</html>")
        else:
            await route.continue_()

    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await page.route("**/stream?format=ndjson", cut_after_meta)
        await page.route(lambda url: "/stream/" in url and "last_event_id" in url, busy_once)
        await ask(page, "Count")
        await answered(page)

        assert await page.locator("#messages article.assistant .answer").inner_text() == "one two three"
        assert await page.locator("#messages article.assistant .status").is_hidden()
        assert len(resumes) == 2 and resumes[1] - resumes[0] >= 1.9
        # Chromium reports the 503 itself; nothing else may go wrong.
        assert [p for p in tab.problems if "status of 503" not in p] == []


# --- Safety ----------------------------------------------------------------------------------

HOSTILE = [
    "Here is <scr",
    "ipt>window.__pwned = 1</scr",
    "ipt> and <img src=x onerr",
    'or="window.__pwned=2"> and ',
    "[click me](javascr",
    "ipt:window.__pwned=3) and ",
    '<a href="javascript:window.__pwned=4">raw</a> and ',
    '<iframe srcdoc="<script>parent.__pwned=5</script>"></iframe>',
    "\n\n<script>window.__pwned = 6</script>\n\n",
    "<javascript:window.__pwned=7> and [a fine link](https://example.invalid/ok)\n",
]


async def test_model_output_cannot_run_script(serve: Serve, fake: FakeProvider, browser: Any) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = answer(*HOSTILE)
    origin = str(server.make_url("/"))
    async with opened(browser, origin) as tab:
        page = tab.page
        # Links open in new tabs: keep those tabs off the network.
        await page.context.route(lambda url: not url.startswith(origin), lambda route: route.abort())
        await ask(page, "Show me some HTML")
        await answered(page)

        body = page.locator("#messages article.assistant .answer")
        for link in await body.locator("a").all():
            await link.click()
        await page.wait_for_timeout(300)

        assert await page.evaluate("() => typeof window.__pwned") == "undefined"
        dangerous = 'script, iframe, object, embed, [onerror], [srcdoc], a[href^="javascript:" i]'
        assert await page.locator("#messages").locator(dangerous).count() == 0
        assert "<script>window.__pwned = 1</script>" in await body.inner_text()
        assert tab.problems == []


async def test_an_image_from_another_origin_shows_as_a_link_to_it(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = answer("![A chart](https://example.invalid/chart.png)\n\n", "After.\n")
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "Draw it")
        await answered(page)

        body = page.locator("#messages article.assistant .answer")
        assert await body.locator("img").count() == 0
        link = body.locator("a")
        assert await link.get_attribute("href") == "https://example.invalid/chart.png"
        assert await link.inner_text() == "A chart"
        assert await link.get_attribute("rel") == "noopener noreferrer"
        # The CSP would refuse the image: no request, so no violation.
        assert tab.problems == []


async def test_an_image_of_the_pages_own_origin_shows_as_a_link_and_asks_the_relay_nothing(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    # What a prompt injection would write to start answers in the user's name.
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = answer("![Chart](stream?prompt=spend)\n\n", "After.\n")
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "Draw it")
        await answered(page)
        await page.wait_for_timeout(300)

        body = page.locator("#messages article.assistant .answer")
        assert await body.locator("img").count() == 0
        assert await body.locator("a").inner_text() == "Chart"
        assert len(fake.requests) == 1, "only the question was asked"
        assert tab.problems == []


async def test_a_tables_column_alignment_holds_without_an_inline_style(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = answer("| Left | Centre | Right |\n|:---|:---:|---:|\n| a | b | c |\n")
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "A table")
        await answered(page)

        cells = page.locator("#messages .answer td")
        assert await cells.evaluate_all("(cells) => cells.map((c) => getComputedStyle(c).textAlign)") == [
            "left",
            "center",
            "right",
        ]
        assert await page.locator("#messages .answer [style]").count() == 0
        # The CSP would have blocked a style attribute, and said so in the console.
        assert tab.problems == []


async def test_user_text_with_html_is_shown_as_text(serve: Serve, fake: FakeProvider, browser: Any) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = answer("Noted.")
    question = '<b>bold</b> <img src=x onerror="window.__pwned=1">'
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, question)
        await answered(page)

        bubble = page.locator("#messages article.user .bubble")
        assert await bubble.inner_text() == question
        assert await bubble.locator("*").count() == 0
        assert await page.evaluate("() => typeof window.__pwned") == "undefined"
        assert tab.problems == []


ATTACK = """<!doctype html><title>Free prizes</title>
<iframe name="sink"></iframe>
<form id="form" method="post" enctype="text/plain" target="sink" action="RELAY/stream">
  <input name='{"messages": [{"role": "user", "content": "spent' value='"}]}'>
</form>
<img id="img" src="RELAY/stream?prompt=spent" onerror="window.imageTried = true">
<script>
  document.getElementById("form").submit();
  window.fetchTried = fetch("RELAY/stream", {
    method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
    body: JSON.stringify({messages: [{role: "user", content: "spent"}]}),
  }).then(() => true, () => true);
</script>
"""


async def test_a_page_of_another_origin_cannot_start_a_generation(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    # What any site the operator visits could do to a relay on loopback: requests a browser sends without a
    # CORS preflight, so without asking the relay first.
    fake.reply = answer("Spent.")
    relay = create_app(Config(base_url=fake.base_url, model="m"))
    seen = record_requests(relay)
    relay_url = str((await serve(relay)).make_url("")).rstrip("/")

    async def attack(request: web.Request) -> web.Response:
        return web.Response(text=ATTACK.replace("RELAY", relay_url), content_type="text/html")

    site = web.Application()
    site.router.add_get("/", attack)
    attacker = await serve(site)
    page = await browser.new_page()
    try:
        await page.goto(str(attacker.make_url("/")))
        await page.wait_for_function("() => window.imageTried", timeout=WAIT)
        assert await page.evaluate("() => window.fetchTried")
        await eventually(lambda: len([s for s in seen if s.path_qs.startswith("/stream")]) == 3, "all three tries")
        # Time for a generation the relay might have started to reach the provider.
        await asyncio.sleep(0.5)
    finally:
        await page.close()

    assert fake.requests == []


# --- Errors ------------------------------------------------------------------------------------


async def test_a_provider_error_is_told_in_plain_words_and_retry_answers(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = Reply.error(
        429, {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}
    )
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "Hello?")
        await answered(page)

        status = page.locator("#messages article.assistant .status")
        assert "rate limiting" in await status.inner_text()
        assert await status.get_attribute("role") == "alert"
        fake.reply = answer("Hello!")
        await page.get_by_role("button", name="Retry").click()
        await answered(page)

        assert await page.locator("#messages article.assistant .answer").all_inner_texts() == ["Hello!"]
        assert await page.locator("#messages article.assistant .status").is_hidden()
        # The failed answer is not part of the conversation the model sees.
        assert fake.requests[1]["messages"] == [{"role": "user", "content": "Hello?"}]
        assert tab.problems == []


async def test_a_question_whose_answer_failed_is_left_out_of_the_next_request(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    server = await serve(base_url=fake.base_url, model="m", upstream_retries=0)
    fake.script = [answer("Hello!"), Reply.error(400, {"error": {"message": "Bad request"}})]
    fake.reply = answer("Fine.")
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "Hi")
        await answered(page)
        await ask(page, "A question that fails")
        await answered(page, 2)
        await ask(page, "Another question")
        await answered(page, 3)

        # Questions and answers in turn, as the model expects them.
        assert fake.requests[-1]["messages"] == [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Another question"},
        ]
        assert tab.problems == []


async def test_an_error_code_the_page_does_not_know_is_told_by_its_message(
    serve: Serve, browser: Any, tmp_path: Path
) -> None:
    server = await serve()
    messages = [
        {"role": "user", "content": "Hello?"},
        # A code named like a property every object has.
        {"role": "assistant", "content": "", "error": {"code": "constructor", "message": "Something odd."}},
    ]
    conversation = {"id": "c", "title": "Odd error", "updated": 1, "messages": messages}
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"thinkstream": "conversation", "version": 1, "conversation": conversation}))
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await page.set_input_files("#import-file", str(path))
        await answered(page)

        assert await page.locator("#messages article.assistant .status").inner_text() == "Something odd."
        assert tab.problems == []


# --- Deployment -----------------------------------------------------------------------------


async def test_the_page_asks_for_a_token_and_sends_it_as_a_bearer_header(serve: Serve, browser: Any) -> None:
    app = create_app(Config(demo_delay=0.0, tokens=("secret-token",)))
    seen = record_requests(app)
    server = await serve(app)
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        urls: list[str] = []
        page.on("request", lambda request: urls.append(request.url))
        await page.wait_for_selector("#token-dialog[open]", timeout=WAIT)
        await page.fill("#token", "secret-token")
        await page.click("#token-dialog button[value=save]")
        await ask(page, "Am I in?")
        await answered(page)

        assert await page.locator("#messages article.assistant .answer table").count() == 1
        [start] = [s for s in seen if s.method == "POST" and s.path_qs.startswith("/stream")]
        assert start.authorization == "Bearer secret-token"
        assert not any("secret-token" in s.path_qs for s in seen)
        assert not any("secret-token" in url for url in urls)
        # Only the first model list, asked for before the token was known, may fail.
        assert [p for p in tab.problems if "status of 401" not in p] == []


async def test_the_page_works_under_a_sub_path(serve: Serve, browser: Any) -> None:
    parent = web.Application()
    parent.add_subapp("/chat/", create_app(Config(demo_delay=0.0)))
    server = await serve(parent)
    async with opened(browser, str(server.make_url("/chat/"))) as tab:
        page = tab.page
        await ask(page, "Where am I mounted?")
        await answered(page)

        assert await page.locator("#messages article.assistant .answer table").count() == 1
        assert await page.locator("#messages article.assistant .status").is_hidden()
        assert tab.problems == []


# --- Performance --------------------------------------------------------------------------------


async def long_tasks_while_answering(page: Any, question: str) -> list[int]:
    """Ask on a settled page and return the main thread's tasks over 50 ms (in ms) until the answer is shown."""
    # Measure streaming on a settled page, not the page's own start-up work.
    await page.wait_for_selector("html[data-warm]", state="attached", timeout=WAIT)
    await page.evaluate(
        """() => {
            window.__longTasks = [];
            window.__sentAt = performance.now();
            new PerformanceObserver((list) => window.__longTasks.push(...list.getEntries().map(
                (e) => ({start: e.startTime, duration: e.duration})
            ))).observe({type: "longtask", buffered: true});
        }"""
    )
    await ask(page, question)
    await answered(page)
    # Long tasks are reported after they end: give the last one a moment to arrive.
    await page.wait_for_timeout(200)
    # Buffered entries include the page's own loading, which is not what this measures.
    tasks = await page.evaluate("() => window.__longTasks.filter((t) => t.start >= window.__sentAt)")
    return sorted(round(t["duration"]) for t in tasks)


async def test_a_20000_token_answer_streams_without_long_tasks(serve: Serve, browser: Any) -> None:
    # 2,000 tokens a second, as fast as the fastest providers stream. (Unpaced, the relay and the demo
    # in this process take a whole core of the 2-core test machine, and then the scheduler, not the
    # page, decides whether a task now and then crosses 50 ms.)
    server = await serve(demo_delay=0.0005, demo_tokens=20_000)
    async with opened(browser, str(server.make_url("/"))) as tab:
        durations = await long_tasks_while_answering(tab.page, "Write at length")

        assert max(durations, default=0) <= 50, f"long tasks while streaming (ms): {durations}"
        assert tab.problems == []


def prose_with_math(paragraphs: int) -> str:
    """About 50 words a paragraph, each with two inline formulas; every fifth ends with a display formula."""
    out = []
    for i in range(paragraphs):
        words = " ".join(f"word{i}x{j}" for j in range(40))
        text = f"Step {i}: the value $x_{{{i}}} + y_{{{i}}}^2$ grows as \\(\\frac{{{i}}}{{n + {i}}}\\) while {words}."
        if i % 5 == 4:
            text += f"\n\n$$\\sum_{{k=1}}^{{{i}}} k = \\frac{{{i}({i}+1)}}{{2}} = {i * (i + 1) // 2}$$"
        out.append(text)
    return "\n\n".join(out) + "\n"


async def test_a_20000_word_answer_with_math_streams_without_long_tasks(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    text = prose_with_math(400)
    words = re.findall(r"\s*\S+", text)
    assert len(words) >= 20_000
    # Ten words a delta, 200 deltas a second: 2,000 words a second, as in the test above.
    deltas = ["".join(words[i : i + 10]) for i in range(0, len(words), 10)]
    fake.reply = paced([*(chunk(content=d) for d in deltas), chunk(finish="stop"), "[DONE]"], delay=0.005)
    server = await serve(base_url=fake.base_url, model="m")
    async with opened(browser, str(server.make_url("/"))) as tab:
        durations = await long_tasks_while_answering(tab.page, "Prove it at length")

        assert max(durations, default=0) <= 50, f"long tasks while streaming (ms): {durations}"
        formulas = await tab.page.locator("#messages .answer .katex").count()
        assert formulas == 400 * 2 + 400 // 5
        assert tab.problems == []


# --- Keyboard -------------------------------------------------------------------------------------


async def test_shift_enter_inserts_a_newline_without_sending(serve: Serve, fake: FakeProvider, browser: Any) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await page.type("#prompt", "first line")
        await page.press("#prompt", "Shift+Enter")
        await page.type("#prompt", "second line")
        await page.wait_for_timeout(300)

        assert await page.input_value("#prompt") == "first line\nsecond line"
        assert await page.locator("#messages article").count() == 0
        assert fake.requests == []
        assert tab.problems == []


async def test_enter_sends_the_message_as_written(serve: Serve, fake: FakeProvider, browser: Any) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = answer("Two lines received.")
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await page.type("#prompt", "first line")
        await page.press("#prompt", "Shift+Enter")
        await page.type("#prompt", "second line")
        await page.press("#prompt", "Enter")
        await answered(page)

        assert await page.input_value("#prompt") == ""
        assert fake.requests[0]["messages"] == [{"role": "user", "content": "first line\nsecond line"}]
        assert await page.locator("#messages article.user .bubble").inner_text() == "first line\nsecond line"
        assert tab.problems == []


async def test_escape_stops_a_streaming_answer(serve: Serve, slow: tuple[SlowProvider, str], browser: Any) -> None:
    provider, base_url = slow
    server = await serve(base_url=base_url, model="m")
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await streaming(page)
        await page.keyboard.press("Escape")
        await answered(page)

        assert await page.locator("#messages article.assistant .status").inner_text() == "Stopped."
        await asyncio.wait_for(provider.hung_up.wait(), 5)
        assert tab.problems == []


async def test_a_stop_whose_cancel_request_fails_still_stops_the_answer(
    serve: Serve, slow: tuple[SlowProvider, str], browser: Any
) -> None:
    _, base_url = slow
    server = await serve(base_url=base_url, model="m")
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await page.route("**/cancel", lambda route: route.abort())  # as if offline
        await streaming(page)
        await page.click("#stop")
        await answered(page)
        await page.wait_for_timeout(300)  # for the cancel request to fail

        assert await page.locator("#messages article.assistant .status").inner_text() == "Stopped."
        # Chromium reports the failed request itself; nothing else may go wrong.
        assert [p for p in tab.problems if "net::ERR_FAILED" not in p] == []


# --- Copying, announcing, themes -------------------------------------------------------------------

CLIPBOARD = {"permissions": ["clipboard-read", "clipboard-write"]}


async def test_copy_puts_the_answers_markdown_and_a_code_blocks_text_on_the_clipboard(
    serve: Serve, browser: Any
) -> None:
    server = await serve()
    async with opened(browser, str(server.make_url("/")), **CLIPBOARD) as tab:
        page = tab.page
        await ask(page, "Copy me")
        await answered(page)

        await page.click("#messages article.assistant .actions .copy")
        answer = await page.evaluate("() => navigator.clipboard.readText()")
        await page.click("#messages article.assistant pre .copy-code")
        code = await page.evaluate("() => navigator.clipboard.readText()")

        assert answer == demo_answer("Copy me")[1], "the whole answer, as markdown"
        assert code == await page.locator("#messages article.assistant pre code").text_content()
        assert code.strip() and "```" not in code
        assert tab.problems == []


async def test_a_finished_answer_is_announced_to_screen_readers(serve: Serve, browser: Any, fake: FakeProvider) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        log = page.locator("#messages")
        assert (await log.get_attribute("role"), await log.get_attribute("aria-live")) == ("log", "polite")

        fake.reply = answer("Fine.")
        await ask(page, "Hello")
        await answered(page)
        await page.wait_for_function("() => document.getElementById('announcer').textContent !== ''")
        assert await page.locator("#announcer").text_content() == "Answer complete."

        fake.reply = Reply.error(429, {"error": {"message": "slow down", "type": "rate_limit"}})
        await ask(page, "Again")
        await answered(page, 2)
        await page.wait_for_function("() => document.getElementById('announcer').textContent.startsWith('Error')")
        assert "rate limiting" in (await page.locator("#announcer").text_content() or "")


async def test_the_page_follows_the_systems_light_or_dark_theme(serve: Serve, browser: Any) -> None:
    server = await serve()
    backgrounds = {}
    for scheme in ("light", "dark"):
        async with opened(browser, str(server.make_url("/")), color_scheme=scheme) as tab:
            backgrounds[scheme] = await tab.page.evaluate(
                "() => getComputedStyle(document.body).backgroundColor.match(/\\d+/g).slice(0, 3).map(Number)"
            )

    assert sum(backgrounds["light"]) > 600, backgrounds
    assert sum(backgrounds["dark"]) < 150, backgrounds


# --- Layout and incomplete markdown ----------------------------------------------------------------

PHONE = {"width": 390, "height": 844}


@pytest.mark.parametrize("viewport", [{"width": 1200, "height": 800}, PHONE], ids=["desktop", "phone"])
async def test_the_message_box_stays_on_screen_below_a_long_answer(
    serve: Serve, browser: Any, viewport: dict[str, int]
) -> None:
    server = await serve(demo_tokens=600)
    async with opened(browser, str(server.make_url("/")), viewport=viewport) as tab:
        page = tab.page
        await ask(page, "A long one")
        await answered(page)

        box = await page.locator("#prompt").bounding_box()
        assert box is not None
        assert box["y"] >= 0 and box["y"] + box["height"] <= viewport["height"], "the composer scrolled away"
        assert await page.evaluate("() => document.scrollingElement.scrollHeight <= innerHeight + 1")
        assert tab.problems == []


async def test_on_a_phone_the_chat_list_opens_and_closes(serve: Serve, browser: Any) -> None:
    server = await serve()
    async with opened(browser, str(server.make_url("/")), viewport=PHONE) as tab:
        page = tab.page
        toggle = page.locator("#toggle-sidebar")
        await toggle.click()
        assert await toggle.get_attribute("aria-expanded") == "true"
        await page.keyboard.press("Escape")
        assert await toggle.get_attribute("aria-expanded") == "false"
        await toggle.click()
        await page.mouse.click(PHONE["width"] - 20, PHONE["height"] // 2)
        assert await toggle.get_attribute("aria-expanded") == "false"
        assert tab.problems == []


async def test_on_a_phone_the_closed_chat_list_is_out_of_the_tab_order(serve: Serve, browser: Any) -> None:
    server = await serve()
    async with opened(browser, str(server.make_url("/")), viewport=PHONE) as tab:
        page = tab.page
        before_toggle = "() => document.activeElement.id || document.activeElement.className"
        # The chat list comes between the skip link and the button that opens it.
        await page.focus("#toggle-sidebar")
        await page.keyboard.press("Shift+Tab")
        assert await page.evaluate(before_toggle) == "skip"

        await page.focus("#prompt")  # the focused skip link covers the button
        await page.click("#toggle-sidebar")
        await page.locator("#sidebar").wait_for(state="visible", timeout=WAIT)
        await page.keyboard.press("Shift+Tab")
        assert await page.evaluate(before_toggle) == "import"
        assert tab.problems == []


# Each step is the answer so far; none may show a table's pipes as a paragraph or lose text.
GROWING_TABLE = ["Before.\n\n| a | b", "Before.\n\n| a | b |\n|--", "Before.\n\n| a | b |\n|---|---|\n| 1 | 2 |"]


async def test_half_a_table_is_held_back_until_its_delimiter_row_arrives(serve: Serve, browser: Any) -> None:
    server = await serve()
    async with opened(browser, str(server.make_url("/"))) as tab:
        shown = await tab.page.evaluate(
            LIVE_MARKDOWN
            + """
                const seen = [];
                let sent = "";
                for (const step of argument) {
                    live.append(step.slice(sent.length));
                    sent = step;
                    await twoFrames();
                    seen.push({ text: box.textContent, tables: box.querySelectorAll("table").length });
                }
                return seen;
            }""",
            GROWING_TABLE,
        )

    assert [step["tables"] for step in shown] == [0, 0, 1]
    assert all("|" not in step["text"] for step in shown), shown
    assert all(step["text"].startswith("Before.") for step in shown)


async def test_an_open_code_fence_renders_as_code_while_it_streams(serve: Serve, browser: Any) -> None:
    server = await serve()
    async with opened(browser, str(server.make_url("/"))) as tab:
        shown = await tab.page.evaluate(
            LIVE_MARKDOWN
            + """
                live.append("Code:\\n\\n```python\\ndef f():\\n\\n    return 1\\n");
                await twoFrames();
                return { code: box.querySelector("pre code")?.textContent, fences: box.textContent.includes("```") };
            }"""
        )

    assert shown == {"code": "def f():\n\n    return 1\n", "fences": False}


# A code block in a list in a list, with a blank line in it, as a model writes one.
NESTED_FENCE = (
    "1. Install:\n"
    "   - With pip:\n"
    "     ```bash\n"
    "     python -m venv .venv\n"
    "\n"
    "     .venv/bin/pip install thinkstream\n"
    "     ```\n"
    "   - Done.\n"
    "2. Run it.\n"
)


async def test_a_code_block_in_a_nested_list_stays_whole_while_it_streams(serve: Serve, browser: Any) -> None:
    server = await serve()
    async with opened(browser, str(server.make_url("/"))) as tab:
        code = await tab.page.evaluate(
            LIVE_MARKDOWN
            + """
                for (const line of argument.split(/(?<=\\n)/)) {
                    live.append(line);
                    await twoFrames();
                }
                await new Promise((resolve) => live.finish(resolve));
                return [...box.querySelectorAll("pre code")].map((code) => code.textContent);
            }""",
            NESTED_FENCE,
        )

    assert code == ["python -m venv .venv\n\n.venv/bin/pip install thinkstream\n"]


# --- The README's picture ------------------------------------------------------------------------

SCREENSHOT = ROOT / "docs" / "screenshot.png"


# A reasoning model's answer to a question with numbers in it: markdown and math in its thinking,
# then an answer with inline and display math, a table and code.
PICTURE_THINKING = (
    "The ball starts at rest, so **only gravity** acts (no air resistance at this height):\n\n"
    "- distance: $h = \\tfrac{1}{2} g t^2$\n"
    "- so $t = \\sqrt{2h/g}$, with $g \\approx 9.81\\,\\text{m/s}^2$\n\n"
    "For $h = 20$ m that is about 2 s. I'll show the formula, a few heights, and code."
)
PICTURE_ANSWER = (
    "## Time to fall 20 m\n\n"
    "Starting from rest, the distance fallen after \\(t\\) seconds is \\(h = \\tfrac{1}{2} g t^2\\), so\n\n"
    "$$t = \\sqrt{\\frac{2h}{g}} = \\sqrt{\\frac{2 \\cdot 20\\,\\text{m}}{9.81\\,\\text{m/s}^2}}"
    " \\approx 2.02\\,\\text{s}$$\n\n"
    "The mass (1 kg) does not appear: every object falls alike without air resistance.\n\n"
    "| Height | Time | Speed at the ground |\n|---:|---:|---:|\n"
    "| 5 m | 1.01 s | 9.9 m/s |\n| 20 m | 2.02 s | 19.8 m/s |\n| 80 m | 4.04 s | 39.6 m/s |\n\n"
    "```python\nfrom math import sqrt\n\ndef fall_time(height_m: float, g: float = 9.81) -> float:\n"
    "    return sqrt(2 * height_m / g)\n```\n"
)


def words_of(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text)


@pytest.mark.skipif(not os.environ.get("THINKSTREAM_SCREENSHOT"), reason="set THINKSTREAM_SCREENSHOT=1 to redraw it")
async def test_screenshot_for_the_readme(serve: Serve, fake: FakeProvider, browser: Any) -> None:
    usage = {"prompt_tokens": 24, "completion_tokens": 312, "total_tokens": 336, "reasoning_tokens": 96}
    events = [
        *(chunk(reasoning=w) for w in words_of(PICTURE_THINKING)),
        *(chunk(content=w) for w in words_of(PICTURE_ANSWER)),
        chunk(finish="stop"),
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m", "choices": [], "usage": usage},
        "[DONE]",
    ]
    # Paced like a real model, so the thinking time and the rate in the picture look like one.
    fake.reply = paced(events, delay=0.02)
    server = await serve(base_url=fake.base_url, model="deepseek-reasoner")
    viewport = {"width": 1200, "height": 800}
    async with opened(browser, str(server.make_url("/")), viewport=viewport) as tab:
        page = tab.page
        await ask(page, "How long does a 1 kg ball take to fall 20 m?")
        await answered(page)
        # Open the thinking panel, to show its markdown and math too.
        await page.click("#messages details.thinking summary")
        await page.evaluate("() => document.fonts.ready")
        # From the question down: the thinking panel, the answer and the message box.
        await page.evaluate("() => { document.getElementById('messages').scrollTop = 0; }")
        Path(SCREENSHOT).parent.mkdir(exist_ok=True)
        await page.screenshot(path=str(SCREENSHOT))
        assert tab.problems == []
