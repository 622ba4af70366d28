"""``eval run`` (render a suite's grid through Ray, score it) and ``eval score`` (score any images).

Both end in :func:`write_run_dir`, so a run directory looks the same whoever made the images.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from imagegen.errors import ConfigError, ImagegenError
from imagegen.eval.compare import Comparison, compare_runs
from imagegen.eval.identities import (
    CharacterIdentity,
    identity_from_registry,
    identity_from_sample,
    resolve_identity,
)
from imagegen.eval.metrics import Evaluation, ImageScore, evaluate, score_image
from imagegen.eval.render import RenderOutcome, ensure_ray, render_cells
from imagegen.eval.report import render_html, render_junit
from imagegen.eval.rundir import SCHEMA, read_run, write_json, write_text
from imagegen.eval.scoring import FaceScorer, list_images
from imagegen.eval.suite import Cell, Suite, expand, load_suite
from imagegen.eval.thresholds import Gates, ImageThresholds, ResolvedThresholds, resolve_thresholds
from imagegen.faces import FaceResult, get_analyzer
from imagegen.samples import register_sample_character
from imagegen.versions import library_versions

log = logging.getLogger(__name__)

#: progress callback: (phase, done, total)
Progress = Callable[[str, int, int], None]


@dataclass
class RunResult:
    run_dir: Path
    evaluation: Evaluation
    paths: dict[str, Path]
    comparison: Comparison | None = None
    skipped: list[dict[str, Any]] = field(default_factory=list)
    outcome: RenderOutcome | None = None

    @property
    def exit_code(self) -> int:
        """1 when a gated verdict fails or a gated metric regressed against the baseline."""
        failed = self.evaluation.verdict == "fail" or (self.comparison is not None and self.comparison.failed)
        return 1 if failed else 0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


#: the run facts a report shows in its header
SHOWN_INFO = ("presets", "profiles", "methods", "rendered", "cached", "skipped", "seconds")


def write_run_dir(
    run_dir: Path,
    evaluation: Evaluation,
    *,
    kind: str,
    title: str,
    suite_name: str,
    images_root: Path,
    info: Mapping[str, Any],
    identities: Mapping[str, CharacterIdentity],
    skipped: Sequence[dict[str, Any]] = (),
    comparison: Comparison | None = None,
    images_shown: str | None = None,
) -> dict[str, Path]:
    """metrics.json, scores.json, run.json, report.html and junit.xml into ``run_dir``.

    ``images_shown``: what the report says the images are (default: their directory's path; a run
    made by the service shows no server path)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmp = comparison.to_dict() if comparison else None
    run_info = {
        "schema": SCHEMA,
        "kind": kind,
        "suite": suite_name,
        "images_root": str(images_root.resolve()),
        "identities": {k: v.describe() for k, v in identities.items()},
        "versions": library_versions(),
        **info,
    }
    metrics = {
        "schema": SCHEMA,
        "kind": kind,
        "suite": suite_name,
        "created_at": info.get("created_at", _now()),
        "backend": {"name": evaluation.thresholds.backend, "model_version": info.get("model_version")},
        **evaluation.to_dict(),
        "skipped": list(skipped),
        "comparison": cmp,
    }
    paths = {
        "metrics": write_json(run_dir / "metrics.json", metrics),
        "scores": write_json(
            run_dir / "scores.json", {"schema": SCHEMA, "images": [s.to_dict() for s in evaluation.scores]}
        ),
        "run": write_json(run_dir / "run.json", run_info),
    }
    shown = {
        "kind": kind,
        "suite": suite_name,
        "created": metrics["created_at"],
        "model_version": info.get("model_version", ""),
        "images": images_shown if images_shown is not None else str(images_root.resolve()),
        **{k: v for k, v in info.items() if k in SHOWN_INFO},
    }
    page = render_html(evaluation, title=title, images_root=images_root, info=shown, skipped=skipped, comparison=cmp)
    paths["report"] = write_text(run_dir / "report.html", page)
    junit = run_dir / "junit.xml"
    junit.write_bytes(render_junit(evaluation, suite=suite_name, skipped=skipped, comparison=cmp))
    paths["junit"] = junit
    return paths


