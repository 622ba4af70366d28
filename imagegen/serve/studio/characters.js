// Characters: the list, and one character's page (references, contact sheet, report, versions,
// recent renders with their scores).

import { api, path } from "./api.js";
import {
  actionButton,
  apiImage,
  clear,
  errorBox,
  facts,
  h,
  section,
  showError,
  similarityBadge,
  verdictBadge,
  when,
} from "./dom.js";

export async function charactersView({ main, signal }) {
  main.append(h("h2", { text: "Characters" }));
  const body = h("div", { class: "panel" }, h("p", { class: "muted", text: "Loading…" }));
  main.append(
    h("p", {}, "Design a new character from a description: ", h("a", { href: "#/design", text: "Design" }), "."),
    body,
  );
  const data = await api.get("/v1/characters", { signal });
  clear(body);
  if (!data.characters.length) {
    body.append(h("p", { text: "No characters yet for this key's tenant." }));
    return;
  }
  const table = h(
    "table",
    { class: "list", id: "characters-table" },
    h("caption", { class: "sr-only", text: "Characters of this tenant" }),
    h(
      "thead",
      {},
      h("tr", {}, ...["Name", "Id", "Status", "Version", "References", "Provenance", "Updated"].map((t) => h("th", { scope: "col", text: t }))),
    ),
  );
  const tbody = h("tbody");
  for (const c of data.characters) {
    tbody.append(
      h(
        "tr",
        {},
        h("td", {}, h("a", { href: "#/characters/" + encodeURIComponent(c.id), class: "character-link", text: c.name })),
        h("td", {}, h("code", { text: c.id })),
        h("td", { text: c.status }),
        h("td", { text: String(c.version) }),
        h("td", { text: String(c.references) }),
        h("td", { text: (c.provenance && c.provenance.kind) || "" }),
        h("td", { text: when(c.updated_at) }),
      ),
    );
  }
  table.append(tbody);
  body.append(table);
}

function cardFacts(card) {
  card = card || {};
  return facts([
    ["Look", card.look],
    ["Personality", card.personality],
    ["Style notes", card.style_notes],
  ]);
}

export async function characterView({ main, signal, params, go }) {
  const id = params[0];
  const character = await api.get(path`/v1/characters/${id}`, { signal });
  const base = path`/v1/characters/${id}`;
  main.append(h("h2", { id: "character-title", text: character.name }));
  const provenance = character.provenance || {};
  const actions = h("div", { class: "actions" });
  const actionOut = h("div", { class: "action-out" });
  if (character.status === "draft") {
    actions.append(
      actionButton(
        "Approve",
        async () => {
          clear(actionOut);
          try {
            await api.post(base + "/approve", undefined, { signal });
            go("#/characters/" + encodeURIComponent(id));
          } catch (err) {
            actionOut.append(errorBox(err));
          }
        },
        { id: "approve", class: "primary" },
      ),
    );
  }
  actions.append(h("a", { class: "button", href: "#/playground/" + encodeURIComponent(id), text: "Render in the playground" }));
  const remove = h("button", { type: "button", id: "delete-character", text: "Delete…" });
  remove.addEventListener("click", async () => {
    if (remove.dataset.armed !== "yes") {
      remove.dataset.armed = "yes";
      remove.textContent = "Confirm: delete this character and every render of it";
      return;
    }
    clear(actionOut);
    try {
      await api.del(base, { signal });
      go("#/characters");
    } catch (err) {
      actionOut.append(errorBox(err));
    }
  });
  actions.append(remove);
  main.append(
    section(
      "Character",
      facts([
        ["Id", h("code", { text: character.id })],
        ["Status", character.status],
        ["Version", String(character.version)],
        ["Provenance", [provenance.kind, provenance.creator, provenance.date].filter(Boolean).join(" · ")],
        ["Evidence", provenance.evidence],
        ["Age check", character.age_check],
        ["Reference report", character.report_passed === null || character.report_passed === undefined ? "" : character.report_passed ? "passed" : "failed"],
        ["Face backends", (character.centroids || []).join(", ")],
        ["Created", when(character.created_at)],
        ["Updated", when(character.updated_at)],
      ]),
      actions,
      actionOut,
    ),
    section("Card", cardFacts(character.card)),
  );

  const refs = h("div", { class: "grid refs", id: "references" }, h("p", { class: "muted", text: "Loading…" }));
  const sheet = h("div", { id: "contact-sheet" });
  const report = h("div", { id: "report" }, h("p", { class: "muted", text: "Loading…" }));
  const renders = h("div", { id: "recent-renders" }, h("p", { class: "muted", text: "Loading…" }));
  main.append(
    section("References", refs),
    section("Contact sheet", sheet),
    section("Reference report", report),
    section("Recent renders", renders),
  );
  sheet.append(apiImage(base + "/contact-sheet", `contact sheet of ${character.name}`, { signal, className: "sheet" }));

  const loadRefs = api.get(base + "/references", { signal }).then(
    (data) => {
      clear(refs);
      for (const ref of data.references) {
        const face = ref.face || {};
        refs.append(
          h(
            "figure",
            { class: "cell" },
            apiImage(path`/v1/characters/${id}/references/${ref.index}`, `reference ${ref.index + 1} of ${character.name}`, { signal }),
            h("figcaption", { text: `#${ref.index + 1} · ${ref.width}×${ref.height}` + (face.found === false ? " · no face" : "") }),
          ),
        );
      }
      if (!data.references.length) refs.append(h("p", { text: "No references." }));
    },
    (err) => showError(refs, err),
  );

  let threshold = null;
  const loadReport = api.get(base + "/report", { signal }).then(
    (data) => {
      threshold = data.threshold ?? null;
      clear(report).append(reportView(data));
    },
    (err) => showError(report, err),
  );

  const loadRenders = api.get(base + "/renders?limit=24", { signal }).then(
    (data) => {
      clear(renders);
      if (!data.renders.length) {
        renders.append(h("p", { text: "No renders of this character yet." }));
        return;
      }
      const grid = h("div", { class: "grid" });
      for (const r of data.renders) {
        const src = renderImagePath(r);
        grid.append(
          h(
            "figure",
            { class: "cell render" },
            src ? apiImage(src, `render of ${character.name}, seed ${r.seed}`, { signal }) : h("p", { class: "muted", text: "(not stored: a synchronous render)" }),
            h(
              "figcaption",
              {},
              h("span", { class: "prompt", text: r.prompt || "" }),
              h("span", { class: "muted", text: [r.method, r.identity_weight != null ? `weight ${r.identity_weight}` : null, `seed ${r.seed}`].filter(Boolean).join(" · ") }),
              similarityBadge(r.similarity, r.threshold ?? threshold),
              h("span", { class: "muted", text: when(r.created_at) }),
            ),
          ),
        );
      }
      renders.append(grid);
    },
    (err) => showError(renders, err),
  );
  await Promise.all([loadRefs, loadReport, loadRenders]);
}

