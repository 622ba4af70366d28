"""``report.html`` (self-contained) and ``junit.xml`` of a run.

The HTML has no external resource: thumbnails and matplotlib figures are embedded as base64
data URIs, the styling is inline, there is no script. It opens from a CI artefact, an e-mail, a
file system without a server.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imagegen.eval.metrics import Evaluation, ImageScore, pairwise_matrix

log = logging.getLogger(__name__)

THUMB = 128
#: thumbnails shown per character (the rest are counted, and listed in metrics.json)
MAX_THUMBS = 160
#: faces in the heatmap (evenly subsampled beyond this)
MAX_HEATMAP = 300

GREEN, RED, ORANGE, GREY = "#1a7f37", "#cf222e", "#bc4c00", "#6e7781"
VERDICT_COLOURS = {"pass": GREEN, "fail": RED, "ungated": "#0969da"}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px 24px;color:#1f2328}
h1{font-size:22px;margin:0 0 8px} h2{font-size:18px;margin:22px 0 8px;border-bottom:1px solid #d0d7de}
h3{font-size:15px;margin:14px 0 6px}
.verdict{display:inline-block;color:#fff;padding:4px 12px;border-radius:6px;font-weight:700;font-size:16px}
.summary{margin:8px 0 4px;font-size:14px} .reasons{font-size:13px;color:#57606a;margin:4px 0 8px}
.grid{display:flex;flex-wrap:wrap;gap:8px} .cell{width:136px;font-size:11px;text-align:center}
.cell img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;background:#f6f8fa;
 border:3px solid transparent;border-radius:4px}
.cell.fail img{border-color:#cf222e} .cell .score{font-weight:700;font-size:13px}
.cell .name{color:#57606a;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
th,td{border:1px solid #d0d7de;padding:3px 7px;text-align:right}
th{background:#f6f8fa} td.l,th.l{text-align:left} .bad{color:#cf222e;font-weight:700} .good{color:#1a7f37}
.legend span{display:inline-block;margin-right:14px;font-size:12px} figure{margin:8px 0} figure img{max-width:100%}
.muted{color:#57606a;font-size:12px}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _ci(metrics: Mapping[str, Any], name: str, pct: bool = False) -> str:
    ci = (metrics.get("ci") or {}).get(name)
    if not ci or ci[0] is None:
        return ""
    if pct:
        return f" [{_pct(ci[0])}, {_pct(ci[1])}]"
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def thumbnail_uri(path: Path) -> str | None:
    """A small PNG/JPEG data URI of the image at ``path`` (None when it cannot be read)."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            small = max(image.size) <= THUMB
            if not small:
                image.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            if small:
                image.save(buffer, format="PNG")
                kind = "png"
            else:
                image.save(buffer, format="JPEG", quality=82)
                kind = "jpeg"
    except OSError:
        return None
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure_uri(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _empty_figure(text: str) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, color="#57606a")
    return _figure_uri(fig)