def write_with_baseline(
    run_dir: Path,
    evaluation: Evaluation,
    baseline: Path | None,
    *,
    samples: int,
    seed: int,
    info: Mapping[str, Any],
    labels: tuple[str, str] | None = None,
    **written: Any,
) -> tuple[dict[str, Path], Comparison | None]:
    """Write the run directory; with a baseline, compare the written run with it and write it again with the
    comparison (the comparison reads both runs the way ``eval compare`` does, from their directories).

    ``labels``: how the comparison names (baseline, this run) instead of their directories' paths."""
    paths = write_run_dir(run_dir, evaluation, info=info, **written)
    if baseline is None:
        return paths, None
    comparison = compare_runs(read_run(baseline), read_run(run_dir), samples=samples, seed=seed)
    if labels is not None:
        comparison.baseline, comparison.candidate = labels
    info = {**info, "baseline": labels[0] if labels is not None else str(baseline)}
    return write_run_dir(run_dir, evaluation, info=info, comparison=comparison, **written), comparison


# -- eval run --------------------------------------------------------------------------------------
#: the card of a sample character a suite registers (``register_sample: true``)
SAMPLE_CARD = {"style_notes": "public-domain sample portrait, registered by an evaluation suite"}


def suite_identities(suite: Suite, analyzer: Any) -> dict[str, CharacterIdentity]:
    """The identity of every character of the suite (registering sample characters if asked)."""
    identities: dict[str, CharacterIdentity] = {}
    registry = None
    try:
        for spec in suite.characters:
            if spec.sample and not spec.register_sample:
                identities[spec.id] = identity_from_sample(spec.id, spec.sample, analyzer, spec.name)
                continue
            if registry is None:
                from imagegen.identity.registry import Registry

                registry = Registry.open()
            if spec.sample:
                register_sample_character(registry, spec.id, spec.sample, name=spec.name, card=SAMPLE_CARD)
            identities[spec.id] = identity_from_registry(registry, spec.id, analyzer)
    finally:
        if registry is not None:
            registry.close()
    return identities


def suite_profiles(suite: Suite) -> dict[str, str]:
    """The optimisation profile each preset of the suite renders with (a ``ProfileError`` for an unknown one)."""
    from imagegen.pipelines.presets import get_preset
    from imagegen.pipelines.profiles import ProfileError, profile_for

    try:
        return {name: profile_for(get_preset(name), suite.profile).name for name in suite.presets}
    except ProfileError as exc:
        raise ConfigError(f"suite {suite.name}: {exc}", field="profile") from None


def run_suite(
    suite_ref: str | Path | Suite,
    out: Path,
    *,
    workers: int | None = None,
    score_workers: int = 1,
    baseline: Path | None = None,
    ray_address: str | None = None,
    progress: Progress | None = None,
    profile: str | None = None,
) -> RunResult:
    """Render the suite's grid (only the cells not rendered yet), score it, write the run directory.

    ``profile``: the renderers' optimisation profile, instead of the suite's ``profile`` (see :mod:`.suite`).
    """
    started = time.perf_counter()
    if isinstance(suite_ref, Suite):
        suite, suite_path = suite_ref, None
    else:
        suite, suite_path = load_suite(suite_ref)
    if profile is not None:
        suite = suite.model_copy(update={"profile": profile})
    profiles = suite_profiles(suite)  # an unknown profile fails here, before characters or Ray
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    analyzer = get_analyzer(suite.backend)
    thresholds = resolve_thresholds(analyzer.name, suite.thresholds)
    if progress:
        progress("characters", 0, len(suite.characters))
    identities = suite_identities(suite, analyzer)
    if progress:
        progress("characters", len(suite.characters), len(suite.characters))
    names = {k: v.name for k, v in identities.items()}
    fingerprints = {k: v.fingerprint for k, v in identities.items()}
    cells = expand(suite, names, fingerprints)
    (out / "suite.yaml").write_text(yaml.safe_dump(suite.model_dump(mode="json", by_alias=True), sort_keys=False))

    # a rerun whose renders are all cached only scores: no Ray, no model is loaded
    needs_rendering = any(not (out / c.file).is_file() for c in cells)
    started_ray = ensure_ray(address=ray_address) if needs_rendering else False
    try:
        outcome = render_cells(
            cells,
            out,
            workers=workers or suite.workers,
            batch_size=suite.batch_size,
            gpus_per_worker=suite.gpus_per_worker,
            on_unsupported=suite.on_unsupported,
            extra_metadata={"suite": suite.name},
            progress=progress,
            profile=suite.profile,
        )
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return score_suite_run(
        suite,
        cells,
        outcome,
        out,
        identities=identities,
        analyzer=analyzer,
        thresholds=thresholds,
        profiles=profiles,
        rendered_seconds=time.perf_counter() - started,
        suite_path=suite_path,
        baseline=baseline,
        score_workers=score_workers,
        progress=progress,
    )


