"""``imagegen eval ...``: run suites, score any images, compare runs, calibrate thresholds.

Exit codes: 0 success; 1 a gated verdict failed or a gated metric regressed; 2 a usage or
configuration error (printed as one line by ``imagegen.cli.main``).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from imagegen.errors import ImagegenError
from imagegen.terminal import PROFILE_HELP, console, ensure_writable_dir, progress_bar

eval_app = typer.Typer(
    help="Consistency evaluation: regression suites, scoring, run comparison, threshold calibration.",
    no_args_is_help=True,
)

VERDICT_STYLE = {"pass": "bold green", "fail": "bold red", "ungated": "bold blue"}


@contextmanager
def _progress():
    """A rich progress bar with one task per phase; yields the callback the library takes."""
    tasks: dict[str, int] = {}
    with progress_bar() as bar:

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield update


def _print_result(result) -> None:
    e = result.evaluation
    style = VERDICT_STYLE.get(e.verdict, "bold")
    table = Table(title=f"{escape(str(result.run_dir))}")
    for column in ("character", "images", "faces", "detection", "mean sim", "p10", "copy", "rank-1", "pass", "verdict"):
        table.add_column(column)

    def pct(v):
        return "-" if v is None else f"{100 * v:.0f}%"

    def num(v):
        return "-" if v is None else f"{v:.3f}"

    for name, m in [*e.per_character.items(), ("overall", e.overall)]:
        table.add_row(
            escape(name),
            str(m["n_images"]),
            str(m["n_faces"]),
            pct(m["detection_rate"]),
            num(m["mean_similarity"]),
            num(m["p10_similarity"]),
            pct(m["copy_rate"]),
            pct(m["rank1_accuracy"]),
            pct(m["pass_rate"]),
            escape(m.get("verdict", "")),
        )
    console.print(table)
    console.print(f"[{style}]{escape(e.summary)}[/]")
    for reason in e.reasons[:10]:
        console.print(f"  - {escape(reason)}")
    if result.comparison is not None:
        _print_comparison(result.comparison, only_flagged=True)
    console.print(f"report: {result.paths['report']}")
    console.print(f"metrics: {result.paths['metrics']}")
    console.print(f"junit: {result.paths['junit']}")


def _print_comparison(comparison, only_flagged: bool = False) -> None:
    table = Table(title=f"{escape(comparison.baseline)} -> {escape(comparison.candidate)}")
    for column in ("scope", "group", "metric", "baseline", "candidate", "delta", "95% CI", "flag"):
        table.add_column(column)
    for row in comparison.rows:
        flagged = row["regression"] or row["improvement"]
        if only_flagged and not flagged:
            continue
        if not only_flagged and row["scope"] == "tag" and not flagged:
            continue
        flag = ""
        if row["regression"]:
            flag = "[red]REGRESSION (gated)[/]" if row["gated"] else "[yellow]regression[/]"
        elif row["improvement"]:
            flag = "[green]improvement[/]"
        ci = row["ci"]
        table.add_row(
            row["scope"],
            escape(row["group"]),
            row["metric"],
            f"{row['a']:.3f}",
            f"{row['b']:.3f}",
            f"{row['delta']:+.3f}",
            "-" if not ci else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]",
            flag,
        )
    console.print(table)
    style = "bold red" if comparison.failed else "bold green"
    console.print(f"[{style}]{escape(comparison.summary)}[/]")


@eval_app.command("run")
def run_command(
    suite: str = typer.Argument(..., help="Suite YAML path, or a name in configs/suites/ (e.g. smoke)."),
    out: Path | None = typer.Option(None, "--out", help="Run directory (default runs/<suite name>)."),
    workers: int | None = typer.Option(None, help="Renderer actors per preset (default: the suite's)."),
    score_workers: int = typer.Option(1, help="Face-analysis processes."),
    baseline: Path | None = typer.Option(None, help="Run directory to compare with (overrides the suite's)."),
    ray_address: str | None = typer.Option(
        None,
        "--address",
        "--ray-address",
        help="Run the actor pool on this Ray cluster (host:6379, or auto) instead of a local Ray; it needs the "
        "cluster's token (RAY_AUTH_TOKEN_PATH, or $IMAGEGEN_HOME/ray/auth_token) and the models on its nodes.",
    ),
    profile: str | None = typer.Option(None, "--profile", help=PROFILE_HELP + " Overrides the suite's `profile`."),
) -> None:
    """Render a suite's grid through a Ray actor pool (cached renders are reused), score it, report."""
    from imagegen.eval.run import run_suite, suite_profiles
    from imagegen.eval.suite import load_suite

    spec, _ = load_suite(suite)  # fail on a bad suite (or profile) before anything starts
    suite_profiles(spec if profile is None else spec.model_copy(update={"profile": profile}))
    if ray_address:  # an unreachable cluster is one line now, not after the characters are analysed
        from imagegen.serve.launcher import check_reachable

        check_reachable(ray_address)
    out = ensure_writable_dir(out or Path("runs") / spec.name)
    if baseline is not None and not baseline.is_dir():
        raise ImagegenError(f"baseline {baseline} is not a run directory", field="baseline")
    with _progress() as update:
        result = run_suite(
            suite,
            out,
            workers=workers,
            score_workers=score_workers,
            baseline=baseline,
            ray_address=ray_address,
            progress=update,
            profile=profile,
        )
    _print_result(result)
    raise typer.Exit(result.exit_code)


