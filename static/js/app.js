// The chat page: conversations (list, search, export, import), settings, sending, stopping, regenerating.

import { Api, ApiError, arrivedInOneBurst } from "./api.js";
import { frames, warmUp } from "./markdown.js";
import { StorageProblem, meta, newChat, newId, openHistory, store } from "./store.js";
import { download, fromJson, toJson, toMarkdown } from "./transfer.js";
import { AssistantMessage, errorWords, userMessage } from "./view.js";

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"),
  empty: $("empty"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  chatList: $("chat-list"),
  search: $("search"),
  importButton: $("import"),
  importFile: $("import-file"),
  exportMenu: $("export-menu"),
  notice: $("notice"),
  noticeText: $("notice-text"),
  title: $("chat-title"),
  announcer: $("announcer"),
  sidebar: $("sidebar"),
  toggleSidebar: $("toggle-sidebar"),
  settingsDialog: $("settings-dialog"),
  settingsForm: $("settings-form"),
  model: $("model"),
  system: $("system"),
  temperature: $("temperature"),
  tokenDialog: $("token-dialog"),
  tokenForm: $("token-form"),
  token: $("token"),
};

const api = new Api(() => store.token());
let conversations = null; // where they are kept (see store.js), once open
let chats = []; // every conversation's {id, title, updated}
let current = null; // the open conversation, whole
let matches = null; // ids of the conversations whose messages match the search box
let settings = store.settings();
let models = [];
let running = null; // {handle, view, stopped}

function save() {
  current.updated = Date.now();
  persist(current);
}

/** Store a conversation, and say so on the page if the browser will not. */
function persist(chat) {
  const entry = chats.find((c) => c.id === chat.id);
  if (entry) Object.assign(entry, meta(chat));
  else chats.push(meta(chat));
  return conversations.save(chat).then(
    () => {
      if (ui.notice.dataset.kind === "storage" && !conversations.problem) showNotice(null);
      if (ui.search.value.trim()) search(); // the list shows what matches now
    },
    (error) => showNotice(error instanceof StorageProblem ? error.message : String(error), "storage"),
  );
}

/** A message above the conversation (storage refused or full, an import that failed); null hides it. */
function showNotice(text, kind = "") {
  ui.notice.hidden = text === null;
  ui.noticeText.textContent = text ?? "";
  ui.notice.dataset.kind = kind;
}

function announce(text) {
  ui.announcer.textContent = "";
  // A fresh text node, so that repeating the same words is announced again.
  requestAnimationFrame(() => (ui.announcer.textContent = text));
}

// --- Conversations -------------------------------------------------------

function renderChatList() {
  ui.chatList.replaceChildren();
  const query = ui.search.value.trim().toLowerCase();
  const shown = [...chats]
    .sort((a, b) => b.updated - a.updated)
    .filter((chat) => !query || chat.title.toLowerCase().includes(query) || (matches && matches.has(chat.id)));
  for (const chat of shown) {
    const item = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "chat-open";
    open.textContent = chat.title;
    if (current && chat.id === current.id) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => openChat(chat.id));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "chat-delete";
    remove.textContent = "Delete";
    remove.setAttribute("aria-label", `Delete “${chat.title}”`);
    remove.addEventListener("click", () => deleteChat(chat.id));
    item.append(open, remove);
    ui.chatList.append(item);
  }
  if (query && !shown.length) {
    const none = document.createElement("li");
    none.className = "chat-none";
    none.textContent = "No conversation matches.";
    ui.chatList.append(none);
  }
}

let opening = null; // the conversation being read from storage, if any

async function openChat(id) {
  if (running) stop();
  opening = id;
  const chat = current && current.id === id ? current : await conversations.load(id);
  if (opening !== id) return; // another one was chosen meanwhile
  opening = null;
  if (chat) showChat(chat);
  else {
    chats = chats.filter((c) => c.id !== id); // deleted in another tab
    renderChatList();
  }
}

function showChat(chat) {
  if (current && current.id !== chat.id && !current.messages.length) forget(current.id); // an empty one is not kept
  current = chat;
  renderChat();
  renderChatList();
  showSidebar(false);
  ui.prompt.focus();
}