def score_suite_run(
    suite: Suite,
    cells: Sequence[Cell],
    outcome: RenderOutcome,
    out: Path,
    *,
    identities: Mapping[str, CharacterIdentity],
    analyzer: Any,
    thresholds: ResolvedThresholds,
    profiles: Mapping[str, str],
    rendered_seconds: float,
    suite_path: Path | None = None,
    baseline: Path | None = None,
    score_workers: int = 1,
    progress: Progress | None = None,
    images_shown: str | None = None,
    labels: tuple[str, str] | None = None,
) -> RunResult:
    """Score a suite's rendered grid (the PNGs under ``out``) and write the run directory.

    The second half of ``run_suite``, on its own so a grid rendered elsewhere (the service's
    renderer deployments: ``imagegen.serve.evalruns``) is scored and reported the same way.
    ``images_shown`` and ``labels`` replace server paths in what the report shows (see ``write_run_dir``,
    ``write_with_baseline``).
    """
    scored_cells = [c for c in cells if c.key not in outcome.skipped]
    to_analyze = [c for c in scored_cells if c.key not in outcome.problems]
    with FaceScorer(suite.backend, score_workers) as scorer:
        results = scorer.analyze(
            [out / c.file for c in to_analyze], (lambda d, t: progress("score", d, t)) if progress else None
        )
    by_key: dict[str, FaceResult | str] = {c.key: r for c, r in zip(to_analyze, results, strict=True)}
    rendered_now = {c.key for c in outcome.rendered}
    scores: list[ImageScore] = []
    for cell in scored_cells:
        result = by_key.get(cell.key)
        problem = outcome.problems.get(cell.key) or (result if isinstance(result, str) else None)
        meta = {
            "preset": cell.preset,
            "method": cell.method,
            "weight": cell.weight,
            "prompt": cell.request["prompt"],
            "seed": cell.seed,
            "status": "rendered" if cell.key in rendered_now else ("unusable" if problem else "cached"),
        }
        scores.append(
            score_image(
                None if isinstance(result, str) else result,
                cell.character,
                identities,
                thresholds,
                file=cell.file,
                tags=cell.tags,
                key=cell.key,
                meta=meta,
                problem=problem,
            )
        )
    evaluation = evaluate(
        scores,
        thresholds,
        suite.gates,
        characters=[c.id for c in suite.characters],
        gated=suite.gated,
        bootstrap=suite.bootstrap.samples,
        seed=suite.bootstrap.seed,
        what=suite.name,
    )
    skipped = [
        {"file": c.file, "character": c.character, "key": c.key, "tags": c.tags, "reason": outcome.skipped[c.key]}
        for c in cells
        if c.key in outcome.skipped
    ]
    if skipped:
        evaluation.reasons.append(f"{len(skipped)} cell(s) skipped: {skipped[0]['reason']}")
    baseline = baseline or (Path(suite.baseline) if suite.baseline else None)
    info = {
        "created_at": _now(),
        "suite_file": None if suite_path is None else str(suite_path.resolve()),
        "backend": analyzer.name,
        "model_version": analyzer.model_version,
        "presets": ", ".join(suite.presets),
        "methods": ", ".join(m.name for m in suite.methods),
        "profiles": ", ".join(f"{p}: {name}" for p, name in profiles.items()),
        "cells": len(cells),
        "rendered": len(outcome.rendered),
        "cached": len(outcome.cached),
        "unusable": len(outcome.problems),
        "skipped": len(skipped),
        "actors": outcome.actors,
        "render_seconds": round(rendered_seconds, 2),
    }
    paths, comparison = write_with_baseline(
        out,
        evaluation,
        baseline,
        samples=suite.bootstrap.samples,
        seed=suite.bootstrap.seed,
        kind="run",
        title=f"suite {suite.name}",
        suite_name=suite.name,
        images_root=out,
        info=info,
        identities=identities,
        skipped=skipped,
        images_shown=images_shown,
        labels=labels,
    )
    log.info("suite %s: %s", suite.name, evaluation.summary)
    return RunResult(out, evaluation, paths, comparison, skipped, outcome)


# -- eval score ------------------------------------------------------------------------------------
@dataclass
class ManifestEntry:
    file: str
    character: str
    tags: dict[str, str] = field(default_factory=dict)


