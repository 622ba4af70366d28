// Eval runs: the list, and one run's summary with its report.html.
//
// The report is fetched with the key and shown in a sandboxed frame (srcdoc, no scripts, an opaque
// origin): it can neither run code nor reach the page or the key.

import { ApiError, api, path } from "./api.js";
import { clear, errorBox, facts, h, section, showError, verdictBadge, when } from "./dom.js";

export async function evalsView({ main, signal }) {
  main.append(h("h2", { text: "Eval runs" }));
  const body = h("div", { class: "panel" }, h("p", { class: "muted", text: "Loading…" }));
  main.append(body);
  let data;
  try {
    data = await api.get("/v1/eval/runs", { signal });
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    showError(body, err);
    return;
  }
  clear(body);
  if (!data.runs.length) {
    body.append(h("p", { text: "No eval runs yet (imagegen eval run …)." }));
    return;
  }
  const tbody = h("tbody");
  for (const run of data.runs) {
    tbody.append(
      h(
        "tr",
        {},
        h("td", {}, h("a", { href: "#/evals/" + encodeURIComponent(run.run_id), text: run.run_id })),
        h("td", { text: run.suite || "" }),
        h("td", {}, verdictBadge(run.verdict || run.status)),
        h("td", { text: when(run.created_at) }),
      ),
    );
  }
  body.append(
    h(
      "table",
      { class: "list", id: "runs-table" },
      h("thead", {}, h("tr", {}, ...["Run", "Suite", "Verdict", "Created"].map((t) => h("th", { scope: "col", text: t })))),
      tbody,
    ),
  );
}

export async function evalRunView({ main, signal, params }) {
  const runId = params[0];
  main.append(h("h2", { text: `Eval run ${runId}` }));
  const summary = h("div", {}, h("p", { class: "muted", text: "Loading…" }));
  const report = h("div", { id: "eval-report" }, h("p", { class: "muted", text: "Loading…" }));
  main.append(section("Summary", summary), section("Report", report));
  const base = path`/v1/eval/runs/${runId}`;
  const run = await api.get(base, { signal });
  const pairs = [
    ["Verdict", verdictBadge(run.verdict || run.status)],
    ["Suite", run.suite],
    ["Status", run.status],
    ["Characters", (run.characters || []).join(", ")],
    ["Created", when(run.created_at)],
    ["Finished", when(run.finished_at)],
  ];
  for (const [key, value] of Object.entries(run.summary || {})) {
    if (value === null || typeof value === "object" || key === "verdict") continue;
    pairs.push([key.replace(/_/g, " "), String(value)]);
  }
  clear(summary).append(facts(pairs));
  if (run.error) summary.append(errorBox(new ApiError(0, run.error.code, run.error.message)));
  if (!(run.links && run.links["report.html"])) {
    clear(report).append(h("p", { class: "muted", text: `No report yet (the run is ${run.status}).` }));
    return;
  }
  try {
    const html = await api.text(base + "/report.html", { signal });
    const frame = h("iframe", { title: `report of eval run ${runId}`, class: "report-frame", sandbox: "" });
    frame.srcdoc = html;
    clear(report).append(frame);
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    showError(report, err);
  }
}