function startNewChat() {
  if (running) stop();
  if (current && !current.messages.length) return showChat(current); // one empty conversation is enough
  const chat = newChat();
  chats.push(meta(chat));
  showChat(chat);
}

function newest() {
  return chats.reduce((a, b) => (a && a.updated > b.updated ? a : b), null);
}

function forget(id) {
  chats = chats.filter((c) => c.id !== id);
  conversations.remove(id).catch(() => showNotice("The browser would not delete that conversation.", "storage"));
}

function deleteChat(id) {
  if (running && id === current.id) stop();
  forget(id);
  renderChatList();
  if (id !== current.id) return;
  if (chats.length) openChat(newest().id);
  else startNewChat();
}

function renderChat() {
  ui.messages.replaceChildren(ui.empty);
  ui.empty.hidden = current.messages.length > 0;
  ui.title.textContent = current.title;
  const last = current.messages.length - 1;
  current.messages.forEach((message, index) => {
    if (message.role === "user") {
      const isLastQuestion = index === last || (index === last - 1 && current.messages[last].role === "assistant");
      ui.messages.append(userMessage(message, { onEdit: isLastQuestion ? editLast : undefined }));
    } else {
      const handlers = index === last ? { onRetry: regenerate, onRegenerate: regenerate } : {};
      ui.messages.append(AssistantMessage.restore(message, handlers).node);
    }
  });
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

// --- Search ----------------------------------------------------------------

let searching = 0; // the latest search, so that an older one finishing late changes nothing

async function search() {
  if (!conversations) return;
  const query = ui.search.value.trim();
  const serial = ++searching;
  const found = query ? await conversations.search(query) : null;
  if (serial !== searching) return;
  matches = found;
  renderChatList();
}

// --- Export and import ----------------------------------------------------

function exportCurrent(format) {
  ui.exportMenu.open = false;
  if (format === "markdown") download(current, "md", "text/markdown", toMarkdown(current));
  else download(current, "json", "application/json", toJson(current));
}

async function importFile(file) {
  let chat;
  try {
    chat = fromJson(await file.text());
  } catch (error) {
    showNotice(`${file.name} could not be imported: ${error.message}`, "import");
    return;
  }
  if (!chat.id || chats.some((c) => c.id === chat.id)) chat.id = newId(); // already here: import a copy
  if (ui.notice.dataset.kind === "import") showNotice(null);
  if (running) stop();
  await persist(chat);
  showChat(chat);
  announce(`Imported “${chat.title}”.`);
}

// --- Sending -------------------------------------------------------------

function send(text) {
  if (!text.trim() || running || !current) return;
  const message = { role: "user", content: text };
  current.messages.push(message);
  if (current.title === "New chat") current.title = text.trim().slice(0, 60);
  save();
  // Update the page in place: re-rendering a long conversation would stall it.
  clearStaleActions();
  ui.empty.hidden = true;
  ui.title.textContent = current.title;
  ui.messages.append(userMessage(message, { onEdit: editLast }));
  renderChatList();
  generate();
}

/** Only the last exchange can be edited, retried or regenerated. */
function clearStaleActions() {
  for (const action of ui.messages.querySelectorAll(".action.edit, .action.retry, .action.regenerate")) {
    action.remove();
  }
}

/** Remove the last `count` messages from the page (they were just removed from the chat). */
function removeLastMessages(count) {
  const nodes = ui.messages.querySelectorAll("article.message");
  for (let i = Math.max(0, nodes.length - count); i < nodes.length; i += 1) nodes[i].remove();
}

function requestBody() {
  const messages = [];
  if (settings.system.trim()) messages.push({ role: "system", content: settings.system });
  for (const message of current.messages) {
    // A question that got no answer is left out with its failed or empty answer, if any, so
    // that the model sees questions and answers in turn.
    const unanswered = messages.at(-1)?.role === "user";
    if (message.role === "assistant" && (message.error || !message.content)) {
      if (unanswered) messages.pop();
      continue;
    }
    if (message.role === "user" && unanswered) messages.pop();
    messages.push({ role: message.role, content: message.content });
  }
  const body = { messages };
  if (settings.model) body.model = settings.model;
  if (settings.temperature !== null && settings.temperature !== "") body.temperature = Number(settings.temperature);
  return body;
}

function generate() {
  const chat = current;
  const view = new AssistantMessage({ onRetry: regenerate, onRegenerate: regenerate });
  view.node.setAttribute("aria-busy", "true");
  ui.empty.hidden = true;
  ui.messages.append(view.node);
  const record = { role: "assistant", content: "", reasoning: "" };
  let outcome = {};
  frames.onFrame = follow;
  const handle = api.stream(requestBody(), (event) => {
    if (event.type === "reasoning") view.reason(event.text);
    else if (event.type === "content") view.say(event.text);
    else if (event.type === "tool_call") view.toolCall(event);
    else if (event.type === "done") outcome = { stats: event };
    else if (event.type === "error") outcome = { error: { code: event.code, message: event.message } };
  });
  running = { handle, view, stopped: false };
  setRunning(true);
  handle.done
    .catch((error) => {
      if (error instanceof ApiError && error.status === 401) {
        askForToken();
      }
      // Only the relay's errors carry a code of its own (a DOMException's `code` is a number).
      const code = error instanceof ApiError ? error.code : "connection_lost";
      outcome = { error: { code, message: String(error.message ?? "") } };
    })
    .finally(() => {
      const stopped = running && running.stopped;
      running = null;
      setRunning(false);
      if (stopped) outcome = { ...outcome, stopped: true };
      if (outcome.stats && arrivedInOneBurst(handle.arrival, outcome.stats)) outcome = { ...outcome, buffered: true };
      Object.assign(record, {
        content: view.content,
        reasoning: view.reasoningSoFar,
        thoughtSeconds: view.thoughtSeconds,
        ...outcome,
      });
      if (view.calls.size) record.toolCalls = view.toolCalls;
      // Deleted while it streamed: storing the answer would bring the conversation back.
      if (chats.some((c) => c.id === chat.id)) {
        chat.messages.push(record);
        chat.updated = Date.now();
        persist(chat);
      }
      // The live view becomes the stored message as it is: no re-render.
      view.finish(outcome, () => {
        frames.onFrame = null;
        requestAnimationFrame(follow);
        announce(outcome.error ? `Error: ${errorWords(outcome.error)}` : "Answer complete.");
      });
    });
}

function follow() {
  // Once per frame, at its start: keep the newest text in view, unless the
  // reader scrolled up to read.
  const box = ui.messages;
  if (box.scrollHeight - box.scrollTop - box.clientHeight < 160) box.scrollTop = box.scrollHeight;
}

function setRunning(on) {
  ui.send.hidden = on;
  ui.stop.hidden = !on;
}

function stop() {
  if (!running) return;
  running.stopped = true;
  // The cancel request may fail (offline): the answer stops on the page all the same.
  running.handle.stop().catch(() => {});
}

function dropLastAnswer() {
  while (current.messages.length && current.messages.at(-1).role === "assistant") current.messages.pop();
}

function dropLastAnswerFromPage() {
  const before = current.messages.length;
  dropLastAnswer();
  removeLastMessages(before - current.messages.length);
}

function regenerate() {
  if (running) return;
  dropLastAnswerFromPage();
  save();
  generate();
}

function editLast() {
  if (running) return;
  dropLastAnswerFromPage();
  const question = current.messages.pop();
  removeLastMessages(1);
  save();
  ui.empty.hidden = current.messages.length > 0;
  ui.prompt.value = question ? question.content : "";
  ui.prompt.focus();
}

// --- Settings and token -------------------------------------------------------

async function loadModels() {
  try {
    models = await api.models();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) askForToken();
    models = [];
  }
  ui.model.replaceChildren();
  // Models of several providers are grouped under each provider's name.
  const groups = new Map();
  const grouped = new Set(models.map((model) => model.provider)).size > 1;
  for (const model of models) {
    const option = document.createElement("option");
    option.value = model.default ? "" : model.id;
    option.textContent = model.default ? `${model.id} (default)` : model.id;
    if (grouped && !groups.has(model.provider)) {
      const group = document.createElement("optgroup");
      group.label = model.provider;
      groups.set(model.provider, group);
      ui.model.append(group);
    }
    (grouped ? groups.get(model.provider) : ui.model).append(option);
  }
  if (!models.length) {
    const option = document.createElement("option");
    option.value = "";
    option.textContent = "Server default";
    ui.model.append(option);
  }
}