def _inside(directory: Path, name: str) -> Path:
    path = (directory / name).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise ConfigError(f"manifest file {name!r} is outside {directory}: give paths relative to the directory")
    if not path.is_file():
        raise ConfigError(f"manifest file {name!r} does not exist in {directory}")
    return path


def read_manifest(path: Path, directory: Path) -> list[ManifestEntry]:
    """A manifest: YAML/JSON ``FILE: CHARACTER`` or a list of ``{file, character, tags}``."""
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the manifest {path}: {exc}", field="manifest") from exc
    if isinstance(data, dict) and "images" in data:
        data = data["images"]
    entries: list[ManifestEntry] = []
    if isinstance(data, dict):
        entries = [ManifestEntry(str(f), str(c)) for f, c in data.items()]
    elif isinstance(data, list):
        for i, item in enumerate(data):
            if not isinstance(item, dict) or "file" not in item or "character" not in item:
                raise ConfigError(f"{path} entry {i}: expected {{file: FILE, character: ID, tags: {{...}}}}")
            tags = item.get("tags") or {}
            if not isinstance(tags, dict):
                raise ConfigError(f"{path} entry {i}: tags is a mapping of tag name to value")
            entries.append(
                ManifestEntry(str(item["file"]), str(item["character"]), {str(k): str(v) for k, v in tags.items()})
            )
    if not entries:
        raise ConfigError(
            f"{path}: a manifest maps files to characters (FILE: CHARACTER, or a list of {{file, character, tags}})",
            field="manifest",
        )
    for entry in entries:
        _inside(directory, entry.file)
    return entries


def score_directory(
    directory: Path,
    out: Path,
    *,
    character: str | None = None,
    manifest: Path | None = None,
    against: Sequence[str] = (),
    backend: str | None = None,
    workers: int = 1,
    thresholds: Mapping[str, ImageThresholds] | None = None,
    gates: Gates | None = None,
    gated: bool = True,
    bootstrap: int = 1000,
    seed: int = 0,
    baseline: Path | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Score images made anywhere against registered (or ``sample:``) characters."""
    started = time.perf_counter()
    directory = Path(directory)
    if not directory.is_dir():
        raise ImagegenError(f"{directory} is not a directory of images", field="dir")
    if (character is None) == (manifest is None):
        raise ImagegenError("give either --character ID (every image shows it) or --manifest FILE", field="character")
    if manifest is not None:
        entries = read_manifest(Path(manifest), directory)
    else:
        files = list_images(directory)
        if not files:
            raise ImagegenError(f"no PNG, JPEG or WebP image in {directory}", field="dir")
        entries = [ManifestEntry(p.relative_to(directory).as_posix(), character or "") for p in files]
    analyzer = get_analyzer(backend)
    resolved = resolve_thresholds(analyzer.name, dict(thresholds or {}))
    wanted = list(dict.fromkeys([e.character for e in entries] + list(against)))
    identities: dict[str, CharacterIdentity] = {}
    registry = None
    try:
        for spec in wanted:
            if not spec.startswith("sample:") and registry is None:
                from imagegen.identity.registry import Registry

                registry = Registry.open()
            identities[spec] = resolve_identity(spec, analyzer, registry)
    finally:
        if registry is not None:
            registry.close()
    with FaceScorer(backend, workers) as scorer:
        results = scorer.analyze(
            [directory / e.file for e in entries], (lambda d, t: progress("score", d, t)) if progress else None
        )
    scores = [
        score_image(
            None if isinstance(result, str) else result,
            entry.character,
            identities,
            resolved,
            file=entry.file,
            tags=entry.tags,
            key=entry.file,
            problem=result if isinstance(result, str) else None,
        )
        for entry, result in zip(entries, results, strict=True)
    ]
    name = directory.resolve().name or "images"
    evaluation = evaluate(
        scores, resolved, gates, characters=wanted, gated=gated, bootstrap=bootstrap, seed=seed, what=name
    )
    info = {
        "created_at": _now(),
        "backend": analyzer.name,
        "model_version": analyzer.model_version,
        "directory": str(directory.resolve()),
        "manifest": None if manifest is None else str(Path(manifest).resolve()),
        "seconds": round(time.perf_counter() - started, 2),
    }
    out = Path(out)
    paths, comparison = write_with_baseline(
        out,
        evaluation,
        baseline,
        samples=bootstrap,
        seed=seed,
        kind="score",
        title=f"scored {name}",
        suite_name=name,
        images_root=directory,
        info=info,
        identities=identities,
    )
    return RunResult(out, evaluation, paths, comparison)
