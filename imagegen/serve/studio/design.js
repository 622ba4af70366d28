// The design flow: describe -> candidates (with face checks) -> pick or upload -> turnaround
// (progress) -> curate (keep / drop / re-roll, the report's verdict) -> register with provenance.
//
// Every step is one /v1/designs call; renders are jobs whose progress comes from the design's event
// stream (read over fetch, with the key as a header).

import { ApiError, api, path, streamEvents } from "./api.js";
import { reportView } from "./characters.js";
import {
  actionButton,
  apiImage,
  clear,
  errorBox,
  facts,
  field,
  h,
  section,
  select,
  showError,
  similarityBadge,
  verdictBadge,
  when,
} from "./dom.js";

const SLUG = "[a-z0-9][a-z0-9_\\-]{0,63}"; // the pattern attribute is anchored and uses the v flag

export async function designsView({ main, signal, go }) {
  main.append(h("h2", { text: "Design a character" }));
  const presetsPromise = api.get("/v1/presets", { signal });
  const list = h("div", { id: "designs" }, h("p", { class: "muted", text: "Loading…" }));
  const characterId = h("input", { id: "design-id", type: "text", pattern: SLUG, required: true, autocomplete: "off" });
  const name = h("input", { id: "design-name", type: "text", maxlength: "200", required: true, autocomplete: "off" });
  const look = h("textarea", { id: "design-look", rows: "3" });
  const personality = h("textarea", { id: "design-personality", rows: "2" });
  const style = h("textarea", { id: "design-style", rows: "2" });
  const presets = (await presetsPromise).presets;
  const preset = select(
    presets.map((p) => [p.name, `${p.name} (${p.family})`]),
    presets.length ? presets[0].name : "",
  );
  preset.id = "design-preset";
  const candidates = h("input", { id: "design-candidates", type: "number", min: "1", max: "16", step: "1", value: "4" });
  const seed = h("input", { id: "design-seed", type: "number", min: "0", step: "1" });
  const out = h("div", { class: "form-errors" });
  const form = h(
    "form",
    { class: "panel", id: "design-form", "aria-labelledby": "new-design-title" },
    h("h3", { id: "new-design-title", text: "Describe" }),
    h("p", {
      class: "muted",
      text: "A character card and a preset: the Studio renders candidate portraits from a prompt built from the card.",
    }),
    h(
      "div",
      { class: "row" },
      field("Character id", characterId, "Lower-case letters, digits, - and _."),
      field("Name", name),
    ),
    field("Look", look),
    field("Personality", personality),
    field("Style notes", style),
    h(
      "div",
      { class: "row" },
      field("Preset", preset),
      field("Candidates", candidates),
      field("Seed (optional)", seed),
    ),
    h("button", { type: "submit", id: "design-submit", class: "primary", text: "Render candidates" }),
    out,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clear(out);
    const submit = form.querySelector("button[type=submit]");
    submit.disabled = true;
    try {
      const body = {
        character_id: characterId.value.trim(),
        name: name.value.trim(),
        card: { look: look.value, personality: personality.value, style_notes: style.value },
        preset: preset.value,
        candidates: Number(candidates.value || 4),
        seed: seed.value === "" ? null : Number(seed.value),
      };
      const design = await api.post("/v1/designs", body, { signal });
      go("#/design/" + encodeURIComponent(design.design_id));
    } catch (err) {
      if (err && err.name === "AbortError") return;
      out.append(errorBox(err));
    } finally {
      submit.disabled = false;
    }
  });
  main.append(form, section("Designs in progress", list));
  try {
    const data = await api.get("/v1/designs", { signal });
    clear(list);
    if (!data.designs.length) {
      list.append(h("p", { text: "None yet." }));
      return;
    }
    const tbody = h("tbody");
    for (const d of data.designs) {
      tbody.append(
        h(
          "tr",
          {},
          h("td", {}, h("a", { href: "#/design/" + encodeURIComponent(d.design_id), text: d.name })),
          h("td", {}, h("code", { text: d.character_id })),
          h("td", { text: d.stage }),
          h("td", { text: d.status }),
          h("td", { text: when(d.expires_at) }),
        ),
      );
    }
    list.append(
      h(
        "table",
        { class: "list" },
        h("thead", {}, h("tr", {}, ...["Name", "Character id", "Stage", "Status", "Expires"].map((t) => h("th", { scope: "col", text: t })))),
        tbody,
      ),
    );
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    showError(list, err);
  }
}

function faceText(face) {
  if (!face) return "face check: n/a";
  const parts = [face.found ? "face found" : "no face"];
  if (face.age !== null && face.age !== undefined) parts.push(`apparent age ${Math.round(face.age)}`);
  if (face.found) parts.push(face.protected_match ? "MATCHES A PROTECTED IDENTITY" : "no protected match");
  if (face.note && face.note !== parts[0]) parts.push(face.note);
  return parts.join(" · ");
}