function openSettings() {
  if (settings.model && ![...ui.model.options].some((option) => option.value === settings.model)) {
    // The model list has not arrived (or no longer lists it): keep the saved choice rather than lose it on Save.
    const option = document.createElement("option");
    option.value = settings.model;
    option.textContent = settings.model;
    ui.model.append(option);
  }
  ui.model.value = settings.model;
  ui.system.value = settings.system;
  ui.temperature.value = settings.temperature ?? "";
  ui.settingsDialog.showModal();
}

ui.settingsDialog.addEventListener("close", () => {
  if (ui.settingsDialog.returnValue !== "save") return;
  settings = {
    model: ui.model.value,
    system: ui.system.value,
    temperature: ui.temperature.value === "" ? null : Number(ui.temperature.value),
  };
  store.saveSettings(settings);
});

function askForToken() {
  if (!ui.tokenDialog.open) {
    ui.token.value = "";
    ui.tokenDialog.showModal();
  }
}

ui.tokenDialog.addEventListener("close", () => {
  if (ui.tokenDialog.returnValue !== "save") return;
  store.saveToken(ui.token.value.trim());
  loadModels();
});

// --- Wiring ----------------------------------------------------------------

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value;
  if (!text.trim() || running) return;
  ui.prompt.value = "";
  send(text);
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key !== "Escape" || ui.settingsDialog.open || ui.tokenDialog.open) return;
  if (ui.exportMenu.open) ui.exportMenu.open = false;
  else if (ui.sidebar.classList.contains("open")) showSidebar(false);
  else if (running) stop();
});
ui.stop.addEventListener("click", stop);
$("new-chat").addEventListener("click", startNewChat);
ui.search.addEventListener("input", search);
ui.importButton.addEventListener("click", () => ui.importFile.click());
ui.importFile.addEventListener("change", () => {
  const [file] = ui.importFile.files;
  ui.importFile.value = "";
  if (file) importFile(file);
});
$("export-markdown").addEventListener("click", () => exportCurrent("markdown"));
document.addEventListener("click", (event) => {
  if (ui.exportMenu.open && !ui.exportMenu.contains(event.target)) ui.exportMenu.open = false;
});
$("export-json").addEventListener("click", () => exportCurrent("json"));
$("notice-close").addEventListener("click", () => showNotice(null));
$("open-settings").addEventListener("click", openSettings);
function showSidebar(open) {
  ui.sidebar.classList.toggle("open", open);
  ui.toggleSidebar.setAttribute("aria-expanded", String(open));
}
ui.toggleSidebar.addEventListener("click", () => showSidebar(!ui.sidebar.classList.contains("open")));
// On a phone the list covers the page: a tap beside it or Escape closes it.
document.querySelector(".main").addEventListener("click", (event) => {
  if (ui.sidebar.classList.contains("open") && event.target !== ui.toggleSidebar) showSidebar(false);
});

/** Open the stored conversations (moving the old page's into IndexedDB once) and show the latest. */
async function start() {
  conversations = await openHistory();
  if (conversations.problem) showNotice(conversations.problem, "storage");
  let chat;
  try {
    chats = await conversations.list();
    const latest = newest();
    chat = latest && (await conversations.load(latest.id));
  } catch {
    showNotice("The browser would not read the stored conversations. New ones may not be kept either.", "storage");
  }
  if (chat) showChat(chat);
  else startNewChat();
  document.documentElement.dataset.history = "open"; // for tests: the conversations are on the page
}

start();
loadModels();
warmUp();
ui.prompt.focus();
