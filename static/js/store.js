// What the page remembers in this browser. Conversations live in IndexedDB, which holds far more
// than localStorage's few megabytes (long reasoning filled those in a few hundred answers);
// settings and the access token, small, stay in localStorage. Everything is keyed by the page's
// path, so that two relays on one origin (mounted at different paths) keep their own.
//
// IndexedDB has two object stores: "chats" holds each conversation's id, title and time (all of
// them are read when the page opens) and "messages" its messages (read when it is opened).

import { readableMessages } from "./transfer.js";

const PREFIX = `thinkstream:${location.pathname}:`;
const DB_NAME = `thinkstream:${location.pathname}`;
const DB_VERSION = 1;

function read(key, fallback) {
  try {
    const value = localStorage.getItem(PREFIX + key);
    return value === null ? fallback : JSON.parse(value);
  } catch {
    return fallback; // Storage disabled or corrupt: start afresh rather than break the page.
  }
}

function write(key, value) {
  try {
    localStorage.setItem(PREFIX + key, JSON.stringify(value));
  } catch {
    // Quota or privacy mode: the page still works, it just forgets.
  }
}

export const DEFAULT_SETTINGS = { model: "", system: "", temperature: null };

export const store = {
  settings: () => ({ ...DEFAULT_SETTINGS, ...read("settings", {}) }),
  saveSettings: (settings) => write("settings", settings),
  token: () => read("token", ""),
  saveToken: (token) => write("token", token),
};

export function newChat() {
  return { id: newId(), title: "New chat", updated: Date.now(), messages: [] };
}

