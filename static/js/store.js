// What the page remembers in this browser: conversations, settings, the access token.
// Everything is under one prefix, so that two relays on one origin (mounted at
// different paths) keep their own.

const PREFIX = `thinkstream:${location.pathname}:`;

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
  chats: () => read("chats", []),
  saveChats: (chats) => write("chats", chats),
  settings: () => ({ ...DEFAULT_SETTINGS, ...read("settings", {}) }),
  saveSettings: (settings) => write("settings", settings),
  token: () => read("token", ""),
  saveToken: (token) => write("token", token),
};

export function newChat() {
  const id = crypto.randomUUID ? crypto.randomUUID() : String(Date.now() + Math.random());
  return { id, title: "New chat", updated: Date.now(), messages: [] };
}
