// The relay's HTTP API, as the page uses it. All URLs are relative, so the page
// works wherever the app is mounted.
//
// Streams are read as NDJSON over fetch (which, unlike EventSource, can POST a
// whole conversation and send an access token). The events are numbered from 1
// without gaps, so counting them gives the position to resume from: a dropped
// connection is resumed with GET stream/{id}?last_event_id=<id>:<seq>, and every
// event arrives exactly once.

const MAX_RESUMES = 8;

// A stream the server took longer than this to generate…
const BURST_MIN_DURATION_MS = 1000;
// …whose events reached the page within this share of that time arrived in one burst.
const BURST_SHARE = 0.25;

/**
 * Whether a stream arrived at the page in one burst although the server took over a second to
 * generate it: the mark of a proxy that holds the response until it is complete. `arrival` is
 * when the page read the stream's first and last events; `done` is the stream's done event,
 * whose duration_ms is the server's generation time. Straight from the relay, the first event
 * (meta) arrives as the generation starts and the last as it ends, about duration_ms apart.
 */
export function arrivedInOneBurst(arrival, done) {
  const duration = done && done.duration_ms;
  if (!(duration > BURST_MIN_DURATION_MS) || arrival.first === null) return false;
  return arrival.last - arrival.first < duration * BURST_SHARE;
}

/** An error the relay answered before a stream began: {status, code, message}. */
export class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }

  static async from(response) {
    let code = "http_error";
    let message = `HTTP ${response.status}`;
    try {
      const { error } = await response.json();
      if (typeof error.code === "string") code = error.code;
      if (typeof error.message === "string") message = error.message;
    } catch {
      // Not the relay's JSON (a proxy's page, say): keep the status.
    }
    return new ApiError(response.status, code, message, response.headers.get("Retry-After"));
  }
}

export class Api {
  /** @param {() => string} getToken the access token, or "" */
  constructor(getToken) {
    this.getToken = getToken;
  }

  headers(extra = {}) {
    const token = this.getToken();
    return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
  }

  async models() {
    const response = await fetch("models", { headers: this.headers() });
    if (!response.ok) throw await ApiError.from(response);
    return (await response.json()).data;
  }

  /**
   * Start a generation and follow it to its end, resuming after drops.
   * @param {object} body the POST /stream body
   * @param {(event: object) => void} onEvent called once per contract event, in order
   * @returns {{done: Promise<void>, stop: () => Promise<void>, arrival: {first: ?number, last: ?number}}}
   *   `arrival`: when the first and the latest event were read (performance.now())
   */
  stream(body, onEvent) {
    const controller = new AbortController();
    const arrival = { first: null, last: null };
    let streamId = null;
    let seq = 0;
    let ended = false;
    let stopped = false;
    const take = (event, at) => {
      // Only this connection ended (its server is going away, say); the stream goes on elsewhere.
      // Not in the stream's log, so not counted: the resume below picks up after the last event.
      if (event.type === "error" && event.resume === true) return;
      if (arrival.first === null) arrival.first = at;
      arrival.last = at;
      seq += 1;
      if (event.type === "meta") streamId = event.stream;
      if (event.type === "done" || event.type === "error") ended = true;
      onEvent(event);
    };
    const run = async () => {
      let response = await fetch("stream?format=ndjson", {
        method: "POST",
        headers: this.headers({ "Content-Type": "application/json" }),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) throw await ApiError.from(response);
      let refused = null; // the latest resume the server answered with a transient error
      for (let attempt = 0; ; attempt += 1) {
        if (response) {
          const before = seq;
          try {
            await readLines(response, take);
          } catch (error) {
            if (stopped) return;
            // A dropped connection: resume below.
          }
          if (ended || stopped) return;
          if (seq > before) attempt = 0;
        }
        if (streamId === null || attempt >= MAX_RESUMES) {
          throw refused || new ApiError(0, "connection_lost", "The connection to the server was lost.");
        }
        await sleep(Math.max(backoff(attempt), retryAfterMs(refused?.retryAfter)));
        if (stopped) return;
        response = null;
        const query = new URLSearchParams({ format: "ndjson", last_event_id: `${streamId}:${seq}` });
        try {
          response = await fetch(`stream/${encodeURIComponent(streamId)}?${query}`, {
            headers: this.headers(),
            signal: controller.signal,
          });
        } catch (error) {
          if (stopped) return;
          refused = null; // what the server last said no longer holds: it cannot be reached now
          continue; // Still offline: try again.
        }
        if (response.status === 204) return;
        if (response.ok) {
          refused = null;
          continue;
        }
        refused = await ApiError.from(response);
        // Busy, rate limited or a proxy's hiccup: the stream goes on, so try again. Anything else
        // (no token, the stream gone) will not change by asking again.
        if (!isTransient(response.status)) throw refused;
        response = null;
      }
    };
    const stop = async () => {
      stopped = true;
      controller.abort();
      if (streamId !== null && !ended) {
        // Stop the generation on the server too, so the provider stops being paid.
        await fetch(`stream/${encodeURIComponent(streamId)}/cancel`, { method: "POST", headers: this.headers() });
      }
    };
    // Stopped before the answer began, fetch rejects with an AbortError: that is a stop, not an error.
    const done = run().catch((error) => {
      if (!stopped) throw error;
    });
    return { done, stop, arrival };
  }
}

/** How long to wait before resume attempt `attempt` (from 0): longer each time, up to 4 s. */
function backoff(attempt) {
  return Math.min(250 * 2 ** attempt, 4000);
}

/** A status a resume may get while the stream goes on: the server or a proxy before it is busy or down. */
function isTransient(status) {
  return status === 429 || status >= 500;
}

// The longest a Retry-After keeps a resume waiting: longer, and the answer would seem to hang.
const MAX_RETRY_AFTER_MS = 10_000;

/** A Retry-After header (seconds or an HTTP date) in milliseconds, within 0 and MAX_RETRY_AFTER_MS. */
function retryAfterMs(header) {
  if (!header) return 0;
  const seconds = Number(header);
  const ms = Number.isFinite(seconds) ? seconds * 1000 : Date.parse(header) - Date.now();
  return Number.isFinite(ms) ? Math.min(Math.max(ms, 0), MAX_RETRY_AFTER_MS) : 0;
}

// How long one task may spend on buffered events before letting the page paint.
const SLICE_MS = 8;

async function readLines(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let sliceStart = performance.now();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    const at = performance.now(); // when these bytes reached the page, before any work on them
    buffer += decoder.decode(value, { stream: true });
    let start = 0;
    let newline = buffer.indexOf("\n");
    while (newline !== -1) {
      if (newline > start) onEvent(JSON.parse(buffer.slice(start, newline)), at);
      start = newline + 1;
      newline = buffer.indexOf("\n", start);
    }
    buffer = buffer.slice(start);
    // A backlog makes every read() resolve at once, in one long task: break it up.
    if (performance.now() - sliceStart > SLICE_MS) {
      await sleep(0);
      sliceStart = performance.now();
    }
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
