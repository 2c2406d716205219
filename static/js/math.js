// Math: $…$, $$…$$, \(…\) and \[…\] found by markdown-it rules of our own, drawn by KaTeX.
//
// Why our own rules: the maintained markdown-it math plugins (@mdit/plugin-tex 0.24,
// markdown-it-texmath 1.0) let an unclosed $$ swallow the rest of the answer, lose or swallow
// the text after "$$x$$ text", and take \[ only at the start of a line; mending that would
// replace most of their rules. These follow Pandoc's tex_math_dollars and
// tex_math_single_backslash (https://pandoc.org/MANUAL.html#math):
// - an opening $ has a non-space character right after it, a closing $ a non-space character
//   right before it and no digit right after it, so "$5 and $10" and "$100-$200" stay text;
// - math never crosses a blank line, so an unclosed $$ ends with its paragraph;
// - a backslash takes the next character with it, so \$ is never a delimiter.
// Code spans and fences are parsed before these rules ever see their text.
//
// Rendering happens after DOMPurify: markdown-it writes placeholders (the TeX as text in a
// span), DOMPurify sanitises the HTML, and `renderMath` draws each placeholder with
// `katex.render`, which sets styles through the CSSOM, which the page's CSP allows
// (`renderToString`'s style attributes it does not).

import katex from "../vendor/katex-0.19.1/katex.es.js";

const CLOSER = { $: "$", $$: "$$", "\\(": "\\)", "\\[": "\\]" };
const DISPLAY = new Set(["$$", "\\["]);

const KATEX_OPTIONS = {
  throwOnError: true, // errors are ours to show (KaTeX's own error markup is an inline style)
  trust: false, // no \href, \url, \includegraphics or \html…
  strict: "ignore",
  maxSize: 20, // ems: no \rule{1000em}{1000em}
  maxExpand: 1000, // macro expansions per formula
  output: "htmlAndMathml", // the MathML is for screen readers
};

const isSpace = (code) => code === 0x20 || code === 0x09 || code === 0x0a;
const isDigit = (code) => code >= 0x30 && code <= 0x39;

/** The opener at `pos` in `src` ("$", "$$", "\\(", "\\["), or null. */
function openerAt(src, pos) {
  const code = src.charCodeAt(pos);
  if (code === 0x24) return src.charCodeAt(pos + 1) === 0x24 ? "$$" : "$";
  if (code === 0x5c) {
    const next = src.charCodeAt(pos + 1);
    if (next === 0x28) return "\\(";
    if (next === 0x5b) return "\\[";
  }
  return null;
}

/**
 * Where the formula opened by `opener` (ending at `start`) closes in `src[start:end]`:
 * the closer's index, -1 if it does not close there, or -2 if Pandoc's $ rules say it is not math.
 * (`src` is one paragraph's text or one line, so a formula never crosses a blank line.)
 */
function findCloser(src, start, end, opener) {
  const closer = CLOSER[opener];
  for (let i = start; i < end; i += 1) {
    const code = src.charCodeAt(i);
    if (src.startsWith(closer, i) && i + closer.length <= end) {
      if (opener !== "$") return i;
      return isDigit(src.charCodeAt(i + 1)) ? -2 : i;
    }
    if (code === 0x5c) {
      i += 1; // a backslash and the character it escapes
    } else if (opener === "$" && isSpace(code)) {
      while (i + 1 < end && isSpace(src.charCodeAt(i + 1))) i += 1;
      if (src.charCodeAt(i + 1) === 0x24) return -2; // "$5 and $10": a space before the $
    }
  }
  return -1;
}

/** Inline rule: any of the four delimiters, anywhere in a paragraph. */
function mathInline(state, silent) {
  const { src, pos, posMax } = state;
  const opener = openerAt(src, pos);
  if (opener === null) return false;
  const start = pos + opener.length;
  if (opener === "$" && (start >= posMax || isSpace(src.charCodeAt(start)))) return false;
  const close = findCloser(src, start, posMax, opener);
  if (close === -2) return false;
  if (close === -1 || close === start) {
    if (opener === "$" || opener === "$$") {
      // Text, and never the start of a formula: "$$x$" is not $x$ waiting for one more $.
      if (state.env.streaming && opener === "$$") return pending(state, silent);
      if (!silent) state.pending += opener;
      state.pos = start;
      return true;
    }
    // An unclosed \( or \[ is CommonMark's: the escape rule makes it "(" or "[".
    return state.env.streaming ? pending(state, silent) : false;
  }
  if (!silent) {
    const token = state.push("math_inline", "math", 0);
    token.markup = opener;
    token.content = src.slice(start, close);
  }
  state.pos = close + CLOSER[opener].length;
  return true;
}

/** While the answer streams, an unclosed formula is shown as its source, untouched, until it closes. */
function pending(state, silent) {
  if (!silent) {
    const token = state.push("math_pending", "span", 0);
    token.content = state.src.slice(state.pos, state.posMax);
  }
  state.pos = state.posMax;
  return true;
}

/**
 * Block rule: a display formula whose delimiters begin a line and close at the end of one, so
 * that the lines between are never read as lists, headings or tables. Anything else ($$ without
 * its closer, "$$x$$ and text") is left to the paragraph and the inline rule.
 */
