"""Math on the page, in a real browser: KaTeX inside markdown, under the page's strict CSP.

The rules are Pandoc's (see static/js/math.js): $…$, $$…$$, \\(…\\) and \\[…\\], inline or
display; prices and code stay text; a formula still streaming is shown as its source and
never as an error; a formula KaTeX cannot read shows its source, marked.
"""

from __future__ import annotations

import re
from typing import Any

from browsing import Serve, answer, answered, ask, opened, paced
from helpers import FakeProvider, chunk

# Each formula KaTeX drew on the page: its TeX and whether it is a display formula.
DRAWN = """(root) => [...document.querySelectorAll(root + " .katex")].map((k) => ({
    tex: k.querySelector("annotation").textContent.trim(),
    display: k.parentElement.classList.contains("katex-display"),
}))"""

DELIMITERS = (
    "Inline $a^2$ and \\(b_1\\) in a sentence.\n\n"
    "$$\\sum_{i=1}^n i$$\n\n"
    "\\[\n\\int_0^1 f(x)\\,dx\n\\]\n\n"
    "Mid-line display $$c + d$$ and \\[e = f\\] too.\n"
)


async def test_all_four_delimiters_render_inline_and_display_math(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = answer(DELIMITERS)
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "Show me math")
        await answered(page)

        drawn = await page.evaluate(DRAWN, "#messages .answer")
        assert drawn == [
            {"tex": "a^2", "display": False},
            {"tex": "b_1", "display": False},
            {"tex": "\\sum_{i=1}^n i", "display": True},
            {"tex": "\\int_0^1 f(x)\\,dx", "display": True},
            {"tex": "c + d", "display": True},
            {"tex": "e = f", "display": True},
        ]
        text = await page.locator("#messages .answer").inner_text()
        assert "$" not in text and "\\(" not in text and "\\[" not in text
        assert tab.problems == []


PRICES_AND_CODE = [
    "It costs $5 and $10.",
    "Revenue grew from $2bn to $4bn.",
    "Expect $100-$200 a month.",
    "Escaped \\$3 stays a dollar.",
]


async def test_prices_and_code_stay_text(serve: Serve, fake: FakeProvider, browser: Any) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    code_span = "Run `echo $PATH` and `\\(x\\)` as they are."
    fence = '```sh\necho "$HOME" \\(y\\) $$z$$\n```'
    fake.reply = answer("\n\n".join([*PRICES_AND_CODE, code_span, fence]))
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "Prices?")
        await answered(page)

        body = page.locator("#messages .answer")
        assert await body.locator(".katex, .math-inline, .math-display").count() == 0
        paragraphs = await body.locator("p").all_inner_texts()
        assert paragraphs[:4] == [
            "It costs $5 and $10.",
            "Revenue grew from $2bn to $4bn.",
            "Expect $100-$200 a month.",
            "Escaped $3 stays a dollar.",
        ]
        assert await body.locator("p code").all_inner_texts() == ["echo $PATH", "\\(x\\)"]
        assert await body.locator("pre code").text_content() == 'echo "$HOME" \\(y\\) $$z$$\n'
        assert tab.problems == []


# Formulas the way a model streams them: a few characters at a time, through states that are
# not TeX yet (an open \frac{, a dangling ^, half a closing delimiter).
STREAMED_FORMULAS = (
    "The mean is $\\bar{x} = \\frac{1}{n}\\sum_{i=1}^{n} x_i$, so\n\n"
    "$$\nE[X^2] = \\frac{\\sigma^2}{\\sqrt{n}} + \\left(\\frac{a}{b}\\right)^2\n$$\n\n"
    "and inline \\(\\frac{\\partial f}{\\partial x}\\) with \\[\\int_0^{\\infty} e^{-x^2}\\,dx\\] done."
)


