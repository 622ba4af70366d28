// Building the page with DOM APIs only: text goes in through textContent / text nodes, never
// through innerHTML, so nothing a user typed (a name, a card, a prompt) can become markup.

import { ApiError, api } from "./api.js";

const objectUrls = new Set();

/**
 * h("button", {class: "primary", on: {click: fn}, text: "Go"}, child, ...): an element.
 * Strings among the children become text nodes. Attributes are set with setAttribute; an
 * event handler can only be a function (`on`), never a string of code.
 */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "text") el.textContent = String(value);
    else if (name === "on") for (const [type, fn] of Object.entries(value)) el.addEventListener(type, fn);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name === "value") el.value = String(value);
    else if (name === "checked" || name === "disabled" || name === "selected" || name === "required") el[name] = true;
    else if (name.toLowerCase().startsWith("on")) throw new Error("event handlers go in `on`");
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

/** An object URL kept until the view changes (then revoked, see revokeAll). */
export function objectUrl(blob) {
  const url = URL.createObjectURL(blob);
  objectUrls.add(url);
  return url;
}

export function revokeAll() {
  for (const url of objectUrls) URL.revokeObjectURL(url);
  objectUrls.clear();
}

/** An <img> whose bytes are fetched with the key (a blob); says the API's error if it cannot be had. */
export function apiImage(src, alt, { signal, className } = {}) {
  const figure = h("div", { class: "img-frame" + (className ? " " + className : "") });
  const img = h("img", { alt, class: "loading" });
  figure.append(img);
  api
    .blob(src, { signal })
    .then((blob) => {
      img.src = objectUrl(blob);
      img.classList.remove("loading");
    })
    .catch((err) => {
      if (err && err.name === "AbortError") return;
      img.remove();
      figure.append(h("p", { class: "error", text: errorText(err) }));
    });
  return figure;
}

/** An <img> of bytes the page already has (a base64 PNG from a render answer). */
export function blobImage(blob, alt) {
  return h("div", { class: "img-frame" }, h("img", { alt, src: objectUrl(blob) }));
}

export function errorText(err) {
  if (err instanceof ApiError) return err.message;
  return err && err.message ? err.message : String(err);
}

/** An alert box with an error as the API words it (its code beside it). */
export function errorBox(err) {
  const box = h("div", { class: "error-box", role: "alert" });
  box.append(h("span", { class: "error-message", text: errorText(err) }));
  if (err instanceof ApiError && err.code) box.append(" ", h("code", { class: "error-code", text: err.code }));
  return box;
}

/** Replace what `slot` shows with an error box. */
export function showError(slot, err) {
  clear(slot).append(errorBox(err));
}

export function section(title, ...children) {
  return h("section", { class: "panel" }, h("h3", { text: title }), ...children);
}

/** A labelled control: <label for=id>text</label> + the control. */
export function field(labelText, control, hint) {
  if (!control.id) control.id = "f-" + Math.random().toString(36).slice(2, 10);
  const wrap = h("div", { class: "field" }, h("label", { for: control.id, text: labelText }), control);
  if (hint) {
    const hintEl = h("small", { class: "hint", id: control.id + "-hint", text: hint });
    control.setAttribute("aria-describedby", hintEl.id);
    wrap.append(hintEl);
  }
  return wrap;
}

export function select(options, value) {
  const el = h("select");
  for (const option of options) {
    const [val, label] = Array.isArray(option) ? option : [option, option];
    const opt = h("option", { value: val, text: label });
    if (String(val) === String(value)) opt.selected = true;
    el.append(opt);
  }
  return el;
}

/** A similarity shown against a threshold: green at or above it, red below, grey when there is no face. */
export function similarityBadge(similarity, threshold) {
  if (similarity === null || similarity === undefined) {
    return h("span", { class: "score none", text: "no face" });
  }
  const value = Number(similarity).toFixed(3);
  if (threshold === null || threshold === undefined || Number.isNaN(Number(threshold))) {
    return h("span", { class: "score", text: `similarity ${value}` });
  }
  const passed = Number(similarity) >= Number(threshold);
  return h("span", {
    class: "score " + (passed ? "pass" : "fail"),
    text: `similarity ${value} ${passed ? "≥" : "<"} ${Number(threshold).toFixed(3)}`,
  });
}

export function verdictBadge(verdict) {
  const v = String(verdict || "unknown");
  return h("span", { class: "verdict verdict-" + v.replace(/[^a-z_-]/gi, ""), text: v.toUpperCase() });
}

export function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}

/** A <dl> of label -> value pairs (values as text). */
export function facts(pairs) {
  const dl = h("dl", { class: "facts" });
  for (const [label, value] of pairs) {
    if (value === undefined || value === null || value === "") continue;
    dl.append(h("dt", { text: label }), h("dd", {}, value instanceof Node ? value : String(value)));
  }
  return dl;
}

/** A button that disables itself while its async action runs (no double submits). */
export function actionButton(label, action, props = {}) {
  const button = h("button", Object.assign({ type: "button" }, props, { text: label }));
  button.addEventListener("click", async (event) => {
    event.preventDefault();
    if (button.disabled) return;
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    try {
      await action(event);
    } finally {
      button.disabled = false;
      button.removeAttribute("aria-busy");
      // a disabled button drops the keyboard focus: give it back if nothing else took it
      if (button.isConnected && (document.activeElement === document.body || !document.activeElement)) button.focus();
    }
  });
  return button;
}
