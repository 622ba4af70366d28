// The Studio: a small hash router over the views; the key form when there is no key.

import { ApiError, api, clearKey, getKey, setKey } from "./api.js";
import { characterView, charactersView } from "./characters.js";
import { designView, designsView } from "./design.js";
import { clear, errorBox, field, h } from "./dom.js";
import { revokeAll } from "./dom.js";
import { evalRunView, evalsView } from "./evals.js";
import { playgroundView } from "./playground.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const session = document.getElementById("session");
let current = null;

const ROUTES = [
  { pattern: /^characters$/, section: "characters", view: charactersView },
  { pattern: /^characters\/([^/]+)$/, section: "characters", view: characterView },
  { pattern: /^design$/, section: "design", view: designsView },
  { pattern: /^design\/([^/]+)$/, section: "design", view: designView },
  { pattern: /^playground$/, section: "playground", view: playgroundView },
  { pattern: /^playground\/([^/]+)$/, section: "playground", view: playgroundView },
  { pattern: /^evals$/, section: "evals", view: evalsView },
  { pattern: /^evals\/([^/]+)$/, section: "evals", view: evalRunView },
];

function decode(part) {
  try {
    return decodeURIComponent(part);
  } catch (_) {
    return part;
  }
}

export function go(hash) {
  if (location.hash === hash) render();
  else location.hash = hash;
}

function showSession() {
  clear(session);
  if (!getKey()) {
    nav.hidden = true;
    return;
  }
  nav.hidden = false;
  session.append(
    h("span", { class: "muted", text: "API key kept in this tab only" }),
    " ",
    h("button", {
      type: "button",
      id: "forget-key",
      text: "Forget key",
      on: {
        click: () => {
          clearKey();
          go("#/characters");
        },
      },
    }),
  );
}

function loginView(message) {
  const input = h("input", {
    type: "password",
    id: "key-input",
    name: "key",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
  });
  const out = h("div", { class: "form-errors" });
  const form = h(
    "form",
    { class: "panel login", "aria-labelledby": "login-title" },
    h("h2", { id: "login-title", tabindex: "-1", text: "Sign in with an API key" }),
    h("p", {
      text:
        "Paste a key from `imagegen keys create` (or the one `imagegen studio` printed). It stays in this " +
        "browser tab (sessionStorage) and is sent as a header, never in a URL.",
    }),
    field("API key", input),
    h("button", { type: "submit", id: "key-submit", class: "primary", text: "Use this key" }),
    out,
  );
  if (message) out.append(errorBox(message));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clear(out);
    const key = input.value.trim();
    if (!key) {
      out.append(errorBox(new ApiError(0, "missing_key", "type an API key first")));
      return;
    }
    setKey(key);
    try {
      await api.get("/v1/presets");
    } catch (err) {
      clearKey();
      out.append(errorBox(err));
      input.focus();
      return;
    }
    showSession();
    render();
  });
  return form;
}

async function render() {
  if (current) current.abort();
  current = new AbortController();
  const signal = current.signal;
  revokeAll();
  clear(main);
  // where the focus was once the old page was gone: the new page's heading takes it only if the user has not moved
  // it meanwhile (a keyboard user who tabbed to the nav while the page loaded keeps their place)
  const focusAtStart = document.activeElement;
  clear(document.getElementById("notice"));
  showSession();
  if (!getKey()) {
    main.append(loginView());
    const title = document.getElementById("login-title");
    if (title) title.focus();
    return;
  }
  const hash = location.hash.replace(/^#\/?/, "") || "characters";
  const route = ROUTES.find((r) => r.pattern.test(hash));
  for (const link of nav.querySelectorAll("a")) link.removeAttribute("aria-current");
  if (!route) {
    main.append(h("h2", { tabindex: "-1", text: "Not found" }), h("p", { text: "No such page in the Studio." }));
    return;
  }
  const active = nav.querySelector(`a[data-section="${route.section}"]`);
  if (active) active.setAttribute("aria-current", "page");
  const params = route.pattern.exec(hash).slice(1).map(decode);
  try {
    await route.view({ main, signal, params, go });
  } catch (err) {
    if (err && err.name === "AbortError") return;
    if (err instanceof ApiError && err.status === 401) {
      clearKey();
      clear(main).append(loginView(err));
      showSession();
      return;
    }
    main.append(errorBox(err));
  }
  if (signal.aborted) return;
  const heading = main.querySelector("h2");
  const focusMoved = document.activeElement !== focusAtStart && document.activeElement !== document.body;
  if (heading && !main.contains(document.activeElement) && !focusMoved) {
    heading.setAttribute("tabindex", "-1");
    heading.focus();
  }
}

window.addEventListener("hashchange", render);
render();