async def test_a_formula_streamed_a_few_characters_at_a_time_never_shows_an_error(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    pieces = [STREAMED_FORMULAS[i : i + 3] for i in range(0, len(STREAMED_FORMULAS), 3)]
    fake.reply = paced([*(chunk(content=p) for p in pieces), chunk(finish="stop"), "[DONE]"], delay=0.02)
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        # Every state the answer is shown in, as the DOM changes.
        await page.evaluate(
            """() => {
                window.__seen = { errors: [], pending: new Set() };
                new MutationObserver(() => {
                    const answer = document.querySelector("#messages .answer");
                    if (!answer) return;
                    for (const e of answer.querySelectorAll(".math-error, .katex-error")) {
                        window.__seen.errors.push(e.textContent);
                    }
                    for (const p of answer.querySelectorAll(".math-pending")) window.__seen.pending.add(p.textContent);
                }).observe(document.getElementById("messages"), { subtree: true, childList: true });
            }"""
        )
        await ask(page, "Derive it")
        await answered(page)

        seen = await page.evaluate("() => ({ errors: window.__seen.errors, pending: [...window.__seen.pending] })")
        assert seen["errors"] == []
        # The unfinished formulas were on screen as their source, delimiters and all.
        assert any(p.startswith("$$\nE[X^2]") for p in seen["pending"]), seen["pending"]
        assert any(p.startswith("\\(\\frac{\\partial") for p in seen["pending"]), seen["pending"]
        drawn = await page.evaluate(DRAWN, "#messages .answer")
        assert [d["display"] for d in drawn] == [False, True, False, True]
        assert await page.locator("#messages .answer .math-pending").count() == 0
        assert tab.problems == []


async def test_an_unclosed_display_formula_ends_with_its_paragraph(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = answer("So $$a + b", " never closes.\n\n", "After it, **bold** and $x$.\n\n", "- a list")
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "Unclosed")
        await answered(page)

        body = page.locator("#messages .answer")
        assert await body.locator("p").first.inner_text() == "So $$a + b never closes."
        assert await body.locator("p strong").inner_text() == "bold"
        assert await page.evaluate(DRAWN, "#messages .answer") == [{"tex": "x", "display": False}]
        assert await body.locator("li").all_inner_texts() == ["a list"]
        assert tab.problems == []


async def test_a_formula_katex_cannot_read_shows_its_source_marked(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = answer("Broken $\\frac{1}{$ and \\(\\notacommand{x}\\) but $y$ is fine.")
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "Break it")
        await answered(page)

        errors = page.locator("#messages .answer .math-error")
        assert await errors.all_inner_texts() == ["$\\frac{1}{$", "\\(\\notacommand{x}\\)"]
        assert "KaTeX parse error" in (await errors.first.get_attribute("title") or "")
        # Our CSS marks it, not KaTeX's red inline style.
        style = await errors.first.evaluate(
            "(e) => ({ inline: e.getAttribute('style'), font: getComputedStyle(e).fontFamily })"
        )
        assert style["inline"] is None
        assert "monospace" in style["font"]
        assert await page.evaluate(DRAWN, "#messages .answer") == [{"tex": "y", "display": False}]
        assert tab.problems == []


# Formulas for which KaTeX sets a style attribute, which the CSP forbids: \vec's arrow, a tall
# delimiter, \pmb and \fcolorbox in the MathML.
STYLED = (
    "$\\vec{v}$ and $$\\left(\\begin{matrix}1\\\\2\\\\3\\\\4\\\\5\\\\6\\\\7\\end{matrix}\\right)$$\n\n"
    "$\\pmb{x}$ and $\\fcolorbox{red}{white}{y}$"
)


async def test_math_draws_under_the_strict_csp_without_a_violation(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = answer(STYLED)
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        csp = (await page.request.get(page.url)).headers["content-security-policy"]
        assert "style-src 'self';" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        await ask(page, "Vectors")
        await answered(page)

        assert len(await page.evaluate(DRAWN, "#messages .answer")) == 4
        # The arrow over v keeps the width KaTeX gave it.
        arrow = await page.locator("#messages .answer .katex svg").first.bounding_box()
        assert arrow is not None and 5 < arrow["width"] < 30
        # KaTeX's fonts load from the vendored folder.
        assert await page.evaluate("() => document.fonts.check('16px KaTeX_Main')")
        assert tab.problems == []


async def test_katex_runs_without_trust_and_with_a_size_limit(serve: Serve, fake: FakeProvider, browser: Any) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    fake.reply = answer("$\\href{javascript:alert(1)}{x}$ and $\\rule{1000em}{1000em}$")
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "Link")
        await answered(page)

        body = page.locator("#messages .answer")
        assert await body.locator("a").count() == 0
        rule = await body.locator(".katex .katex-rule").bounding_box()
        font_size = await body.locator(".katex").first.evaluate("(e) => parseFloat(getComputedStyle(e).fontSize)")
        assert rule is not None and rule["width"] <= 20 * font_size + 1
        assert tab.problems == []


THOUGHTS = [
    "**Plan.** Two steps:\n\n",
    "- square it: \\(x^2\\)\n",
    "- call `area()`\n\n",
    "$$A = \\pi r^2$$\n\n",
    "Then answer.",
]


async def test_the_thinking_panel_renders_markdown_and_math_and_keeps_its_timer(
    serve: Serve, fake: FakeProvider, browser: Any
) -> None:
    server = await serve(base_url=fake.base_url, model="m")
    events = [chunk(reasoning=t) for t in THOUGHTS] + [chunk(content="Done."), chunk(finish="stop"), "[DONE]"]
    fake.reply = paced(events, delay=0.3)
    async with opened(browser, str(server.make_url("/"))) as tab:
        page = tab.page
        await ask(page, "Think in markdown")
        thinking = page.locator("#messages details.thinking")
        reasoning = thinking.locator(".reasoning")
        # While it thinks: open, timed, and already rendered as far as it has come.
        await reasoning.locator("li code").wait_for(timeout=5000)
        assert await thinking.get_attribute("open") == ""
        assert re.fullmatch(r"Thinking… \d+\.\d s", await thinking.locator("summary").inner_text())
        assert await reasoning.locator("strong").inner_text() == "Plan."
        await answered(page)

        assert await thinking.get_attribute("open") is None
        assert re.fullmatch(r"Thought for \d+\.\d s", await thinking.locator("summary").inner_text())
        assert await reasoning.locator("li").count() == 2
        assert await page.evaluate(DRAWN, "#messages .reasoning") == [
            {"tex": "x^2", "display": False},
            {"tex": "A = \\pi r^2", "display": True},
        ]
        assert "**" not in await reasoning.inner_text()
        assert tab.problems == []
