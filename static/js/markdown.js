// Live markdown: markdown-it renders, DOMPurify sanitises, KaTeX draws the math into the
// sanitised placeholders, highlight.js colours code (once a code block is finished; the one
// still being written stays plain).
//
// Rendering stays linear in the answer's length: text that ends in a blank line
// outside a code fence is a finished block, rendered once and never again; each
// animation frame renders at most a budget of finished blocks and re-renders only
// the unfinished tail. Half a table is held back until its delimiter row arrives,
// so it never flickers through a paragraph, and a formula still waiting for its closing
// delimiter is shown as its source, never as a KaTeX error.

import markdownit from "../vendor/markdown-it-15.0.3.min.js";
import DOMPurify from "../vendor/purify-3.4.18.es.js";
import hljs from "../vendor/highlight-11.12.0.min.js";
import { math, renderMath, warmUpMath } from "./math.js";

// No highlight option: code is highlighted after rendering, from a queue, within
// each frame's budget (see LiveMarkdown), so that a grammar compiled on first use
// never lands in the same frame as markdown and layout work.
const md = markdownit({
  html: false, // model HTML is shown as text; DOMPurify still checks everything
  linkify: true,
})
  .use(math)
  .use(alignmentAsClasses);

/**
 * markdown-it writes a table column's alignment as style="text-align:…". The page's CSP forbids
 * inline styles, and DOMPurify's parser (a document that inherits the page's CSP) reports each one
 * as a violation even though it is then dropped: write a class instead, before any HTML exists.
 */
function alignmentAsClasses(markdown) {
  markdown.core.ruler.push("alignment_classes", (state) => {
    for (const token of state.tokens) {
      const style = token.attrGet("style");
      if (style === null) continue;
      token.attrs = token.attrs.filter(([name]) => name !== "style");
      const align = /text-align:\s*(left|right|center)/.exec(style);
      if (align) token.attrJoin("class", `align-${align[1]}`);
    }
  });
}

const SANITIZE = { RETURN_DOM_FRAGMENT: true, FORBID_ATTR: ["style"] };

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
  if (node.tagName === "IMG") linkForeignImage(node);
});

/**
 * Model output may show images as data: URLs only. An image of another origin would not load under
 * the CSP (its request reported as a violation); one of the page's own origin would be a request in
 * the user's name that a prompt injection chooses (`![](stream?prompt=…)` starts a paid answer). Put
 * a link to it in its place, while the node is still in DOMPurify's inert document, before anything
 * tries to load it. (The new link is sanitised next, as DOMPurify walks on.)
 */
function linkForeignImage(image) {
  const source = image.getAttribute("src") || "";
  let url;
  try {
    url = new URL(source, document.baseURI);
  } catch {
    url = null;
  }
  if (url && url.protocol === "data:") return;
  if (url && (url.protocol === "https:" || url.protocol === "http:")) {
    const link = image.ownerDocument.createElement("a");
    link.href = url.href;
    link.textContent = image.getAttribute("alt") || url.href;
    image.replaceWith(link);
  } else {
    image.remove();
  }
}

/**
 * Markdown to a sanitised DocumentFragment, with its math drawn and copy buttons on code blocks.
 * `streaming`: the text may stop mid-formula (see math.js).
 */
export function renderMarkdown(source, { streaming = false } = {}) {
  const fragment = DOMPurify.sanitize(md.render(source, { streaming }), SANITIZE);
  renderMath(fragment);
  for (const code of fragment.querySelectorAll("pre > code")) {
    code.classList.add("hljs");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy-code";
    button.textContent = "Copy";
    button.setAttribute("aria-label", "Copy code");
    button.addEventListener("click", () => copyText(code.textContent, button));
    code.parentElement.prepend(button);
  }
  return fragment;
}

/** Colour one rendered code block, if its language is known. */
function highlight(code) {
  const language = [...code.classList].find((name) => name.startsWith("language-"))?.slice(9);
  if (!language || !hljs.getLanguage(language)) return;
  // highlight.js builds this from the element's text, escaping all of it: only its own spans are markup.
  code.innerHTML = hljs.highlight(code.textContent, { language, ignoreIllegals: true }).value;
}

const COMMON_LANGUAGES = ["python", "javascript", "typescript", "bash", "json", "rust", "go", "java", "c", "cpp", "sql"];

/** Compile markdown-it, DOMPurify and common grammars while the page is idle, not mid-answer. */
export function warmUp() {
  const idle = window.requestIdleCallback || ((callback) => setTimeout(callback, 50));
  const sample = "# a\n\n*b* `c` [d](https://e.example) **e** $f$\n\n| f | g |\n|---|---|\n| 1 | 2 |\n\n- h\n- i\n\n1. j\n";
  // Several runs, so that V8 optimises the hot paths before the first answer needs them.
  const steps = [
    ...Array.from({ length: 6 }, () => () => renderMarkdown(sample.repeat(4))),
    warmUpMath,
    ...COMMON_LANGUAGES.map((language) => () => hljs.highlight("x = 1", { language, ignoreIllegals: true })),
  ];
  const next = () => {
    const step = steps.shift();
    if (!step) {
      document.documentElement.dataset.warm = "true"; // for tests that measure a settled page
      return;
    }
    step();
    idle(next);
  };
  idle(next);
}

export async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    if (button) {
      const label = button.textContent;
      button.textContent = "Copied";
      setTimeout(() => (button.textContent = label), 1200);
    }
  } catch {
    // Clipboard refused (insecure context, permissions): nothing to do.
  }
}

