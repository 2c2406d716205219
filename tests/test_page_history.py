"""Conversations kept in the browser, in a real browser: IndexedDB, the move from localStorage,
a storage that refuses or is full, export, import and search."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from browsing import WAIT, Serve, answer, answered, ask, chats_listed, opened, ready, stored_chats
from helpers import DATA, FakeProvider, Reply, chunk, sse

# localStorage as the previous page (before IndexedDB) left it at "/": two conversations, one
# with reasoning, math, a table and stats then a rate-limit error, one stopped early. Recorded by
# driving that page in Chromium against a fake provider.
OLD_PAGE_STORAGE: dict[str, str] = json.loads((DATA / "old-page-localstorage.json").read_text())
OLD_CHATS: list[dict[str, Any]] = json.loads(OLD_PAGE_STORAGE["thinkstream:/:chats"])


async def fill_local_storage(page: Any, url: str, items: dict[str, str]) -> None:
    """Put ``items`` in the localStorage of ``url``'s origin before the page is opened there."""
    await page.goto(url + "healthz")
    await page.evaluate("(items) => { for (const [k, v] of Object.entries(items)) localStorage.setItem(k, v); }", items)


async def put_in_indexeddb(page: Any, chat: dict[str, Any]) -> None:
    """Store ``chat`` in the page's IndexedDB as it is, as another tab or an earlier version of the page would."""
    await page.evaluate(
        """async (chat) => {
            const db = await new Promise((resolve) => {
                const request = indexedDB.open(`thinkstream:${location.pathname}`);
                request.onsuccess = () => resolve(request.result);
            });
            const tx = db.transaction(["chats", "messages"], "readwrite");
            tx.objectStore("chats").put({ id: chat.id, title: chat.title, updated: chat.updated });
            tx.objectStore("messages").put({ id: chat.id, messages: chat.messages });
            await new Promise((resolve) => (tx.oncomplete = resolve));
            db.close();
        }""",
        chat,
    )


async def test_conversations_the_old_page_kept_in_local_storage_move_to_indexeddb_once(
    serve: Serve, browser: Any
) -> None:
    server = await serve()
    url = str(server.make_url("/"))
    page = await browser.new_page()
    problems: list[str] = []
    # (The JSON page the storage is filled from has no icon, and Chromium asks for /favicon.ico.)
    page.on(
        "console",
        lambda m: m.type == "error" and not m.location["url"].endswith("/favicon.ico") and problems.append(m.text),
    )
    try:
        await fill_local_storage(page, url, OLD_PAGE_STORAGE)
        await page.goto(url)
        await ready(page)

        by_id = lambda chats: sorted(chats, key=lambda chat: chat["id"])  # noqa: E731
        assert by_id(await stored_chats(page)) == by_id(OLD_CHATS), "every conversation, exactly as it was"
        assert await page.evaluate("() => localStorage.getItem('thinkstream:/:chats')") is None
        assert await page.locator("#chat-list .chat-open").all_inner_texts() == [
            "Count slowly",
            "What is the area of a circle of radius 2?",
        ]
        # The latest is open, as the old page left it.
        assert await page.locator("#messages article.assistant .status").inner_text() == "Stopped."

        await page.get_by_role("button", name="What is the area of a circle of radius 2?", exact=True).click()
        await answered(page, 2)
        first = page.locator("#messages article.assistant").first
        assert await first.locator(".answer .katex").count() == 2
        assert await first.locator(".reasoning strong").text_content() == "area"
        assert await first.locator(".stats").inner_text() != ""
        assert "rate limiting" in await page.locator("#messages article.assistant .status.error").inner_text()

        # Once: a reload finds them in IndexedDB and nothing left to move, and nothing doubled.
        await page.reload()
        await ready(page)
        assert len(await stored_chats(page)) == 2
        assert await page.locator("#chat-list .chat-open").count() == 2
        assert problems == []
    finally:
        await page.close()


async def test_a_conversation_already_moved_by_another_tab_is_not_overwritten(serve: Serve, browser: Any) -> None:
    server = await serve()
    url = str(server.make_url("/"))
    async with opened(browser, url) as tab:
        page = tab.page
        [newer] = [{**OLD_CHATS[1], "title": "Renamed since"}]
        # As if another tab had moved it and the conversation went on there, while this old copy remained.
        await put_in_indexeddb(page, newer)
        await page.evaluate(
            "(items) => { for (const [k, v] of Object.entries(items)) localStorage.setItem(k, v); }", OLD_PAGE_STORAGE
        )
        await page.reload()
        await ready(page)

        titles = sorted(chat["title"] for chat in await stored_chats(page))
        assert titles == ["Renamed since", "What is the area of a circle of radius 2?"]
        assert tab.problems == []


