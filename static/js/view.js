// The DOM of one conversation. User text is text (textContent); the model's reasoning and
// answer go through markdown-it and DOMPurify (see markdown.js).

import { LiveMarkdown, copyText } from "./markdown.js";
import { ToolCallCard } from "./tools.js";

const ERROR_WORDS = {
  upstream_auth: "The model provider rejected the server's API key.",
  upstream_forbidden: "The model provider refused this request.",
  upstream_payment_required: "The model provider account is out of credit.",
  upstream_rate_limited: "The model provider is rate limiting requests. Try again in a moment.",
  upstream_unavailable: "The model provider is down or overloaded.",
  upstream_unreachable: "The model provider cannot be reached.",
  upstream_dns: "The model provider cannot be reached.",
  upstream_connect_timeout: "The model provider took too long to answer.",
  upstream_first_byte_timeout: "The model provider took too long to answer.",
  upstream_idle_timeout: "The model provider stopped answering.",
  upstream_timeout: "The model provider took too long to answer.",
  upstream_disconnected: "The connection to the model provider broke.",
  upstream_incomplete: "The model provider stopped before the answer was finished.",
  rate_limited: "Too many requests. Wait a moment and retry.",
  too_many_streams: "You have too many answers running at once.",
  server_busy: "The server is busy. Try again shortly.",
  server_shutdown: "The server is restarting. Try again shortly.",
  connection_lost: "The connection to the server was lost.",
  unauthorized: "This server needs an access token.",
};

export function errorWords(error) {
  // Own properties only: a code such as "constructor" must not find Object's.
  const words = Object.hasOwn(ERROR_WORDS, error.code) ? ERROR_WORDS[error.code] : "";
  return words || error.message || "Something went wrong.";
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, onClick, kind) {
  const node = element("button", `action ${kind}`, label);
  node.type = "button";
  node.addEventListener("click", onClick);
  return node;
}

export function userMessage(message, { onEdit } = {}) {
  const node = element("article", "message user");
  node.setAttribute("aria-label", "You");
  node.append(element("div", "bubble", message.content));
  if (onEdit) {
    const actions = element("div", "actions");
    actions.append(button("Edit", onEdit, "edit"));
    node.append(actions);
  }
  return node;
}

/** An assistant message that can be filled live (``live``) or from history. */
export class AssistantMessage {
  constructor({ onRetry, onRegenerate } = {}) {
    this.node = element("article", "message assistant");
    this.node.setAttribute("aria-label", "Assistant");
    this.thinking = element("details", "thinking");
    this.thinking.hidden = true;
    this.summary = element("summary", null, "Thinking…");
    this.reasoning = element("div", "reasoning markdown");
    this.thoughts = new LiveMarkdown(this.reasoning);
    this.thinking.append(this.summary, this.reasoning);
    this.answer = element("div", "answer markdown");
    this.markdown = new LiveMarkdown(this.answer);
    this.tools = element("div", "tools");
    this.calls = new Map(); // tool-call cards by index
    this.status = element("p", "status");
    this.status.hidden = true;
    this.stats = element("p", "stats");
    this.actions = element("div", "actions");
    this.node.append(this.thinking, this.answer, this.tools, this.status, this.stats, this.actions);
    this.onRetry = onRetry;
    this.onRegenerate = onRegenerate;
    this.content = "";
    this.thinkingStarted = 0;
    this.thinkingEnded = 0;
    this.timer = 0;
  }

  /** The reasoning so far: what its live markdown holds. */
  get reasoningSoFar() {
    return this.thoughts.text;
  }

  reason(text) {
    if (!this.thinkingStarted) {
      this.thinkingStarted = performance.now();
      this.thinking.hidden = false;
      this.thinking.open = true;
      this.timer = setInterval(() => this.tick(), 100);
    }
    this.thoughts.append(text);
  }

  say(text) {
    if (this.thinkingStarted && !this.thinkingEnded) this.endThinking();
    this.content += text;
    this.markdown.append(text);
  }

  /** A fragment of a tool call: its card is made on the first fragment of its index. */
  toolCall(event) {
    if (this.thinkingStarted && !this.thinkingEnded) this.endThinking();
    let card = this.calls.get(event.index);
    if (!card) {
      card = new ToolCallCard();
      this.calls.set(event.index, card);
      this.tools.append(card.node);
    }
    card.add(event);
  }

  /** The tool calls, in the order the model made them, as they are kept in history. */
  get toolCalls() {
    return [...this.calls.values()].map((card) => card.toJSON());
  }