// Characters of finished markdown rendered per animation frame at most, all documents on the
// page together, so that a fast stream (or a long conversation reopened from history) never
// blocks the page.
const FRAME_BUDGET = 1200;

/** The page's animation frames: every LiveMarkdown with something to show renders in the same one. */
class Frames {
  constructor() {
    this.waiting = new Set();
    this.frame = 0;
    this.onFrame = null; // called at the start of each frame, before it changes the DOM
  }

  request(live) {
    this.waiting.add(live);
    if (!this.frame) this.frame = requestAnimationFrame(() => this.run());
  }

  run() {
    this.frame = 0;
    // Before any change to the DOM, while layout is still clean from the last paint:
    // reading it here costs nothing, reading it after the changes would force a layout.
    if (this.onFrame) this.onFrame();
    const lives = [...this.waiting];
    this.waiting.clear();
    // Shared by the documents in page order, so history fills in from the top.
    const budget = { chars: FRAME_BUDGET, until: performance.now() + 8 };
    for (const live of lives) live.render(budget);
  }
}

export const frames = new Frames();

/** A growing markdown document in `container`, updated at most once per frame. */
export class LiveMarkdown {
  constructor(container) {
    this.container = container;
    this.text = "";
    this.stable = 0; // text[0:stable] is rendered in finished blocks
    this.boundaries = []; // ends of finished blocks not yet rendered, in order
    this.scan = 0; // where the block scanner resumes
    this.inFence = null; // the open fence ("```" or "~~~…") at `scan`, if any
    this.final = false;
    this.tail = document.createElement("div");
    this.tail.className = "md-tail";
    container.append(this.tail);
    this.onDone = null;
    this.code = []; // finished code blocks waiting to be highlighted
    this.shownTail = ""; // the tail text the DOM shows now
  }

  append(text) {
    this.text += text;
    this.schedule();
  }

  /** The text is complete: render the rest, a frame's budget at a time, then call `onDone`. */
  finish(onDone) {
    this.final = true;
    this.onDone = onDone;
    this.schedule();
  }

  schedule() {
    frames.request(this);
  }

  /** One frame's work, within what is left of the frame's `budget` ({chars, until}). */
  render(budget) {
    while (this.code.length && performance.now() < budget.until) highlight(this.code.shift());
    this.findBoundaries();
    if (this.final && this.boundaries.at(-1) !== this.text.length) this.boundaries.push(this.text.length);
    // Commit finished blocks up to the budget; the frame's first block always goes, so every frame makes progress.
    const fresh = budget.chars === FRAME_BUDGET;
    let end = this.stable;
    while (this.boundaries.length && ((fresh && end === this.stable) || this.boundaries[0] - this.stable <= budget.chars)) {
      end = this.boundaries.shift();
    }
    budget.chars -= end - this.stable;
    this.commit(end);
    if (this.code.length) this.schedule();
    if (this.boundaries.length) {
      // More finished text is waiting: the tail (already partly committed) waits for it.
      this.tail.replaceChildren();
      this.shownTail = "";
      this.schedule();
    } else if (this.final) {
      this.tail.replaceChildren();
      this.shownTail = "";
      if (this.code.length) return;
      const onDone = this.onDone;
      this.onDone = null;
      if (onDone) onDone();
    } else {
      const tail = withoutHalfTable(this.text.slice(this.stable));
      if (tail !== this.shownTail) {
        this.shownTail = tail;
        this.tail.replaceChildren(tail ? renderMarkdown(tail, { streaming: true }) : "");
      }
    }
  }

  commit(end) {
    if (end <= this.stable) return;
    const block = document.createElement("div");
    block.className = "md-block";
    block.append(renderMarkdown(this.text.slice(this.stable, end)));
    this.code.push(...block.querySelectorAll("pre > code"));
    this.container.insertBefore(block, this.tail);
    this.stable = end;
  }

  /**
   * Record the end of every blank line outside a code fence: the text before it is final. The
   * scanner does not follow list items, so it takes a fence at any indentation, or after list
   * markers, for one: a fence in a nested list is indented four spaces or more.
   */
  findBoundaries() {
    const text = this.text;
    let start = this.scan;
    for (let end = text.indexOf("\n", start); end !== -1; end = text.indexOf("\n", start)) {
      const line = text.slice(start, end);
      const fence = FENCE.exec(line);
      if (this.inFence === null) {
        if (fence) this.inFence = fence[1];
        else if (line.trim() === "") this.boundaries.push(end + 1);
      } else if (fence && fence[1][0] === this.inFence[0] && fence[1].length >= this.inFence.length && line.trim() === fence[1]) {
        this.inFence = null;
      }
      start = end + 1;
    }
    this.scan = start;
  }
}

// A line that opens or closes a code fence, as far as finding blocks goes (see findBoundaries).
const FENCE = /^[ \t]*(?:(?:[-+*]|\d{1,9}[.)])[ \t]+)*(`{3,}|~{3,})/;

/** Hold back a table whose delimiter row has not (fully) arrived yet. */
function withoutHalfTable(tail) {
  const lines = tail.split("\n");
  let end = lines.length;
  if (lines[end - 1] === "") end -= 1;
  let first = end;
  while (first > 0 && lines[first - 1].trimStart().startsWith("|")) first -= 1;
  if (first === end) return tail;
  const rows = lines.slice(first, end);
  const complete = rows.length > 1 && isDelimiterRow(rows[1]) && cells(rows[1]) === cells(rows[0]);
  return complete ? tail : lines.slice(0, first).join("\n");
}

function isDelimiterRow(line) {
  return /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/.test(line);
}

function cells(row) {
  return row.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").length;
}
