// Live markdown: markdown-it renders, DOMPurify sanitises, highlight.js colours code.
//
// Rendering stays linear in the answer's length: text that ends in a blank line
// outside a code fence is a finished block, rendered once and never again; each
// animation frame re-renders only the unfinished tail. Half a table is held back
// until its delimiter row arrives, so it never flickers through a paragraph.

import markdownit from "../vendor/markdown-it-15.0.3.min.js";
import DOMPurify from "../vendor/purify-3.4.18.es.js";
import hljs from "../vendor/highlight-11.12.0.min.js";

const md = markdownit({
  html: false, // model HTML is shown as text; DOMPurify still checks everything
  linkify: true,
  highlight(code, language) {
    if (language && hljs.getLanguage(language)) {
      try {
        return hljs.highlight(code, { language, ignoreIllegals: true }).value;
      } catch {
        // Fall back to plain, escaped text.
      }
    }
    return "";
  },
});

DOMPurify.addHook("uponSanitizeAttribute", (node, data) => {
  // The page's CSP forbids inline styles; keep markdown-it's table alignment as a class.
  if (data.attrName === "style") {
    const align = /text-align:\s*(left|right|center)/.exec(data.attrValue);
    if (align) node.classList.add(`align-${align[1]}`);
    data.keepAttr = false;
  }
});
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

/** Markdown to a sanitised DocumentFragment, with highlighted code and copy buttons. */
export function renderMarkdown(source) {
  const fragment = DOMPurify.sanitize(md.render(source), { RETURN_DOM_FRAGMENT: true });
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

/** A growing markdown document in `container`, updated at most once per frame. */
export class LiveMarkdown {
  constructor(container) {
    this.container = container;
    this.text = "";
    this.stable = 0; // text[0:stable] is rendered in finished blocks
    this.scan = 0; // where the block scanner resumes
    this.inFence = null; // the open fence ("```" or "~~~…") at `scan`, if any
    this.tail = document.createElement("div");
    this.tail.className = "md-tail";
    container.append(this.tail);
    this.frame = 0;
  }

  append(text) {
    this.text += text;
    if (!this.frame) this.frame = requestAnimationFrame(() => this.render());
  }

  /** The answer is complete: render everything now. */
  finish() {
    if (this.frame) cancelAnimationFrame(this.frame);
    this.frame = 0;
    this.commit(this.text.length);
    this.tail.replaceChildren();
  }

  render() {
    this.frame = 0;
    this.commit(this.finishedUpTo());
    this.tail.replaceChildren(renderMarkdown(withoutHalfTable(this.text.slice(this.stable))));
  }

  commit(end) {
    if (end <= this.stable) return;
    const block = document.createElement("div");
    block.className = "md-block";
    block.append(renderMarkdown(this.text.slice(this.stable, end)));
    this.container.insertBefore(block, this.tail);
    this.stable = end;
  }

  /** The end of the last blank line outside a code fence: everything before it is final. */
  finishedUpTo() {
    const text = this.text;
    let boundary = this.stable;
    let start = this.scan;
    for (let end = text.indexOf("\n", start); end !== -1; end = text.indexOf("\n", start)) {
      const line = text.slice(start, end);
      const fence = /^ {0,3}(`{3,}|~{3,})/.exec(line);
      if (this.inFence === null) {
        if (fence) this.inFence = fence[1];
        else if (line.trim() === "") boundary = end + 1;
      } else if (fence && fence[1][0] === this.inFence[0] && fence[1].length >= this.inFence.length && line.trim() === fence[1]) {
        this.inFence = null;
      }
      start = end + 1;
    }
    this.scan = start;
    return boundary;
  }
}

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