export async function designView({ main, signal, params, go }) {
  const designId = params[0];
  const base = path`/v1/designs/${designId}`;
  const heading = h("h2", { id: "design-title", text: "Design" });
  const body = h("div", { id: "design" });
  main.append(heading, body);
  let following = false;

  async function reload(focusId) {
    const design = await api.get(base, { signal });
    show(design);
    if (focusId) {
      const target = document.getElementById(focusId);
      if (target) {
        target.setAttribute("tabindex", "-1");
        target.focus();
      }
    }
    return design;
  }

  async function follow(design) {
    if (following || design.status !== "rendering") return;
    following = true;
    const bar = document.getElementById("design-progress");
    const text = document.getElementById("design-progress-text");
    try {
      await streamEvents(
        base + "/events",
        (type, data) => {
          if (!bar || !text) return;
          if (type === "progress" && data && data.steps) {
            bar.max = Number(data.steps);
            bar.value = Number(data.step);
            const image = data.image ?? data.index;
            text.textContent =
              `step ${data.step} of ${data.steps}` + (image !== undefined && image !== null ? ` · image ${Number(image) + 1}` : "");
          } else if (type === "started" || type === "queued") {
            text.textContent = type;
          }
        },
        { signal },
      );
    } catch (err) {
      if (err && err.name === "AbortError") return;
      following = false;
      body.prepend(errorBox(err));
      return;
    }
    following = false;
    const after = await reload();
    if (after.status === "rendering") {
      // the stream ended before the design changed state (e.g. between two jobs): look again shortly
      await new Promise((resolve) => setTimeout(resolve, 500));
      if (!signal.aborted) follow(await reload());
    } else {
      const next = document.getElementById(after.slots && after.slots.length ? "step-curate" : "step-candidates");
      if (next) {
        next.setAttribute("tabindex", "-1");
        next.focus();
      }
    }
  }

  function actionOut() {
    return h("div", { class: "action-out" });
  }

  function show(design) {
    heading.textContent = `Design: ${design.name}`;
    clear(body);
    const busy = design.status === "rendering";
    body.append(
      section(
        "Design",
        facts([
          ["Character id", h("code", { text: design.character_id })],
          ["Stage", design.stage],
          ["Status", design.status],
          ["Preset", design.preset],
          ["Expires", when(design.expires_at)],
        ]),
        design.error ? errorBox(new ApiError(0, "design_failed", design.error)) : null,
        h("details", {}, h("summary", { text: "Card" }), facts([
          ["Look", design.card && design.card.look],
          ["Personality", design.card && design.card.personality],
          ["Style notes", design.card && design.card.style_notes],
        ])),
      ),
    );
    if (busy) {
      body.append(
        h(
          "section",
          { class: "panel progress-panel", id: "progress-panel" },
          h("h3", { text: design.stage === "turnaround" || (design.slots || []).length ? "Rendering the turnaround" : "Rendering candidates" }),
          h("progress", { id: "design-progress", max: "1", value: "0", "aria-labelledby": "design-progress-text" }),
          h("p", { id: "design-progress-text", "aria-live": "polite", text: "queued" }),
        ),
      );
    }

    // 1-2. candidates with their face checks; pick some, or upload the artist's own image
    if ((design.candidates || []).length) {
      const grid = h("div", { class: "grid candidates", id: "candidates" });
      const out = actionOut();
      for (const c of design.candidates) {
        const box = h("input", { type: "checkbox", id: `candidate-${c.index}`, value: String(c.index) });
        grid.append(
          h(
            "figure",
            { class: "cell candidate" },
            apiImage(path`/v1/designs/${designId}/images/${c.image_id}`, `candidate ${c.index}, seed ${c.seed}`, { signal }),
            h(
              "figcaption",
              {},
              h("div", { class: "check" }, box, h("label", { for: box.id, text: `Pick candidate ${c.index} (seed ${c.seed})` })),
              h("span", { class: "face-check " + (c.face && c.face.found ? "found" : "missing"), text: faceText(c.face) }),
            ),
          ),
        );
      }
      const pickButton = actionButton(
        "Pick the ticked candidates",
        async () => {
          clear(out);
          const picked = [...grid.querySelectorAll("input:checked")].map((b) => Number(b.value));
          if (!picked.length) {
            out.append(errorBox(new ApiError(0, "invalid_input", "tick at least one candidate first")));
            return;
          }
          try {
            await api.post(base + "/pick", { candidates: picked }, { signal });
            await reload("step-pick");
          } catch (err) {
            if (err && err.name === "AbortError") return;
            out.append(errorBox(err));
          }
        },
        { id: "pick-candidates", disabled: busy },
      );
      body.append(
        h(
          "section",
          { class: "panel" },
          h("h3", { id: "step-candidates", text: "Candidates" }),
          h("p", { class: "muted", text: "Each candidate with its face check: face found, apparent age (when an estimator is installed), no match in the protected gallery." }),
          grid,
          pickButton,
          out,
        ),
      );
    }
    if (!busy && (design.stage === "describe" || design.stage === "pick")) body.append(uploadForm());

    // the pick
    if (design.pick) {
      const pick = design.pick;
      const pictures = h("div", { class: "grid" });
      (pick.image_ids || []).forEach((imageId, i) =>
        pictures.append(apiImage(path`/v1/designs/${designId}/images/${imageId}`, `pick ${i + 1}`, { signal })),
      );
      const prov = pick.provenance || {};
      const out = actionOut();
      const gridName = h("input", { type: "text", id: "turnaround-grid", placeholder: "default", autocomplete: "off" });
      const turnaround = actionButton(
        (design.slots || []).length ? "Generate the turnaround again" : "Generate the turnaround",
        async () => {
          clear(out);
          try {
            const grid = gridName.value.trim();
            const d = await api.post(base + "/turnaround", grid ? { grid } : {}, { signal });
            show(d);
            const panel = document.getElementById("progress-panel");
            if (panel) {
              panel.setAttribute("tabindex", "-1");
              panel.focus();
            }
            follow(d);
          } catch (err) {
            if (err && err.name === "AbortError") return;
            out.append(errorBox(err));
          }
        },
        { id: "turnaround", class: "primary", disabled: busy },
      );
      body.append(
        h(
          "section",
          { class: "panel" },
          h("h3", { id: "step-pick", text: "Pick" }),
          facts([
            ["Source", pick.source === "upload" ? "your upload" : "candidates"],
            ["Provenance", [prov.kind, prov.who || prov.creator].filter(Boolean).join(" · ")],
            ["Evidence", prov.evidence],
          ]),
          pictures,
          h("p", { class: "muted", text: "The turnaround renders the pick over the grid of angles, expressions and lighting of configs/turnaround.yaml, as one batched job." }),
          field("Grid", gridName, "A grid named in configs/turnaround.yaml (empty: default)."),
          turnaround,
          out,
        ),
      );
    }

    // 4. curate the slots; the report re-runs when images change
    if ((design.slots || []).length) {
      const threshold = design.report ? design.report.threshold : null;
      const grid = h("div", { class: "grid slots", id: "slots" });
      const choices = [];
      for (const slot of design.slots) {
        const what = [slot.view, slot.expression, slot.lighting].filter(Boolean).join(" · ");
        const choice = select(
          [
            ["keep", "keep"],
            ["drop", "drop"],
            ["reroll", "re-roll (new seed)"],
          ],
          slot.kept ? "keep" : "drop",
        );
        choice.id = `slot-${slot.index}-action`;
        choices.push({ slot, choice });
        const notes = [];
        if (slot.analysable === false) notes.push(h("span", { class: "tag", text: "not analysable by this face backend" }));
        if (slot.outlier) notes.push(h("span", { class: "tag bad", text: "outlier" }));
        if (slot.analysable !== false) notes.push(similarityBadge(slot.similarity, threshold));
        grid.append(
          h(
            "figure",
            { class: "cell slot" + (slot.kept ? "" : " dropped") },
            apiImage(path`/v1/designs/${designId}/images/${slot.image_id}`, `slot ${slot.index}: ${what}`, { signal }),
            h(
              "figcaption",
              {},
              h("span", { text: `Slot ${slot.index}: ${what}` }),
              h("span", { class: "muted", text: `seed ${slot.seed} · ${slot.kept ? "kept" : "dropped"}` }),
              notes,
              field(`Slot ${slot.index}: keep, drop or re-roll`, choice),
            ),
          ),
        );
      }
      const out = actionOut();
      const apply = actionButton(
        "Apply keep / drop / re-roll",
        async () => {
          clear(out);
          const request = { keep: [], drop: [], reroll: [] };
          for (const { slot, choice } of choices) request[choice.value].push(slot.index);
          try {
            const d = await api.post(base + "/curate", request, { signal });
            show(d);
            if (d.status === "rendering") follow(d);
            else {
              const target = document.getElementById("step-curate");
              if (target) {
                target.setAttribute("tabindex", "-1");
                target.focus();
              }
            }
          } catch (err) {
            if (err && err.name === "AbortError") return;
            out.append(errorBox(err));
          }
        },
        { id: "curate", disabled: busy },
      );
      body.append(
        h(
          "section",
          { class: "panel" },
          h("h3", { id: "step-curate", text: "Curate the reference set" }),
          grid,
          apply,
          out,
        ),
      );
    }
    if (design.report) {
      body.append(
        h("section", { class: "panel", id: "design-report" }, h("h3", { text: "Reference report" }), reportView(design.report)),
      );
    }

    // 5. register with provenance
    if (design.stage === "registered") {
      body.append(
        section(
          "Registered",
          h(
            "p",
            {},
            `This design is registered as ${design.character_id}: `,
            h("a", { href: "#/characters/" + encodeURIComponent(design.character_id), text: "open the character" }),
            ".",
          ),
        ),
      );
    } else if ((design.slots || []).length && !busy) {
      body.append(registerForm(design));
    }
  }

  function uploadForm() {
    const file = h("input", { type: "file", id: "upload-file", accept: "image/png,image/jpeg,image/webp" });
    const kind = select(
      [
        ["licensed", "licensed"],
        ["consented", "consented"],
      ],
      "licensed",
    );
    kind.id = "upload-kind";
    const who = h("input", { type: "text", id: "upload-who", maxlength: "256", autocomplete: "off" });
    const evidence = h("input", { type: "text", id: "upload-evidence", maxlength: "4000", autocomplete: "off" });
    const out = actionOut();
    const form = h(
      "form",
      { class: "panel", id: "upload-form", "aria-labelledby": "step-upload" },
      h("h3", { id: "step-upload", text: "Or upload your own drawing or render" }),
      h("p", {
        class: "muted",
        text: "An upload is not synthetic: it carries your provenance and goes through the protected-identity and age checks like any registration.",
      }),
      field("Image", file),
      h("div", { class: "row" }, field("Provenance", kind), field("Who (creator or rights holder)", who), field("Evidence", evidence)),
      h("button", { type: "submit", id: "upload-submit", text: "Upload as the pick" }),
      out,
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clear(out);
      if (!file.files.length) {
        out.append(errorBox(new ApiError(0, "invalid_input", "choose an image file first")));
        return;
      }
      const data = new FormData();
      data.append("image", file.files[0], file.files[0].name);
      data.append("provenance", JSON.stringify({ kind: kind.value, who: who.value, evidence: evidence.value }));
      const submit = form.querySelector("button[type=submit]");
      submit.disabled = true;
      try {
        await api.postForm(base + "/pick", data, { signal });
        await reload("step-pick");
      } catch (err) {
        if (err && err.name === "AbortError") return;
        out.append(errorBox(err));
      } finally {
        if (submit.isConnected) submit.disabled = false;
      }
    });
    return form;
  }

  function registerForm(design) {
    const kind = select(
      [
        ["synthetic", "synthetic (every image rendered here)"],
        ["licensed", "licensed"],
        ["consented", "consented"],
      ],
      "synthetic",
    );
    kind.id = "register-kind";
    const who = h("input", { type: "text", id: "register-who", maxlength: "256", autocomplete: "off" });
    const evidence = h("input", { type: "text", id: "register-evidence", maxlength: "4000", autocomplete: "off" });
    const out = h("div", { class: "action-out", id: "register-out" });
    const form = h(
      "form",
      { class: "panel", id: "register-form", "aria-labelledby": "step-register" },
      h("h3", { id: "step-register", text: "Register" }),
      h("p", {
        class: "muted",
        text: "Registers the kept images as a draft character; its provenance is the recipe of every kept image.",
      }),
      h("div", { class: "row" }, field("Provenance", kind), field("Who", who), field("Evidence", evidence)),
      h("button", { type: "submit", id: "register-submit", class: "primary", text: "Register the character" }),
      out,
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clear(out);
      const provenance = { kind: kind.value };
      if (who.value.trim()) provenance.who = who.value.trim();
      if (evidence.value.trim()) provenance.evidence = evidence.value.trim();
      const submit = form.querySelector("button[type=submit]");
      submit.disabled = true;
      try {
        const answer = await api.post(base + "/register", { provenance }, { signal });
        const character = answer.character || {};
        const id = character.id || design.character_id;
        out.append(
          h(
            "div",
            { class: "ok-box", role: "status" },
            `Registered ${character.name || design.name} (${character.status || "draft"}) · `,
            h("a", { href: "#/characters/" + encodeURIComponent(id), id: "registered-link", text: "open its page" }),
          ),
        );
        if (answer.report) out.append(h("p", {}, "Report ", verdictBadge(answer.report.verdict)));
      } catch (err) {
        if (err && err.name === "AbortError") return;
        out.append(errorBox(err));
      } finally {
        submit.disabled = false;
        if (!form.contains(document.activeElement)) out.focus();
      }
    });
    out.setAttribute("tabindex", "-1");
    return form;
  }

  const design = await reload();
  if (design.status === "rendering") follow(design);
  void go;
}