# What an older page may have left that this one cannot read: a thinking time as text, tool
# calls that are not a list, a message that is nothing at all.
ODD_MESSAGES: list[Any] = [
    {"role": "user", "content": "Why is the sky blue?"},
    {"role": "assistant", "content": "Rayleigh scattering.", "reasoning": "Light.", "thoughtSeconds": "1.5"},
    {"role": "assistant", "content": "More.", "toolCalls": {"name": "x"}},
    None,
]
ODD_MESSAGES_MENDED = [
    {"role": "user", "content": "Why is the sky blue?"},
    {"role": "assistant", "content": "Rayleigh scattering.", "reasoning": "Light."},
    {"role": "assistant", "content": "More."},
]


async def test_old_messages_the_page_cannot_read_move_without_what_it_cannot_read(serve: Serve, browser: Any) -> None:
    server = await serve()
    url = str(server.make_url("/"))
    old = [
        {"id": "fine", "title": "Fine", "updated": 1, "messages": [{"role": "user", "content": "Hello"}]},
        {"id": "odd", "title": "Odd", "updated": 2, "messages": ODD_MESSAGES},
    ]
    async with opened(browser, url) as tab:
        page = tab.page
        await page.evaluate("(chats) => localStorage.setItem('thinkstream:/:chats', chats)", json.dumps(old))
        await page.reload()
        await ready(page)

        stored = {chat["id"]: chat["messages"] for chat in await stored_chats(page)}
        assert stored == {"fine": old[0]["messages"], "odd": ODD_MESSAGES_MENDED}
        assert await page.locator("#chat-list .chat-open").all_inner_texts() == ["Odd", "Fine"]
        assert await page.locator("#messages article.assistant .answer").all_inner_texts() == [
            "Rayleigh scattering.",
            "More.",
        ]
        assert tab.problems == []


async def test_an_old_conversation_the_page_cannot_read_stays_in_local_storage(serve: Serve, browser: Any) -> None:
    server = await serve()
    url = str(server.make_url("/"))
    unreadable = {"id": "odd", "title": "Odd", "updated": 1, "messages": {"0": {"role": "user", "content": "Hi"}}}
    fine = {"id": "fine", "title": "Fine", "updated": 2, "messages": [{"role": "user", "content": "Hello"}]}
    old = [fine, unreadable]
    async with opened(browser, url) as tab:
        page = tab.page
        await page.evaluate("(chats) => localStorage.setItem('thinkstream:/:chats', chats)", json.dumps(old))
        for _ in range(2):  # and again, finding it there: nothing doubled
            await page.reload()
            await ready(page)

            assert [chat["id"] for chat in await stored_chats(page)] == ["fine"]
            left = await page.evaluate("() => localStorage.getItem('thinkstream:/:chats')")
            assert json.loads(left) == [unreadable]
        assert tab.problems == []


async def test_messages_an_earlier_version_moved_unchecked_still_show_and_are_searched(
    serve: Serve, browser: Any
) -> None:
    server = await serve()
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await put_in_indexeddb(page, {"id": "odd", "title": "Odd", "updated": 2, "messages": ODD_MESSAGES})
        sea = [{"role": "user", "content": "Waves and tides."}]
        await put_in_indexeddb(page, {"id": "sea", "title": "Sea", "updated": 1, "messages": sea})
        await page.reload()
        await ready(page)

        assert await page.locator("#messages article.assistant .answer").all_inner_texts() == [
            "Rayleigh scattering.",
            "More.",
        ]
        await page.fill("#search", "tides")  # read past the message that is nothing at all
        await chats_listed(page, ["Sea"])
        assert await page.locator("#chat-list .chat-open").all_inner_texts() == ["Sea"]
        assert tab.problems == []