  tick() {
    const seconds = ((performance.now() - this.thinkingStarted) / 1000).toFixed(1);
    this.summary.textContent = `Thinking… ${seconds} s`;
  }

  endThinking(seconds) {
    clearInterval(this.timer);
    this.thinkingEnded = performance.now();
    const took = seconds ?? (this.thinkingEnded - this.thinkingStarted) / 1000;
    this.summary.textContent = `Thought for ${took.toFixed(1)} s`;
    // Collapsed, but still there to open.
    this.thinking.open = false;
  }

  /** Once the reasoning and the answer are fully rendered, show the outcome and call `onShown`. */
  finish(outcome = {}, onShown) {
    if (this.thinkingStarted && !this.thinkingEnded) this.endThinking();
    let rendering = 2;
    const rendered = () => {
      rendering -= 1;
      if (rendering === 0) this.showOutcome(outcome, onShown);
    };
    this.thoughts.finish(rendered);
    this.markdown.finish(rendered);
  }

  showOutcome({ stats, error, stopped, buffered }, onShown) {
    this.node.setAttribute("aria-busy", "false");
    if (stats) this.stats.textContent = describeStats(stats);
    for (const card of this.calls.values()) card.end(error || stopped ? "interrupted" : "requested");
    if (stats && stats.finish_reason === "tool_calls" && !this.content) {
      const names = [...this.calls.values()].map((card) => card.name).join(", ");
      this.showStatus(`The model asked to call ${names || "a tool"} instead of answering. This page does not run tools.`);
    }
    if (stopped) this.showStatus("Stopped.");
    if (buffered && stats) this.warnBuffering(stats.duration_ms);
    if (error) {
      this.showStatus(errorWords(error), true);
      if (this.onRetry) this.actions.append(button("Retry", this.onRetry, "retry"));
    }
    if (this.content) this.actions.append(button("Copy", (e) => copyText(this.content, e.currentTarget), "copy"));
    if (this.onRegenerate) this.actions.append(button("Regenerate", this.onRegenerate, "regenerate"));
    if (onShown) onShown();
  }

  /** The answer reached the page all at once although it took `durationMs` to generate: name the cause. */
  warnBuffering(durationMs) {
    const seconds = (durationMs / 1000).toFixed(1);
    const warning = element(
      "p",
      "warning buffering",
      `This answer took ${seconds} s to write but reached your browser all at once, at the end: a proxy ` +
        "or CDN between you and the server is buffering the stream, so answers seem slow. Whoever runs the " +
        "server can turn that off: see “A proxy that buffers” under Deploying in thinkstream's README.",
    );
    this.node.insertBefore(warning, this.actions);
  }

  showStatus(text, isError = false) {
    this.status.hidden = false;
    this.status.textContent = text;
    this.status.classList.toggle("error", isError);
    if (isError) this.status.setAttribute("role", "alert");
  }

  /** Fill from a stored message, without animation. */
  static restore(message, handlers) {
    const view = new AssistantMessage(handlers);
    if (message.reasoning) {
      view.thinking.hidden = false;
      view.thoughts.append(message.reasoning);
      view.summary.textContent =
        message.thoughtSeconds != null ? `Thought for ${message.thoughtSeconds.toFixed(1)} s` : "Thinking";
    }
    view.content = message.content || "";
    view.markdown.append(view.content);
    (message.toolCalls || []).forEach((call, index) => view.toolCall({ index, ...call }));
    view.finish({ stats: message.stats, error: message.error, stopped: message.stopped, buffered: message.buffered });
    return view;
  }

  get thoughtSeconds() {
    if (!this.thinkingStarted) return null;
    return ((this.thinkingEnded || performance.now()) - this.thinkingStarted) / 1000;
  }
}

/** "First token 412 ms · 38.2 tokens/s · 1,234 tokens (987 reasoning)" */
export function describeStats({ ttft_ms: ttft, duration_ms: duration, usage }) {
  const parts = [];
  if (ttft != null) parts.push(`First token ${Math.round(ttft)} ms`);
  const tokens = usage && usage.completion_tokens;
  if (tokens && ttft != null && duration > ttft) {
    parts.push(`${(tokens / ((duration - ttft) / 1000)).toFixed(1)} tokens/s`);
  }
  if (usage) {
    const reasoning = usage.reasoning_tokens ? ` (${usage.reasoning_tokens.toLocaleString()} reasoning)` : "";
    parts.push(`${(usage.total_tokens ?? tokens ?? 0).toLocaleString()} tokens${reasoning}`);
  }
  return parts.join(" · ");
}
