// The render playground: one render (prompt, character, method, identity weight, seed) and the
// comparison grid (methods x identity weights x seeds), each image with its similarity to the
// character under it, coloured against the threshold.
//
// Renders go through POST /v1/renders with the consistency gate on for one attempt
// (min_identity_similarity = the threshold, max_attempts = 1): that is how the service scores an
// image against the character; nothing is re-rendered.

import { ApiError, api, base64Blob, path } from "./api.js";
import { actionButton, blobImage, clear, errorBox, field, h, section, select, similarityBadge } from "./dom.js";

const MAX_GRID = 48;
const CONCURRENCY = 4;

function numbers(text, what, { integer = false, min = -Infinity, max = Infinity } = {}) {
  const parts = String(text)
    .split(/[\s,]+/)
    .filter(Boolean);
  if (!parts.length) throw new ApiError(0, "invalid_input", `${what}: give at least one value`, what);
  return parts.map((part) => {
    const value = Number(part);
    if (!Number.isFinite(value) || (integer && !Number.isInteger(value)) || value < min || value > max) {
      const kind = integer ? "a whole number" : "a number";
      throw new ApiError(0, "invalid_input", `${what}: ${JSON.stringify(part)} is not ${kind} in [${min}, ${max}]`, what);
    }
    return value;
  });
}