async def test_when_the_browser_storage_is_full_the_page_says_so(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = answer("x" * 200_000)
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        cdp = await page.context.new_cdp_session(page)
        origin = str(server.make_url("/")).rstrip("/")
        await cdp.send("Storage.overrideQuotaForOrigin", {"origin": origin, "quotaSize": 50_000})
        await ask(page, "A long answer, please")
        await answered(page)

        notice = page.locator("#notice")
        await notice.wait_for(timeout=WAIT)
        assert await notice.get_attribute("role") == "alert"
        text = await notice.inner_text()
        assert "storage for this page is full" in text and "Export it" in text
        # The conversation is still on the page, to export.
        assert (await page.locator("#messages .answer").inner_text()).startswith("xxxx")
        assert tab.problems == []


async def test_when_the_browser_refuses_indexeddb_the_page_says_so_and_still_answers(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = answer("Still here.")
    context = await browser.new_context()
    # What a browser that blocks site storage answers.
    await context.add_init_script(
        "Object.defineProperty(window, 'indexedDB', { get() { throw new DOMException('denied', 'SecurityError'); } });"
    )
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        await page.goto(str(server.make_url("/")))
        await ready(page)
        assert "does not let the page store conversations" in await page.locator("#notice").inner_text()
        await ask(page, "Hello?")
        await answered(page)
        assert await page.locator("#messages .answer").inner_text() == "Still here."
        assert await page.locator("#chat-list .chat-open").all_inner_texts() == ["Hello?"]
        assert errors == []
    finally:
        await context.close()


RICH_ANSWER = Reply(
    body=sse(
        chunk(reasoning="Think of **Euler**: "),
        chunk(reasoning="$e^{i\\pi} + 1 = 0$."),
        chunk(content="The identity is\n\n$$e^{i\\pi} + 1 = 0$$\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"),
        chunk(finish="stop"),
        "[DONE]",
    )
)


async def export(page: Any, format: str) -> Any:
    """Export the open conversation from the page's menu; the download it gives."""
    await page.click("#export-menu summary")
    async with page.expect_download() as download:
        await page.click(f"#export-{format}")
    return await download.value


async def test_export_as_json_then_import_gives_back_the_same_conversation(
    serve: Serve, fake: FakeProvider, browser: Any, tmp_path: Path
) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = RICH_ANSWER
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "Euler's identity?")
        await answered(page)
        [original] = await stored_chats(page)

        download = await export(page, "json")
        assert download.suggested_filename == "Euler-s-identity.json"
        exported = tmp_path / download.suggested_filename
        await download.save_as(exported)
        data = json.loads(exported.read_text())
        assert (data["thinkstream"], data["version"]) == ("conversation", 1)

        await page.get_by_role("button", name="Delete “Euler's identity?”").click()
        await page.wait_for_function("() => !document.querySelector('#messages article')")
        assert await stored_chats(page) == []
        await page.set_input_files("#import-file", str(exported))
        await answered(page)

        assert await stored_chats(page) == [original]
        assert await page.locator("#chat-title").inner_text() == "Euler's identity?"
        assert await page.locator("#messages .answer .katex-display").count() == 1
        assert await page.locator("#messages .reasoning strong").text_content() == "Euler"

        # Imported where it already is: a copy beside it, never a silent overwrite.
        await page.set_input_files("#import-file", str(exported))
        await page.wait_for_function("() => document.querySelectorAll('#chat-list .chat-open').length === 2")
        copies = await stored_chats(page)
        assert len({chat["id"] for chat in copies}) == 2
        assert all(chat["messages"] == original["messages"] for chat in copies)
        assert tab.problems == []


async def test_export_as_markdown_reads_as_the_conversation(serve: Serve, fake: FakeProvider, browser: Any) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = RICH_ANSWER
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "Euler's identity?")
        await answered(page)

        download = await export(page, "markdown")
        text = await asyncio.to_thread(Path(await download.path()).read_text)

        assert download.suggested_filename == "Euler-s-identity.md"
        assert text.startswith("# Euler's identity?\n\n## You\n\nEuler's identity?\n\n## Assistant\n\n")
        assert "> **Thinking**" in text and "> Think of **Euler**: $e^{i\\pi} + 1 = 0$." in text
        assert text.endswith("$$e^{i\\pi} + 1 = 0$$\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
        assert tab.problems == []


async def test_a_file_that_is_not_an_export_is_refused_with_the_reason(
    serve: Serve, browser: Any, tmp_path: Path
) -> None:
    server = await serve()
    bad = tmp_path / "notes.json"
    bad.write_text(
        json.dumps(
            {
                "thinkstream": "conversation",
                "version": 1,
                "conversation": {"title": "t", "messages": [{"role": "system", "content": "x"}]},
            }
        )
    )
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await page.set_input_files("#import-file", str(bad))

        notice = page.locator("#notice")
        await notice.wait_for(timeout=WAIT)
        assert await notice.locator("p").inner_text() == (
            "notes.json could not be imported: message 1 has no role of user or assistant."
        )
        assert await page.locator("#chat-list .chat-open").all_inner_texts() == ["New chat"]
        assert await stored_chats(page) == []
        assert tab.problems == []


async def test_search_finds_conversations_by_their_text(serve: Serve, fake: FakeProvider, browser: Any) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        for question, reply in [
            ("About birds", "Swallows migrate south."),
            ("About fish", "Salmon swim upstream."),
            ("About trees", "Oaks live for centuries."),
        ]:
            fake.reply = answer(reply)
            await page.click("#new-chat")
            await ask(page, question)
            await answered(page)
        listed = lambda: page.locator("#chat-list .chat-open").all_inner_texts()  # noqa: E731

        await page.fill("#search", "upstream")  # in an answer only
        await chats_listed(page, ["About fish"])
        assert await listed() == ["About fish"]
        await page.fill("#search", "TREES")  # in a title, any case
        await chats_listed(page, ["About trees"])
        assert await listed() == ["About trees"]
        await page.fill("#search", "penguins")
        await page.wait_for_selector("#chat-list .chat-none", timeout=WAIT)
        assert await page.locator("#chat-list").inner_text() == "No conversation matches."
        await page.fill("#search", "")
        await chats_listed(page, ["About trees", "About fish", "About birds"])
        assert await listed() == ["About trees", "About fish", "About birds"]
        assert tab.problems == []