def heatmap_uri(evaluation: Evaluation) -> str:
    """Pairwise similarity of every face, grouped by character, as a PNG data URI."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    faces = [s for s in evaluation.scores if s.face_found and s.embedding is not None]
    if len(faces) < 2:
        return _empty_figure("similarity heatmap: fewer than two faces detected, nothing to compare")
    faces.sort(key=lambda s: evaluation.characters.index(s.character) if s.character in evaluation.characters else 0)
    if len(faces) > MAX_HEATMAP:
        keep = np.linspace(0, len(faces) - 1, MAX_HEATMAP).round().astype(int)
        faces = [faces[i] for i in keep]
    matrix = pairwise_matrix([s.embedding for s in faces], evaluation.thresholds.backend)
    size = min(9.0, 3.0 + 0.05 * len(faces))
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(matrix, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label=f"similarity ({evaluation.thresholds.backend})")
    bounds, labels, start = [], [], 0
    for name in evaluation.characters:
        count = sum(1 for s in faces if s.character == name)
        if count:
            labels.append((start + count / 2 - 0.5, name))
            start += count
            bounds.append(start - 0.5)
    for b in bounds[:-1]:
        ax.axhline(b, color="white", lw=1)
        ax.axvline(b, color="white", lw=1)
    ax.set_xticks([p for p, _ in labels], [n for _, n in labels], rotation=30, ha="right", fontsize=8)
    ax.set_yticks([p for p, _ in labels], [n for _, n in labels], fontsize=8)
    ax.set_title("pairwise similarity of the rendered faces")
    return _figure_uri(fig)


def distributions_uri(evaluation: Evaluation) -> str:
    """Per character: similarity to its own centroid and to the nearest other character."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    faces = [s for s in evaluation.scores if s.face_found and s.similarity is not None]
    if not faces:
        return _empty_figure("score distributions: no face detected in any image")
    fig, ax = plt.subplots(figsize=(8, 3.4))
    colours = plt.get_cmap("tab10")
    values = [s.similarity for s in faces] + [s.nearest_other_similarity for s in faces if s.nearest_other_similarity]
    bins = np.linspace(min(values) - 0.02, max(max(values), 1.0) + 0.01, 40)
    for i, name in enumerate(evaluation.characters):
        own = [s.similarity for s in faces if s.character == name]
        other = [s.nearest_other_similarity for s in faces if s.character == name and s.nearest_other_similarity]
        if own:
            ax.hist(own, bins=bins, histtype="step", lw=2, color=colours(i % 10), label=f"{name}: own centroid")
        if other:
            ax.hist(
                other, bins=bins, histtype="step", lw=1, ls="--", color=colours(i % 10), label=f"{name}: nearest other"
            )
    t = evaluation.thresholds
    ax.axvline(t.similarity, color=RED, lw=1.5, label=f"threshold {t.similarity:.2f}")
    if t.copy_bound is not None:
        ax.axvline(t.copy_bound, color=ORANGE, lw=1.5, ls=":", label=f"copy bound {t.copy_bound:.2f}")
    ax.set_xlabel(f"similarity ({t.backend})")
    ax.set_ylabel("images")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("score distributions")
    return _figure_uri(fig)


def _cell_html(score: ImageScore, image_uri: str | None, threshold: float) -> str:
    if score.problem:
        colour, text = GREY, f"unusable ({score.problem})"
    elif not score.face_found:
        colour, text = GREY, "no face"
    else:
        colour = ORANGE if score.is_copy else (GREEN if (score.similarity or 0) >= threshold else RED)
        text = f"{score.similarity:.3f}"
        if score.is_copy:
            text += f" · copy {score.reference_similarity:.2f}"
    title = score.file + ("\n" + "\n".join(score.reasons) if score.reasons else "\npassed")
    img = f'<img src="{image_uri}" alt="{_esc(score.file)}">' if image_uri else '<div class="muted">(missing)</div>'
    status = "pass" if score.passed else "fail"
    return (
        f'<div class="cell {status}" title="{_esc(title)}">{img}'
        f'<div class="score" style="color:{colour}">{_esc(text)}</div>'
        f'<div class="name">{_esc(_label(score))}</div></div>'
    )


def _label(score: ImageScore) -> str:
    """A short caption: the grid coordinates of a suite render, else the file name."""
    t = score.tags
    if "preset" in t and "prompt" in t:
        weight = f" w{t['weight']}" if "weight" in t else ""
        seed = score.meta.get("seed")
        return f"{t['preset']} · {t.get('method', '')}{weight} · {t['prompt']}" + (
            "" if seed is None else f" · s{seed}"
        )
    return Path(score.file).name


def _metrics_row(label: str, m: Mapping[str, Any], extra: str = "") -> str:
    ver = m.get("verification") or {}
    return (
        f'<tr><td class="l">{_esc(label)}</td><td>{m["n_images"]}</td><td>{m["n_faces"]}</td>'
        f"<td>{_pct(m['detection_rate'])}{_ci(m, 'detection_rate', True)}</td>"
        f"<td>{_fmt(m['mean_similarity'])}{_ci(m, 'mean_similarity')}</td>"
        f"<td>{_fmt(m['min_similarity'])}</td><td>{_fmt(m['p10_similarity'])}</td>"
        f"<td>{_fmt(m['pairwise_mean'])}</td><td>{_pct(m['copy_rate'])}</td>"
        f"<td>{_pct(m['rank1_accuracy'])}</td><td>{_fmt(m['leakage'])}</td>"
        f"<td>{_fmt(ver.get('auc'))}</td><td>{_fmt(ver.get('eer'))}</td>"
        f"<td>{_pct(m['pass_rate'])}{_ci(m, 'pass_rate', True)}</td>{extra}</tr>"
    )


METRIC_HEADER = (
    "<th>images</th><th>faces</th><th>detection [95% CI]</th><th>mean sim [95% CI]</th><th>min</th><th>p10</th>"
    "<th>pairwise</th><th>copy</th><th>rank-1</th><th>leakage</th><th>AUC</th><th>EER</th><th>pass [95% CI]</th>"
)