export async function playgroundView({ main, signal, params }) {
  main.append(h("h2", { text: "Playground" }));
  const [presetData, characterData] = await Promise.all([
    api.get("/v1/presets", { signal }),
    api.get("/v1/characters", { signal }),
  ]);
  const presets = presetData.presets;
  const wanted = params[0] || "";
  const prompt = h("textarea", { id: "prompt", rows: "3", maxlength: "2000" });
  prompt.value = "portrait photo, soft light";
  const characterOptions = [["", "(no character)"]].concat(
    characterData.characters.map((c) => [c.id, `${c.name} (${c.id}, ${c.status})`]),
  );
  const character = select(characterOptions, wanted);
  character.id = "character";
  const preset = select(
    presets.map((p) => [p.name, `${p.name} (${p.family})`]),
    presets.length ? presets[0].name : "",
  );
  preset.id = "preset";
  const threshold = h("input", { id: "threshold", type: "number", step: "0.001", min: "-1", max: "1" });
  const thresholdNote = h("small", { class: "hint", id: "threshold-note" });

  const method = h("select", { id: "method" });
  const weight = h("input", { id: "weight", type: "number", step: "0.05", min: "0", max: "3", value: "1" });
  const seed = h("input", { id: "seed", type: "number", step: "1", min: "0", value: "1" });
  const single = h("div", { id: "single-result", "aria-live": "polite" });

  const methodsBox = h("fieldset", { class: "methods", id: "grid-methods" }, h("legend", { text: "Methods" }));
  const weights = h("input", { id: "weights", type: "text", value: "0, 0.5, 1" });
  const seeds = h("input", { id: "seeds", type: "text", value: "1, 2" });
  const grid = h("div", { id: "grid", "aria-live": "polite" });

  function presetInfo() {
    return presets.find((p) => p.name === preset.value) || { methods: [] };
  }

  function fillMethods() {
    const info = presetInfo();
    clear(method);
    for (const m of info.methods) method.append(h("option", { value: m, text: m }));
    for (const old of methodsBox.querySelectorAll(".check")) old.remove();
    info.methods.forEach((m, i) => {
      const box = h("input", { type: "checkbox", id: `grid-method-${i}`, value: m });
      if (i === 0) box.checked = true;
      methodsBox.append(h("div", { class: "check" }, box, h("label", { for: box.id, text: m })));
    });
  }

  async function fillThreshold() {
    threshold.value = "";
    thresholdNote.textContent = "";
    if (!character.value) {
      thresholdNote.textContent = "Pick a character to score renders against it.";
      return;
    }
    try {
      const report = await api.get(path`/v1/characters/${character.value}/report`, { signal });
      if (report.threshold !== undefined && report.threshold !== null) {
        threshold.value = String(report.threshold);
        thresholdNote.textContent = `The ${report.backend || "face"} backend's same-identity threshold (from the character's report).`;
      }
    } catch (err) {
      if (err && err.name === "AbortError") return;
      thresholdNote.textContent = "No threshold from the character's report (" + err.message + "): type one to score renders.";
    }
  }

  preset.addEventListener("change", fillMethods);
  character.addEventListener("change", fillThreshold);
  fillMethods();
  await fillThreshold();

  function body({ methodName, identityWeight, seedValue }) {
    const out = { preset: preset.value, prompt: prompt.value, seed: seedValue, num_images: 1 };
    if (character.value) {
      out.character = character.value;
      if (methodName) out.method = methodName;
      out.identity_weight = identityWeight;
      const t = threshold.value.trim();
      if (t !== "") {
        out.min_identity_similarity = Number(t);
        out.max_attempts = 1;
      }
    }
    return out;
  }

  async function renderOne(request) {
    const answer = await api.post("/v1/renders", request, { signal });
    return answer.images[0];
  }

  function imageCell(image, request, alt) {
    const caption = h("figcaption");
    if (image.problem) caption.append(h("span", { class: "error", text: `unusable image (${image.problem})` }));
    caption.append(h("span", { class: "muted", text: `seed ${image.seed}` }));
    if (request.character) {
      if (request.min_identity_similarity !== undefined) {
        caption.append(similarityBadge(image.identity_similarity, request.min_identity_similarity));
      } else {
        caption.append(h("span", { class: "score none", text: "not scored (no threshold)" }));
      }
    }
    const picture = image.png_base64 ? blobImage(base64Blob(image.png_base64), alt) : h("p", { class: "muted", text: "(no image)" });
    return h("figure", { class: "cell render" }, picture, caption);
  }

  const renderButton = actionButton(
    "Render",
    async () => {
      clear(single).append(h("p", { class: "muted", text: "Rendering…" }));
      let request;
      try {
        const [seedValue] = numbers(seed.value, "seed", { integer: true, min: 0 });
        const [identityWeight] = numbers(weight.value, "identity weight", { min: 0, max: 3 });
        request = body({ methodName: method.value, identityWeight, seedValue });
        const image = await renderOne(request);
        const label = request.character ? `${request.method} · weight ${request.identity_weight}` : "no character";
        clear(single).append(
          h("p", { class: "prompt", text: request.prompt }),
          imageCell(image, request, `render: ${label}, seed ${image.seed}`),
          h("p", { class: "muted", text: label }),
        );
      } catch (err) {
        if (err && err.name === "AbortError") return;
        clear(single).append(errorBox(err));
      }
    },
    { id: "render", class: "primary" },
  );

  const gridButton = actionButton(
    "Render the comparison grid",
    async () => {
      clear(grid);
      let methodNames;
      let weightValues;
      let seedValues;
      try {
        if (!character.value) throw new ApiError(0, "invalid_input", "pick a character: the grid compares its renders", "character");
        methodNames = [...methodsBox.querySelectorAll("input:checked")].map((box) => box.value);
        if (!methodNames.length) throw new ApiError(0, "invalid_input", "tick at least one method", "methods");
        weightValues = numbers(weights.value, "identity weights", { min: 0, max: 3 });
        seedValues = numbers(seeds.value, "seeds", { integer: true, min: 0 });
        const cells = methodNames.length * weightValues.length * seedValues.length;
        if (cells > MAX_GRID) {
          throw new ApiError(0, "invalid_input", `the grid would have ${cells} images; at most ${MAX_GRID}`, "seeds");
        }
      } catch (err) {
        grid.append(errorBox(err));
        return;
      }
      const status = h("p", { class: "muted", id: "grid-status" });
      grid.append(h("p", { class: "prompt", text: prompt.value }), status);
      const tasks = [];
      for (const methodName of methodNames) {
        const table = h(
          "table",
          { class: "compare", dataset: { method: methodName } },
          h("caption", { text: methodName }),
          h(
            "thead",
            {},
            h("tr", {}, h("th", { scope: "col", text: "weight \\ seed" }), seedValues.map((s) => h("th", { scope: "col", text: `seed ${s}` }))),
          ),
        );
        const tbody = h("tbody");
        for (const identityWeight of weightValues) {
          const row = h("tr", {}, h("th", { scope: "row", text: `weight ${identityWeight}` }));
          for (const seedValue of seedValues) {
            const cell = h("td", { class: "pending" }, h("span", { class: "muted", text: "rendering…" }));
            row.append(cell);
            tasks.push({ cell, request: body({ methodName, identityWeight, seedValue }) });
          }
          tbody.append(row);
        }
        table.append(tbody);
        grid.append(table);
      }
      let done = 0;
      const update = () => {
        status.textContent = `${done} of ${tasks.length} rendered`;
      };
      update();
      const queue = tasks.slice();
      async function worker() {
        while (queue.length) {
          const { cell, request } = queue.shift();
          try {
            const image = await renderOne(request);
            const alt = `${request.method}, weight ${request.identity_weight}, seed ${image.seed}`;
            clear(cell).append(imageCell(image, request, alt));
            cell.className = "done";
          } catch (err) {
            if (err && err.name === "AbortError") return;
            clear(cell).append(errorBox(err));
            cell.className = "failed";
          }
          done += 1;
          update();
        }
      }
      await Promise.all(Array.from({ length: CONCURRENCY }, worker));
    },
    { id: "render-grid", class: "primary" },
  );

  main.append(
    section(
      "What to render",
      field("Prompt", prompt),
      h("div", { class: "row" }, field("Character", character), field("Preset", preset)),
      h("div", { class: "row" }, h("div", {}, field("Similarity threshold", threshold), thresholdNote)),
    ),
    section(
      "One render",
      h("div", { class: "row" }, field("Method", method), field("Identity weight", weight), field("Seed", seed)),
      renderButton,
      single,
    ),
    section(
      "Comparison grid",
      h("p", { class: "muted", text: "Methods × identity weights × seeds, each image scored against the character." }),
      methodsBox,
      h(
        "div",
        { class: "row" },
        field("Identity weights", weights, "Comma-separated, 0 to 3."),
        field("Seeds", seeds, "Comma-separated whole numbers."),
      ),
      gridButton,
      grid,
    ),
  );
}