export function newId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(36).slice(2)}`;
}

/** The browser would not store a conversation; the message says why, in words for the page. */
export class StorageProblem extends Error {}

const REFUSED =
  "This browser does not let the page store conversations (a private window or a storage setting), " +
  "so they will be gone when you close it. Export one to keep it.";
const FULL =
  "The browser's storage for this page is full, so the latest change to this conversation was not saved. " +
  "Export it to keep it, or delete old conversations to make room.";
const NOT_MOVED =
  "The conversations an earlier version of this page kept could not be moved to the browser's database " +
  "(its storage may be full). They are still there, untouched; the page will try again next time.";

/** An IndexedDB request or transaction as a promise. */
function done(target) {
  return new Promise((resolve, reject) => {
    if (target instanceof IDBTransaction) {
      target.oncomplete = () => resolve();
      target.onabort = target.onerror = () => reject(target.error || new DOMException("aborted", "AbortError"));
    } else {
      target.onsuccess = () => resolve(target.result);
      target.onerror = () => reject(target.error);
    }
  });
}

/** What the chat list keeps of a conversation. */
export const meta = ({ id, title, updated }) => ({ id, title, updated });

/** Whether a stored message's text contains `needle` (lower case); whatever else is stored, false. */
const contains = (message, needle) =>
  typeof message?.content === "string" && message.content.toLowerCase().includes(needle);

/** An old page's conversation as the page keeps one, or null if it has messages but none the page can read. */
function oldChat(chat) {
  if (typeof chat !== "object" || chat === null || !Array.isArray(chat.messages)) return null;
  const messages = readableMessages(chat.messages);
  if (chat.messages.length && !messages.length) return null;
  return {
    id: typeof chat.id === "string" && chat.id ? chat.id : newId(),
    title: String(chat.title ?? "Chat"),
    updated: Number(chat.updated) || 0,
    messages,
  };
}

/** Conversations in IndexedDB. */
class History {
  constructor(db) {
    this.db = db;
    this.problem = null;
  }

  /** Every conversation's {id, title, updated}. */
  async list() {
    return done(this.db.transaction("chats").objectStore("chats").getAll());
  }

  /** One whole conversation, or undefined if it is gone. */
  async load(id) {
    const tx = this.db.transaction(["chats", "messages"]);
    const [head, body] = await Promise.all([
      done(tx.objectStore("chats").get(id)),
      done(tx.objectStore("messages").get(id)),
    ]);
    // Read as the page can read them: an earlier version moved the old page's messages unchecked.
    return head && { ...head, messages: body ? readableMessages(body.messages) : [] };
  }

  /** Store a whole conversation; rejects with a StorageProblem if the browser refuses. */
  async save(chat) {
    try {
      const tx = this.db.transaction(["chats", "messages"], "readwrite");
      tx.objectStore("chats").put(meta(chat));
      tx.objectStore("messages").put({ id: chat.id, messages: chat.messages });
      await done(tx);
    } catch (error) {
      throw new StorageProblem(error && error.name === "QuotaExceededError" ? FULL : REFUSED);
    }
  }

  async remove(id) {
    const tx = this.db.transaction(["chats", "messages"], "readwrite");
    tx.objectStore("chats").delete(id);
    tx.objectStore("messages").delete(id);
    await done(tx);
  }

  /** Ids of the conversations whose messages contain `text` (any case). */
  async search(text) {
    const needle = text.toLowerCase();
    const found = new Set();
    const cursor = this.db.transaction("messages").objectStore("messages").openCursor();
    await new Promise((resolve, reject) => {
      cursor.onerror = () => reject(cursor.error);
      cursor.onsuccess = () => {
        const at = cursor.result;
        if (!at) return resolve();
        if (at.value.messages.some((m) => contains(m, needle))) {
          found.add(at.value.id);
        }
        at.continue();
      };
    });
    return found;
  }

  /**
   * Move the conversations the old page kept in localStorage into IndexedDB, once. The
   * localStorage copy is changed only after the transaction that holds all of them has
   * committed, and a conversation already in IndexedDB (a migration another tab finished) is
   * never overwritten, so nothing is lost or doubled whatever happens in between. Messages are
   * moved as the page can read them (see readableMessages); an entry with none to read is left
   * in localStorage, untouched, rather than lost.
   */
  async migrate() {
    let raw;
    try {
      raw = localStorage.getItem(PREFIX + "chats");
    } catch {
      return; // localStorage itself is refused: nothing we can read.
    }
    if (raw === null) return;
    let chats;
    try {
      chats = JSON.parse(raw);
    } catch {
      return; // Unreadable: leave it where it is rather than lose it.
    }
    if (!Array.isArray(chats)) return;
    const tx = this.db.transaction(["chats", "messages"], "readwrite");
    const heads = tx.objectStore("chats");
    const bodies = tx.objectStore("messages");
    const present = new Set(await done(heads.getAllKeys()));
    const left = [];
    for (const entry of chats) {
      const chat = oldChat(entry);
      if (chat === null) {
        if (entry !== null) left.push(entry);
        continue;
      }
      if (present.has(chat.id)) continue;
      heads.put(meta(chat));
      bodies.put({ id: chat.id, messages: chat.messages });
    }
    await done(tx);
    if (left.length && left.length === chats.length) return; // nothing moved: nothing to change
    if (left.length) localStorage.setItem(PREFIX + "chats", JSON.stringify(left));
    else localStorage.removeItem(PREFIX + "chats");
  }
}

/** Conversations in memory only, when the browser refuses IndexedDB: the page works, and says it forgets. */
class MemoryHistory {
  constructor(chats, problem) {
    this.chats = new Map(chats.map((chat) => [chat.id, chat]));
    this.problem = problem;
  }

  async list() {
    return [...this.chats.values()].map(meta);
  }

  async load(id) {
    return this.chats.get(id) && structuredClone(this.chats.get(id));
  }

  async save(chat) {
    this.chats.set(chat.id, structuredClone(chat));
    throw new StorageProblem(this.problem);
  }

  async remove(id) {
    this.chats.delete(id);
  }

  async search(text) {
    const needle = text.toLowerCase();
    const found = new Set();
    for (const chat of this.chats.values()) {
      if (chat.messages.some((m) => contains(m, needle))) {
        found.add(chat.id);
      }
    }
    return found;
  }
}

function openDatabase() {
  const request = indexedDB.open(DB_NAME, DB_VERSION);
  request.onupgradeneeded = () => {
    request.result.createObjectStore("chats", { keyPath: "id" });
    request.result.createObjectStore("messages", { keyPath: "id" });
  };
  return done(request).then((db) => {
    // A later version of the page in another tab upgrades the database: let it, rather than block it.
    db.onversionchange = () => db.close();
    return db;
  });
}

/**
 * The page's conversations: in IndexedDB, with what localStorage held moved there; or, if the
 * browser refuses IndexedDB, in memory (with whatever localStorage holds), `problem` saying so.
 */
export async function openHistory() {
  let history;
  try {
    history = new History(await openDatabase());
  } catch {
    const old = read("chats", []);
    const chats = Array.isArray(old) ? old.map(oldChat).filter((chat) => chat !== null) : [];
    return new MemoryHistory(chats, REFUSED);
  }
  try {
    await history.migrate();
  } catch {
    history.problem = NOT_MOVED;
  }
  return history;
}