function mathBlock(state, startLine, endLine, silent) {
  const first = state.bMarks[startLine] + state.tShift[startLine];
  if (state.sCount[startLine] - state.blkIndent >= 4) return false;
  const opener = openerAt(state.src, first);
  if (opener !== "$$" && opener !== "\\[") return false;
  const lines = [];
  for (let line = startLine; line < endLine; line += 1) {
    const begin = state.bMarks[line] + state.tShift[line];
    const end = state.eMarks[line];
    if (line > startLine && (begin >= end || state.sCount[line] < state.blkIndent)) return false;
    const text = state.src.slice(line === startLine ? first + opener.length : begin, end);
    const close = findCloser(text, 0, text.length, opener);
    if (close < 0) {
      lines.push(text);
      continue;
    }
    if (text.slice(close + CLOSER[opener].length).trim() !== "") return false;
    lines.push(text.slice(0, close));
    if (lines.join("").trim() === "") return false;
    if (silent) return true;
    const token = state.push("math_block", "math", 0);
    token.block = true;
    token.markup = opener;
    token.content = lines.join("\n");
    token.map = [startLine, line + 1];
    state.line = line + 1;
    return true;
  }
  // Still open where the text so far ends: while it streams, its source, kept together.
  if (!state.env.streaming) return false;
  if (!silent) {
    const token = state.push("math_pending", "div", 0);
    token.block = true;
    token.content = opener + lines.join("\n");
    token.map = [startLine, endLine];
    state.line = endLine;
  }
  return true;
}

const escapeHtml = (text) => text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");

function placeholder(tag, token) {
  const kind = DISPLAY.has(token.markup) ? "math-display" : "math-inline";
  return `<${tag} class="${kind}" data-markup="${escapeHtml(token.markup)}">${escapeHtml(token.content)}</${tag}>`;
}

/** The markdown-it plugin: `md.use(math)`. */
export function math(md) {
  // Before "escape", which would turn \( into (.
  md.inline.ruler.before("escape", "math_inline", mathInline);
  md.block.ruler.before("paragraph", "math_block", mathBlock, { alt: ["paragraph", "reference", "blockquote", "list"] });
  md.renderer.rules.math_inline = (tokens, index) => placeholder("span", tokens[index]);
  md.renderer.rules.math_block = (tokens, index) => `${placeholder("div", tokens[index])}\n`;
  md.renderer.rules.math_pending = (tokens, index) => {
    const tag = tokens[index].block ? "div" : "span";
    return `<${tag} class="math-pending">${escapeHtml(tokens[index].content)}</${tag}>`;
  };
}

// Formulas drawn so far, by kind and TeX: the unfinished tail of an answer is drawn again on
// every frame, and cloning a drawn formula is far cheaper than laying it out again.
const drawn = new Map();
const DRAWN_MAX = 2000;

/** Draw every math placeholder under `root` (already sanitised) with KaTeX. */
export function renderMath(root) {
  for (const node of root.querySelectorAll(".math-inline, .math-display")) {
    const display = node.classList.contains("math-display");
    const tex = node.textContent;
    const key = (display ? "D" : "I") + tex;
    let result = drawn.get(key);
    if (result === undefined) {
      result = draw(tex, display);
      if (drawn.size >= DRAWN_MAX) drawn.clear();
      drawn.set(key, result);
    }
    if (result instanceof Error) {
      // A formula KaTeX cannot read: its source, as the model wrote it, styled by the page.
      const markup = node.dataset.markup;
      node.textContent = `${markup}${tex}${CLOSER[markup] ?? ""}`;
      node.classList.add("math-error");
      node.title = result.message;
    } else {
      node.replaceChildren(result.cloneNode(true));
    }
  }
}

function draw(tex, displayMode) {
  const holder = document.createElement("span");
  try {
    withStylesThroughCssom(() => katex.render(tex, holder, { ...KATEX_OPTIONS, displayMode }));
  } catch (error) {
    return error instanceof Error ? error : new Error(String(error));
  }
  return holder.firstChild;
}

/**
 * Run `draw` with `setAttribute("style", …)` turned into CSSOM property sets.
 *
 * KaTeX builds almost every style through the CSSOM, but a few paths still set a style
 * attribute (the width of the SVG arrow of \vec and of tall delimiters, the MathML of \pmb and
 * \fcolorbox); under the page's `style-src 'self'` those are blocked and reported as CSP
 * violations, and \vec loses its arrow. KaTeX/KaTeX#4096 tracks it upstream.
 */
function withStylesThroughCssom(render) {
  const setAttribute = Element.prototype.setAttribute;
  Element.prototype.setAttribute = function (name, value) {
    if (name !== "style") return setAttribute.call(this, name, value);
    for (const declaration of String(value).split(";")) {
      const colon = declaration.indexOf(":");
      if (colon > 0) this.style.setProperty(declaration.slice(0, colon).trim(), declaration.slice(colon + 1).trim());
    }
  };
  try {
    render();
  } finally {
    Element.prototype.setAttribute = setAttribute;
  }
}

/** Lay out a few formulas while the page is idle, so that the first answer with math is not the one to pay. */
export function warmUpMath() {
  const box = document.createElement("div");
  const formula = document.createElement("span");
  formula.className = "math-display";
  formula.textContent = String.raw`\frac{a}{b} + \sqrt{x^2} = \sum_{i=1}^n \vec{v}_i`;
  box.append(formula);
  renderMath(box);
}
