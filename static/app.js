// A minimal client of the event contract: one EventSource per question.
// All model text goes into the page with textContent, never as HTML.

const form = document.getElementById("ask");
const prompt = document.getElementById("prompt");
const send = document.getElementById("send");
const stop = document.getElementById("stop");
const thinking = document.getElementById("thinking");
const reasoning = document.getElementById("reasoning");
const answer = document.getElementById("answer");
const status = document.getElementById("status");

let source = null;
let streamId = null;

function finish(message, isError) {
  if (source) source.close();
  source = null;
  send.disabled = false;
  stop.disabled = true;
  status.textContent = message;
  status.classList.toggle("error", Boolean(isError));
}

function ask(text) {
  reasoning.textContent = "";
  answer.textContent = "";
  thinking.hidden = true;
  thinking.open = true;
  status.textContent = "Waiting for the model…";
  status.classList.remove("error");
  send.disabled = true;
  stop.disabled = false;

  // Relative URL: the page works wherever the app is mounted. If the connection
  // drops, EventSource reconnects with Last-Event-ID and the server resumes the
  // same generation.
  source = new EventSource("stream?" + new URLSearchParams({ prompt: text }));
  source.addEventListener("meta", (e) => {
    streamId = JSON.parse(e.data).stream;
  });
  source.addEventListener("reasoning", (e) => {
    thinking.hidden = false;
    reasoning.textContent += JSON.parse(e.data).text;
  });
  source.addEventListener("content", (e) => {
    thinking.open = false;
    answer.textContent += JSON.parse(e.data).text;
  });
  source.addEventListener("done", (e) => {
    const done = JSON.parse(e.data);
    const tokens = done.usage ? `, ${done.usage.completion_tokens} tokens` : "";
    finish(`First token after ${done.ttft_ms} ms, done in ${done.duration_ms} ms${tokens}.`);
  });
  source.addEventListener("error", (e) => {
    // A server-sent `error` event carries data; a dropped connection does not.
    if (e.data) {
      const error = JSON.parse(e.data);
      finish(`Error (${error.code}): ${error.message}`, true);
    } else if (source && source.readyState === EventSource.CLOSED) {
      finish("The connection to the server was lost.", true);
    }
  });
}

form.addEventListener("submit", (e) => {
  e.preventDefault();
  if (prompt.value.trim()) ask(prompt.value);
});
prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    form.requestSubmit();
  }
});
stop.addEventListener("click", () => {
  // Stop the generation on the server too, so the provider stops being paid.
  if (streamId) fetch(`stream/${encodeURIComponent(streamId)}/cancel`, { method: "POST" });
  finish("Stopped.");
});
