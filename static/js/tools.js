// Tool calls: a card per call the model makes, filled from streamed `tool_call` events
// ({index, id?, name?, arguments}, the fragments of one call sharing its index). The page does
// not run tools; the card shows what the model asked for, its arguments as they stream
// (pretty JSON once they parse), and how the request ended.

import { frames } from "./markdown.js";
import { pretty } from "./transfer.js";

const STATES = {
  streaming: "writing arguments…",
  requested: "requested",
  interrupted: "interrupted",
};

export class ToolCallCard {
  constructor() {
    this.id = "";
    this.name = "";
    this.arguments = "";
    this.node = document.createElement("section");
    this.node.className = "tool-call";
    const header = document.createElement("header");
    const label = document.createElement("span");
    label.className = "tool-label";
    label.textContent = "Tool call";
    this.title = document.createElement("code");
    this.title.className = "tool-name";
    this.badge = document.createElement("span");
    this.badge.className = "tool-state";
    header.append(label, this.title, this.badge);
    this.args = document.createElement("pre");
    this.args.className = "tool-arguments";
    this.node.append(header, this.args);
    this.shown = null; // the arguments text the DOM shows
    this.setState("streaming");
  }

  /** One streamed fragment of this call: its id and name when it carries them, and more of its arguments. */
  add({ id, name, arguments: fragment }) {
    if (id) this.id = id;
    if (name) this.name = name;
    if (fragment) this.arguments += fragment;
    frames.request(this);
  }

  /** The stream ended: `requested` if the model finished its request, else `interrupted`. */
  end(state) {
    this.setState(state);
    frames.request(this);
  }

  setState(state) {
    this.state = state;
    this.node.dataset.state = state;
    this.badge.textContent = STATES[state];
  }

  /** Called by the page's frame loop: at most once a frame, however many fragments came. */
  render() {
    this.title.textContent = this.name || "(unnamed)";
    this.node.setAttribute("aria-label", `Tool call ${this.name}, ${STATES[this.state]}`);
    if (this.arguments !== this.shown) {
      this.shown = this.arguments;
      this.args.textContent = pretty(this.arguments);
    }
  }

  toJSON() {
    return { id: this.id, name: this.name, arguments: this.arguments };
  }
}

/** Arguments as indented JSON once they are whole JSON, else as they came. */