/** Where a recent render's PNG is: the API's own link, while the service keeps it (a job's image). */
export function renderImagePath(r) {
  return typeof r.image_url === "string" && r.image_url.startsWith("/v1/") ? r.image_url : null;
}

/** A reference report (the registry's, a design's): verdict, reasons, warnings, each image's analysis. */
export function reportView(data) {
  const out = h("div", { class: "report" });
  out.append(
    h("p", {}, "Verdict ", verdictBadge(data.verdict)),
    facts([
      ["Consistency", data.consistency == null ? "n/a" : Number(data.consistency).toFixed(3)],
      ["Threshold", data.threshold == null ? "" : String(data.threshold)],
      ["Face backend", data.backend],
      ["Kept", data.kept == null ? "" : String(data.kept)],
      ["Not analysable (left out)", (data.unanalysable || []).map((i) => `slot ${i}`).join(", ")],
      ["Views", data.yaw_coverage ? Object.entries(data.yaw_coverage).map(([v, n]) => `${v}: ${n}`).join(", ") : ""],
    ]),
  );
  const problems = [...new Set([].concat(data.reasons || [], data.problems || []))];
  if (problems.length) out.append(h("ul", { class: "reasons" }, problems.map((r) => h("li", { text: r }))));
  if ((data.warnings || []).length) out.append(h("ul", { class: "warnings" }, data.warnings.map((w) => h("li", { text: w }))));
  if ((data.images || []).length) {
    const table = h(
      "table",
      { class: "list" },
      h("thead", {}, h("tr", {}, ...["#", "File", "Face", "Similarity", "Yaw", "Sharpness", "Flags"].map((t) => h("th", { scope: "col", text: t })))),
    );
    const tbody = h("tbody");
    for (const q of data.images) {
      tbody.append(
        h(
          "tr",
          { class: (q.flags || []).length ? "flagged" : "" },
          h("td", { text: String((q.index ?? 0) + 1) }),
          h("td", { text: q.filename || "" }),
          h("td", { text: q.face_found ? "found" : "no face" }),
          h("td", { text: q.similarity == null ? "" : Number(q.similarity).toFixed(3) }),
          h("td", { text: q.yaw_deg == null ? "" : `${q.yaw_deg}°` }),
          h("td", { text: q.sharpness == null ? "" : String(q.sharpness) }),
          h("td", { text: (q.flags || []).join(", ") }),
        ),
      );
    }
    table.append(tbody);
    out.append(table);
  }
  return out;
}
