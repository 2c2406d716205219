// A conversation as a file: Markdown to read or share, JSON to keep and import again.
//
// The JSON export is {"thinkstream": "conversation", "version": 1, "exported": <ISO time>,
// "conversation": {id, title, updated, messages}}, the messages exactly as the page keeps them,
// so importing an export gives back the same conversation. An import is checked field by field
// before it is kept: it is a file from anywhere, and the page will render it.

const FORMAT = "conversation";
const VERSION = 1;

export function toJson(chat) {
  const conversation = { id: chat.id, title: chat.title, updated: chat.updated, messages: chat.messages };
  return JSON.stringify({ thinkstream: FORMAT, version: VERSION, exported: new Date().toISOString(), conversation }, null, 2);
}

/** A conversation from an export's text; throws an Error that says what is wrong with it. */
export function fromJson(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch {
    throw new Error("it is not JSON.");
  }
  if (!isObject(data) || data.thinkstream !== FORMAT) throw new Error("it is not a thinkstream conversation export.");
  if (data.version !== VERSION) throw new Error(`it is export version ${data.version}; this page reads version ${VERSION}.`);
  const chat = data.conversation;
  if (!isObject(chat) || typeof chat.title !== "string" || !Array.isArray(chat.messages)) {
    throw new Error("it has no conversation in it.");
  }
  chat.messages.forEach((message, index) => {
    const problem = checkMessage(message);
    if (problem) throw new Error(`message ${index + 1} ${problem}.`);
  });
  return {
    id: typeof chat.id === "string" && chat.id ? chat.id : "",
    title: chat.title,
    updated: Number.isFinite(chat.updated) ? chat.updated : Date.now(),
    messages: chat.messages,
  };
}

const isObject = (value) => typeof value === "object" && value !== null && !Array.isArray(value);
const isNumberOrNull = (value) => value === null || Number.isFinite(value);

// The optional fields of a message the page reads, and the values it can read.
const OPTIONAL = {
  reasoning: (v) => typeof v === "string",
  thoughtSeconds: isNumberOrNull,
  stopped: (v) => typeof v === "boolean",
  buffered: (v) => typeof v === "boolean",
  error: (v) => isObject(v) && typeof v.code === "string" && typeof v.message === "string",
  stats: (v) =>
    isObject(v) &&
    ["ttft_ms", "duration_ms"].every((k) => v[k] === undefined || isNumberOrNull(v[k])) &&
    (v.usage === undefined || v.usage === null || (isObject(v.usage) && Object.values(v.usage).every(isNumberOrNull))),
  toolCalls: (v) =>
    Array.isArray(v) &&
    v.every((call) => isObject(call) && typeof call.name === "string" && typeof call.arguments === "string"),
};

/** What is wrong with one message, or "" (the fields the page reads, with the types it expects). */
function checkMessage(message) {
  if (!isObject(message)) return "is not an object";
  if (message.role !== "user" && message.role !== "assistant") return "has no role of user or assistant";
  if (typeof message.content !== "string") return "has no text";
  for (const [field, valid] of Object.entries(OPTIONAL)) {
    if (message[field] !== undefined && !valid(message[field])) return `has a ${field} the page cannot read`;
  }
  return "";
}

/**
 * The messages of `messages` the page can read: each as it is if it is fine, else without the
 * optional fields it cannot read; one with no role or no text is left out. For what this browser
 * kept itself (an older page may have written what this one does not expect), where refusing the
 * whole conversation, as an import does, would lose the rest of it.
 */
export function readableMessages(messages) {
  return messages.map(readable).filter((message) => message !== null);
}

function readable(message) {
  if (!checkMessage(message)) return message;
  if (!isObject(message)) return null;
  const repaired = { ...message };
  for (const [field, valid] of Object.entries(OPTIONAL)) {
    if (repaired[field] !== undefined && !valid(repaired[field])) delete repaired[field];
  }
  return checkMessage(repaired) ? null : repaired;
}

/** The conversation as a Markdown document. */
export function toMarkdown(chat) {
  const parts = [`# ${chat.title}`];
  for (const message of chat.messages) {
    if (message.role === "user") {
      parts.push("## You", message.content.trimEnd());
      continue;
    }
    parts.push("## Assistant");
    if (message.reasoning) {
      const took = message.thoughtSeconds != null ? ` (${message.thoughtSeconds.toFixed(1)} s)` : "";
      const quoted = message.reasoning.trimEnd().split("\n").map((line) => (line ? `> ${line}` : ">"));
      parts.push([`> **Thinking**${took}`, ">", ...quoted].join("\n"));
    }
    if (message.content) parts.push(message.content.trimEnd());
    for (const call of message.toolCalls || []) parts.push(`Tool call \`${call.name}\`:`, fenced(pretty(call.arguments), "json"));
    if (message.error) parts.push(`*Error: ${message.error.message || message.error.code}*`);
    if (message.stopped) parts.push("*Stopped.*");
  }
  return `${parts.join("\n\n")}\n`;
}

/** JSON text indented for reading; anything that is not (yet) JSON, as it is. */
export function pretty(text) {
  const end = text.trimEnd().at(-1);
  if (end !== "}" && end !== "]") return text; // cheap: most partial JSON cannot parse
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

/** A code fence longer than any run of backticks in `text`. */
function fenced(text, language) {
  const longest = Math.max(2, ...(text.match(/`+/g) || []).map((run) => run.length));
  const fence = "`".repeat(longest + 1);
  return `${fence}${language}\n${text}\n${fence}`;
}

/** Save `text` as a file named after the conversation. */
export function download(chat, extension, type, text) {
  const name = chat.title.replace(/[^\p{L}\p{N}]+/gu, "-").replace(/^-|-$/g, "").slice(0, 60) || "conversation";
  const url = URL.createObjectURL(new Blob([text], { type: `${type};charset=utf-8` }));
  const link = document.createElement("a");
  link.href = url;
  link.download = `${name}.${extension}`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000); // once the download has surely read it
}