@eval_app.command("score")
def score_command(
    directory: Path = typer.Argument(..., help="Directory of images (PNG, JPEG, WebP), searched recursively."),
    out: Path = typer.Option(..., "--out", help="Run directory to write."),
    character: str | None = typer.Option(
        None, help="Registered character id (or sample:astronaut / sample:grace_hopper) every image should show."
    ),
    manifest: Path | None = typer.Option(
        None, help="YAML/JSON mapping files (relative to DIR) to characters, instead of --character."
    ),
    against: list[str] = typer.Option([], help="More characters to test leakage against (repeatable)."),
    backend: str | None = typer.Option(None, help="Face backend (default IMAGEGEN_FACE_BACKEND)."),
    workers: int = typer.Option(1, help="Face-analysis processes."),
    threshold: float | None = typer.Option(None, help="Per-image similarity threshold (default: calibrated/backend)."),
    copy_bound: float | None = typer.Option(None, "--copy-bound", help="Copy-paste bound (default: per backend)."),
    gate: bool = typer.Option(True, "--gate/--no-gate", help="Apply the gates (exit 1 on failure) or only report."),
    baseline: Path | None = typer.Option(None, help="Run directory to compare with."),
) -> None:
    """Score renders made anywhere (this system, ComfyUI, ...) and write a run directory."""
    from imagegen.eval.run import score_directory
    from imagegen.eval.thresholds import ImageThresholds
    from imagegen.faces import get_analyzer, metric_for

    out = ensure_writable_dir(out)
    thresholds = None
    if threshold is not None or copy_bound is not None:
        family = metric_for(backend or get_analyzer(backend).name).backend
        thresholds = {family: ImageThresholds(similarity=threshold, copy=copy_bound)}
    with _progress() as update:
        result = score_directory(
            directory,
            out,
            character=character,
            manifest=manifest,
            against=against,
            backend=backend,
            workers=workers,
            thresholds=thresholds,
            gated=gate,
            baseline=baseline,
            progress=update,
        )
    _print_result(result)
    raise typer.Exit(result.exit_code)


@eval_app.command("compare")
def compare_command(
    run_a: Path = typer.Argument(..., help="Baseline run directory."),
    run_b: Path = typer.Argument(..., help="New run directory."),
    gate: list[str] = typer.Option([], help="Gated metric (repeatable; default: the new run's gates.compare)."),
    gate_tags: bool = typer.Option(False, help="Gate per-tag regressions too."),
    samples: int = typer.Option(1000, help="Bootstrap resamples."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the comparison as JSON here."),
) -> None:
    """Per character and per tag, the change of each metric with its 95% CI; exit 1 on a gated regression."""
    from imagegen.eval.compare import compare_runs
    from imagegen.eval.rundir import read_run, write_json

    comparison = compare_runs(
        read_run(run_a), read_run(run_b), gated_metrics=gate or None, gate_tags=gate_tags, samples=samples, seed=seed
    )
    _print_comparison(comparison)
    for text in comparison.regressions:
        console.print(f"  - {escape(text)}")
    if json_out is not None:
        write_json(json_out, comparison.to_dict())
        console.print(f"comparison: {json_out}")
    raise typer.Exit(1 if comparison.failed else 0)


@eval_app.command("calibrate")
def calibrate_command(
    pairs: Path | None = typer.Option(None, help="YAML/JSON list of {a, b, same} or CSV a,b,same."),
    labels: Path | None = typer.Option(None, help="YAML/JSON FILE: LABEL (every pair of images is used)."),
    backend: list[str] = typer.Option([], help="Face backend(s) to calibrate (default IMAGEGEN_FACE_BACKEND)."),
    out: Path | None = typer.Option(None, help="Thresholds file (default configs/thresholds.yaml)."),
    workers: int = typer.Option(1, help="Face-analysis processes."),
    dry_run: bool = typer.Option(False, help="Print the thresholds without writing them."),
) -> None:
    """The EER threshold per face backend from labelled same/different pairs, written to configuration."""
    from imagegen.eval.calibrate import calibrate_pairs, load_labels, load_pairs, pairs_from_labels, write_calibration
    from imagegen.eval.thresholds import eval_settings

    if (pairs is None) == (labels is None):
        raise ImagegenError("give either --pairs FILE or --labels FILE", field="pairs")
    listed = load_pairs(pairs) if pairs is not None else pairs_from_labels(load_labels(labels))
    source_file = pairs or labels
    target = out or eval_settings().thresholds_file
    table = Table(title="calibration (EER threshold per backend)")
    for column in ("backend", "same pairs", "different pairs", "AUC", "EER", "threshold", "FAR", "FRR", "no face"):
        table.add_column(column)
    written = []
    for name in backend or [None]:
        calibration = calibrate_pairs(listed, name, workers)
        table.add_row(
            calibration.backend,
            str(calibration.same_pairs),
            str(calibration.different_pairs),
            f"{calibration.auc:.4f}",
            f"{calibration.eer:.4f}",
            f"{calibration.threshold:.4f}",
            f"{calibration.far:.4f}",
            f"{calibration.frr:.4f}",
            str(len(calibration.images_without_face)),
        )
        if not dry_run:
            written.append(write_calibration(calibration, target, f"imagegen eval calibrate ({source_file})"))
        if dry_run:
            console.print_json(json.dumps(calibration.to_dict()))
    console.print(table)
    if written:
        console.print(f"thresholds: {target}")
