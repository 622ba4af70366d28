"""The README's first command (``imagegen demo``): the main job end to end on the embedded defaults.

1. :mod:`imagegen.demo.local`: registers a demo character from public-domain photos that ship
   in installed packages, approves it and renders a small grid with the tiny FLUX and SDXL
   presets, without identity, through PuLID and through an IP-Adapter method.
2. :mod:`imagegen.demo.service`: starts the HTTP service (Ray Serve, configs/serve.yaml), drives
   it with the Python client (register, approve, render synchronously and as a job with SSE
   progress, provenance check) and stops it.
3. Ends with an eval run of the smoke suite through the Ray actor pool: ``report.html``,
   ``metrics.json`` and ``junit.xml`` under ``out/eval-smoke``.

The demo sits on top: it uses identity, serve and eval; nothing else in the package imports it.

No apparent-age estimator can be installed offline, so the demo character is ``age_check:
unverified``; the demo turns on the development-only ``IMAGEGEN_ALLOW_UNVERIFIED_AGE`` (and says
so) — a real deployment installs an estimator and leaves it off.

``profile`` (``imagegen demo --profile``) renders every part with that optimisation profile: it becomes
this process's ``IMAGEGEN_PROFILE``, which the service's replicas and the suite's actors inherit. A profile
with a step cache that an identity method does not honour (``fastest`` on FLUX) stops the demo's identity
renders with that one-line refusal.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from rich.progress import Progress

from imagegen import samples
from imagegen.demo.local import DEMO_PRESETS, DEMO_SAMPLE, run_local_demo
from imagegen.settings import get_settings

__all__ = ["run_demo"]


def run_demo(
    out: Path,
    progress_factory: Callable[[], Progress],
    *,
    service: bool = True,
    evaluation: bool = True,
    log: Callable[[str], None] = print,
    profile: str | None = None,
) -> dict[str, Path]:
    """Render the demo grid into ``out``, then the service and eval parts; returns what was written, by label."""
    if profile is not None:
        use_profile(profile, log)
    allow_unverified_age(log)
    written = run_local_demo(out, progress_factory)
    if service:
        written.update(run_service_part(out, log))
    if evaluation:
        written.update(run_eval_part(out, progress_factory))
    return written


def use_profile(profile: str, log: Callable[[str], None]) -> None:
    """Make ``profile`` this process's IMAGEGEN_PROFILE (the service and the suite's actors inherit it)."""
    from imagegen.terminal import check_profile_choice

    check_profile_choice(profile, DEMO_PRESETS)
    os.environ["IMAGEGEN_PROFILE"] = profile
    get_settings.cache_clear()
    log(f"optimisation profile: {profile} (IMAGEGEN_PROFILE, for the renders, the service and the eval actors)")


def allow_unverified_age(log: Callable[[str], None]) -> None:
    """Turn on the development-only age policy for this process and the service it starts (env var)."""
    if not get_settings().allow_unverified_age:
        os.environ["IMAGEGEN_ALLOW_UNVERIFIED_AGE"] = "1"
        get_settings.cache_clear()
    log(
        "development only: IMAGEGEN_ALLOW_UNVERIFIED_AGE=1 (no age estimator offline); "
        "images say so in their provenance metadata"
    )


def run_service_part(out: Path, log: Callable[[str], None]) -> dict[str, Path]:
    """Start the service, drive it with the Python client, stop it (:mod:`imagegen.demo.service`)."""
    from imagegen.demo.service import run_service_demo

    files, provenance = samples.reference_files(DEMO_SAMPLE), samples.provenance(DEMO_SAMPLE)
    written = run_service_demo(out, files, provenance, log=log)
    return {f"service {label}": path for label, path in written.items()}


def run_eval_part(out: Path, progress_factory: Callable[[], Progress]) -> dict[str, Path]:
    """The smoke suite through the Ray actor pool: report.html, metrics.json and junit.xml."""
    from imagegen.eval.run import run_suite

    run_dir = out / "eval-smoke"
    with progress_factory() as bar:
        tasks: dict[str, int] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(f"eval {phase}", total=total)
            bar.update(tasks[phase], completed=done, total=total)

        result = run_suite("smoke", run_dir, progress=update)
    return {f"eval ({result.evaluation.verdict}) {label}": path for label, path in result.paths.items()}