def render_html(
    evaluation: Evaluation,
    *,
    title: str,
    images_root: Path,
    info: Mapping[str, Any],
    skipped: Sequence[Mapping[str, Any]] = (),
    comparison: Mapping[str, Any] | None = None,
) -> str:
    """The report as one HTML string."""
    e, t = evaluation, evaluation.thresholds
    colour = VERDICT_COLOURS.get(e.verdict, GREY)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        f'<span class="verdict" style="background:{colour}">{_esc(e.verdict.upper())}</span>',
        f'<div class="summary">{_esc(e.summary)}</div>',
    ]
    if e.reasons:
        parts.append('<div class="reasons">' + "<br>".join(_esc(r) for r in e.reasons[:20]) + "</div>")
    parts.append(
        f'<div class="muted">backend <b>{_esc(t.backend)}</b> ({_esc(info.get("model_version", ""))}) · '
        f"threshold {t.similarity:.3f} ({_esc(t.similarity_source)}) · copy bound "
        f"{_fmt(t.copy_bound, 2)} ({_esc(t.copy_source)})</div>"
    )
    parts.append(
        '<div class="legend muted"><span style="color:#1a7f37">■ similarity ≥ threshold</span>'
        '<span style="color:#cf222e">■ below threshold (image outlined when it fails)</span>'
        '<span style="color:#bc4c00">■ copy-paste of a reference</span>'
        '<span style="color:#6e7781">■ no face</span></div>'
    )
    # per character: metrics + grid (first, so the images are on the first screen)
    parts.append("<h2>Characters</h2><table><tr><th class='l'>character</th>" + METRIC_HEADER + "<th>verdict</th></tr>")
    for name, m in e.per_character.items():
        vcol = VERDICT_COLOURS.get(m["verdict"], GREY)
        parts.append(_metrics_row(name, m, f'<td style="color:{vcol};font-weight:700">{_esc(m["verdict"])}</td>'))
    o = e.overall
    parts.append(_metrics_row("overall", o, f"<td>{_esc(o.get('verdict', ''))}</td>") + "</table>")
    for name in e.per_character:
        mine = [s for s in e.scores if s.character == name]
        failing = sum(not s.passed for s in mine)
        parts.append(f"<h3>{_esc(name)} — {len(mine)} images, {failing} failing</h3><div class='grid'>")
        for score in mine[:MAX_THUMBS]:
            parts.append(_cell_html(score, thumbnail_uri(images_root / score.file), t.similarity))
        parts.append("</div>")
        if len(mine) > MAX_THUMBS:
            parts.append(f"<div class='muted'>{len(mine) - MAX_THUMBS} more images in metrics.json</div>")
    parts.append("<h2>Similarity</h2>")
    parts.append(f'<figure><img alt="similarity heatmap" src="{heatmap_uri(e)}"></figure>')
    parts.append(f'<figure><img alt="score distributions" src="{distributions_uri(e)}"></figure>')
    if e.per_tag:
        parts.append("<h2>By tag</h2>")
        for tag, groups in e.per_tag.items():
            parts.append(f"<h3>{_esc(tag)}</h3><table><tr><th class='l'>{_esc(tag)}</th>{METRIC_HEADER}</tr>")
            for value, m in groups.items():
                parts.append(_metrics_row(value, m))
            parts.append("</table>")
    if comparison:
        parts.append(_comparison_html(comparison))
    if skipped:
        parts.append(
            f"<h2>Skipped cells ({len(skipped)})</h2><table><tr><th class='l'>cell</th><th class='l'>why</th></tr>"
        )
        for item in skipped[:200]:
            parts.append(f"<tr><td class='l'>{_esc(item['file'])}</td><td class='l'>{_esc(item['reason'])}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Run</h2><table>")
    for key, value in info.items():
        parts.append(f"<tr><th class='l'>{_esc(key)}</th><td class='l'>{_esc(value)}</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


def _comparison_html(comparison: Mapping[str, Any]) -> str:
    rows = comparison.get("rows", [])
    regressions = comparison.get("regressions", [])
    out = [
        f"<h2>Comparison with {_esc(comparison.get('baseline', 'baseline'))}</h2>",
        f"<div class='summary'>{_esc(comparison.get('summary', ''))}</div>",
        "<table><tr><th class='l'>scope</th><th class='l'>group</th><th class='l'>metric</th><th>baseline</th>"
        "<th>this run</th><th>delta [95% CI]</th><th class='l'>flag</th></tr>",
    ]
    for row in rows:
        flag = "regression" if row["regression"] else ("improvement" if row["improvement"] else "")
        cls = "bad" if row["regression"] else ("good" if row["improvement"] else "")
        gated = " (gated)" if row["regression"] and row["gated"] else ""
        ci = row.get("ci")
        ci_text = "" if not ci else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"
        delta = "–" if row["delta"] is None else f"{row['delta']:+.3f}"
        out.append(
            f"<tr><td class='l'>{_esc(row['scope'])}</td><td class='l'>{_esc(row['group'])}</td>"
            f"<td class='l'>{_esc(row['metric'])}</td><td>{_fmt(row['a'])}</td><td>{_fmt(row['b'])}</td>"
            f"<td class='{cls}'>{delta}{ci_text}</td>"
            f"<td class='l {cls}'>{flag}{gated}</td></tr>"
        )
    out.append("</table>")
    if regressions:
        out.append("<div class='reasons'>" + "<br>".join(_esc(r) for r in regressions) + "</div>")
    return "\n".join(out)


# -- junit -----------------------------------------------------------------------------------------
def render_junit(
    evaluation: Evaluation,
    *,
    suite: str,
    skipped: Sequence[Mapping[str, Any]] = (),
    comparison: Mapping[str, Any] | None = None,
) -> bytes:
    """Gates (per character and overall), images and comparison rows as JUnit test cases."""
    root = ET.Element("testsuites", name=f"imagegen-eval {suite}")
    gated = evaluation.gated

    def suite_el(name: str) -> ET.Element:
        return ET.SubElement(root, "testsuite", name=f"{suite}.{name}")

    def case(parent: ET.Element, classname: str, name: str, failure: str | None, skip: str | None = None) -> None:
        el = ET.SubElement(parent, "testcase", classname=classname, name=name, time="0")
        if skip is not None:
            ET.SubElement(el, "skipped", message=skip)
        elif failure is not None:
            failed = ET.SubElement(el, "failure", message=failure, type="EvalFailure")
            failed.text = failure

    gates_el = suite_el("gates")
    sets = [(name, m) for name, m in evaluation.per_character.items()] + [("overall", evaluation.overall)]
    for name, m in sets:
        if m["n_faces"] == 0 and m["n_images"]:
            message = f"no face detected in any of the {m['n_images']} images (detection rate 0%)"
            case(gates_el, f"{suite}.{name}", "faces detected", message, None if gated else f"not gated: {message}")
        for check in m.get("gates", []):
            if check["passed"] is None:
                case(gates_el, f"{suite}.{name}", check["name"], None, f"not measurable: {check['metric']} undefined")
                continue
            failure = None if check["passed"] else f"{check['metric']} = {check['value']:.4f}, needs {check['name']}"
            if not gated:
                case(gates_el, f"{suite}.{name}", check["name"], None, f"not gated (value {check['value']:.4f})")
            else:
                case(gates_el, f"{suite}.{name}", check["name"], failure)
    images_el = suite_el("images")
    for score in evaluation.scores:
        failure = None if score.passed else "; ".join(score.reasons)
        skip = None if gated or score.passed else f"not gated: {failure}"
        case(images_el, f"{suite}.{score.character}", score.file, failure, skip)
    if skipped:
        skipped_el = suite_el("skipped")
        for item in skipped:
            case(skipped_el, f"{suite}.{item.get('character', '')}", item["file"], None, item["reason"])
    if comparison:
        cmp_el = suite_el("compare")
        for row in comparison.get("rows", []):
            if not row["gated"]:
                continue
            failure = None
            if row["regression"]:
                failure = f"{row['metric']} regressed by {row['delta']:+.4f} (95% CI {row['ci']})"
            case(cmp_el, f"{suite}.{row['scope']}.{row['group']}", row["metric"], failure)
    for el in root.iter("testsuite"):
        cases = el.findall("testcase")
        el.set("tests", str(len(cases)))
        el.set("failures", str(sum(1 for c in cases if c.find("failure") is not None)))
        el.set("skipped", str(sum(1 for c in cases if c.find("skipped") is not None)))
        el.set("errors", "0")
    root.set("tests", str(sum(int(s.get("tests", 0)) for s in root)))
    root.set("failures", str(sum(int(s.get("failures", 0)) for s in root)))
    root.set("skipped", str(sum(int(s.get("skipped", 0)) for s in root)))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
