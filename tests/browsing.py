"""Driving the chat page in Chromium: open it, ask, wait for answers, read what it keeps."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestServer
from helpers import Reply, chunk, sse

from handlers.provider.demo import demo_tokens

# Milliseconds: generous, because Chromium, the relay and the test share two cores.
WAIT = 20_000

Serve = Callable[..., Awaitable[TestServer]]


def answer(*pieces: str) -> Reply:
    """A complete streamed answer, one content delta per piece."""
    return Reply(body=sse(*(chunk(content=p) for p in pieces), chunk(finish="stop"), "[DONE]"))


def paced(events: list[Any], delay: float) -> Reply:
    """A provider stream that writes each event on its own, ``delay`` seconds apart."""
    pieces = [sse(e) for e in events]
    return Reply(body=b"".join(pieces), chunks=[len(p) for p in pieces], delay=delay)


def demo_answer(prompt: str, length: int = 0) -> tuple[str, str]:
    reasoning, tokens = demo_tokens(prompt, length)
    return "".join(reasoning), "".join(tokens)


@dataclass
class Tab:
    """A page and what went wrong on it."""

    page: Any
    problems: list[str]


@contextlib.asynccontextmanager
async def opened(browser: Any, url: str, **context: Any) -> AsyncIterator[Tab]:
    """A fresh page on ``url``, once the page's script has loaded the model list."""
    page = await browser.new_page(**context)
    problems: list[str] = []
    page.on("console", lambda message: message.type == "error" and problems.append(f"console: {message.text}"))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    try:
        await page.goto(url)
        await ready(page)
        yield Tab(page, problems)
    finally:
        await page.close()


async def ready(page: Any) -> None:
    """Wait until the page has its model list and shows its stored conversations."""
    await page.wait_for_selector("#model option", state="attached", timeout=WAIT)
    await page.wait_for_selector("html[data-history]", state="attached", timeout=WAIT)


async def ask(page: Any, text: str) -> None:
    await page.fill("#prompt", text)
    await page.press("#prompt", "Enter")


async def answered(page: Any, count: int = 1) -> None:
    """Wait until ``count`` assistant answers are shown and none is still streaming."""
    await page.wait_for_function(
        """(count) => {
            const answers = document.querySelectorAll("#messages article.assistant");
            return answers.length === count
                && [...answers].every((a) => a.getAttribute("aria-busy") === "false")
                && document.getElementById("stop").hidden;
        }""",
        arg=count,
        timeout=WAIT,
    )


async def chats_listed(page: Any, titles: list[str]) -> None:
    """Wait until the chat list shows exactly ``titles``, in order (a search answers in its own time)."""
    await page.wait_for_function(
        """(titles) => JSON.stringify(
            [...document.querySelectorAll("#chat-list .chat-open")].map((chat) => chat.textContent)
        ) === JSON.stringify(titles)""",
        arg=titles,
        timeout=WAIT,
    )


async def stored_chats(page: Any) -> list[dict[str, Any]]:
    """The conversations the page keeps in IndexedDB, whole, oldest first (call once the page is ready)."""
    chats: list[dict[str, Any]] = await page.evaluate(
        """async () => {
            const db = await new Promise((resolve, reject) => {
                const request = indexedDB.open(`thinkstream:${location.pathname}`);
                request.onsuccess = () => resolve(request.result);
                request.onerror = () => reject(request.error);
            });
            const all = (name) => new Promise((resolve, reject) => {
                const request = db.transaction(name).objectStore(name).getAll();
                request.onsuccess = () => resolve(request.result);
                request.onerror = () => reject(request.error);
            });
            const [heads, bodies] = [await all("chats"), await all("messages")];
            db.close();
            const messages = new Map(bodies.map((body) => [body.id, body.messages]));
            const chats = heads.map((head) => ({ ...head, messages: messages.get(head.id) }));
            return chats.sort((a, b) => a.updated - b.updated);
        }"""
    )
    return chats


# A LiveMarkdown in a fresh box of the page, and a wait until it has rendered.
LIVE_MARKDOWN = """async (argument) => {
    const { LiveMarkdown } = await import("./static/js/markdown.js");
    const box = document.createElement("div");
    document.body.append(box);
    const live = new LiveMarkdown(box);
    const twoFrames = () => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
"""
