// The Studio's only way to the service: the public /v1 API, with the user's key as a header.
//
// The key lives in sessionStorage (gone when the tab closes) and is sent as
// `Authorization: Bearer ...` on every fetch: never in a URL, never in a cookie. Images are
// fetched as blobs and shown through object URLs; job and design events are read from a fetch
// stream (server-sent events parsed here), because EventSource and <img> cannot send a header.

const KEY_NAME = "imagegen.studio.key";
const TERMINAL = new Set(["done", "failed", "cancelled"]);

export class ApiError extends Error {
  /** An error as the API words it: {"error": {"code", "message", "field"}}. */
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field || null;
  }
}

export function getKey() {
  return sessionStorage.getItem(KEY_NAME);
}

export function setKey(key) {
  sessionStorage.setItem(KEY_NAME, key);
}

export function clearKey() {
  sessionStorage.removeItem(KEY_NAME);
}

async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") {
      return new ApiError(response.status, body.error.code, body.error.message, body.error.field);
    }
  } catch (_) {
    // not JSON: say what HTTP said
  }
  return new ApiError(response.status, "http_" + response.status, `HTTP ${response.status} ${response.statusText}`);
}

function headers(extra) {
  const key = getKey();
  const out = Object.assign({}, extra || {});
  if (key) out["Authorization"] = "Bearer " + key;
  return out;
}

/** One request; throws ApiError unless the answer is 2xx. */
export async function request(method, path, { json, form, accept, signal, extraHeaders } = {}) {
  const hdrs = headers(extraHeaders);
  let body;
  if (json !== undefined) {
    hdrs["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser sets the multipart boundary
  }
  if (accept) hdrs["Accept"] = accept;
  let response;
  try {
    response = await fetch(path, { method, headers: hdrs, body, signal, cache: "no-store", credentials: "omit" });
  } catch (exc) {
    if (exc && exc.name === "AbortError") throw exc;
    throw new ApiError(0, "network_error", "the service cannot be reached: " + (exc && exc.message ? exc.message : exc));
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export const api = {
  get: async (path, opts) => (await request("GET", path, opts)).json(),
  post: async (path, json, opts) => (await request("POST", path, Object.assign({ json }, opts))).json(),
  postForm: async (path, form, opts) => (await request("POST", path, Object.assign({ form }, opts))).json(),
  del: async (path, opts) => (await request("DELETE", path, opts)).json(),
  text: async (path, opts) => (await request("GET", path, opts)).text(),
  blob: async (path, opts) => (await request("GET", path, opts)).blob(),
};

/** Path segments are always encoded: an id typed by someone can never change the route. */
export function path(strings, ...values) {
  let out = strings[0];
  values.forEach((value, i) => {
    out += encodeURIComponent(String(value)) + strings[i + 1];
  });
  return out;
}

/** base64 (a PNG in a JSON answer) to a Blob. */
export function base64Blob(data, type = "image/png") {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}

function parseBlock(block) {
  const event = { id: null, event: "message", data: [] };
  let any = false;
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "id") event.id = value;
    else if (field === "event") event.event = value;
    else if (field === "data") event.data.push(value);
    else continue;
    any = true;
  }
  return any ? event : null;
}

/**
 * Follow a server-sent event stream (a job's or a design's) over fetch, with the key as a header.
 * onEvent(type, data) is called per event; a `reconnect` event (the server's stream lifetime)
 * resumes with Last-Event-ID. Resolves when the stream ends (a terminal event, or the server closed
 * it because there is nothing more to say).
 */
export async function streamEvents(eventsPath, onEvent, { signal } = {}) {
  let lastId = null;
  for (let round = 0; round < 100; round++) {
    const extraHeaders = { Accept: "text/event-stream" };
    if (lastId) extraHeaders["Last-Event-ID"] = lastId;
    const response = await request("GET", eventsPath, { signal, extraHeaders });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let reconnect = false;
    let ended = false;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = (buffer + value).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = parseBlock(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (!event) continue;
        if (event.id) lastId = event.id;
        if (event.event === "reconnect") {
          reconnect = true;
          continue;
        }
        const raw = event.data.join("\n");
        let data = raw;
        try {
          data = JSON.parse(raw);
        } catch (_) {
          // plain text data
        }
        onEvent(event.event, data);
        if (TERMINAL.has(event.event)) ended = true;
      }
    }
    if (ended || !reconnect) return;
  }
}
