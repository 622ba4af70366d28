"""Scoring throughput of ``imagegen eval``: images per second with 1 and 2 face-analysis workers.

    .venv/bin/python bench/eval_score.py                      # dlib, 48 images, workers 1 and 2
    .venv/bin/python bench/eval_score.py --images 96 --workers 1 2 --trials 3 --json out.json

What is timed is what ``imagegen eval score`` does per run once its workers are up: read every
PNG, detect + embed the largest face (``FaceScorer.analyze``, 1 worker = in this process,
N = N spawned processes), score each face against two characters (centroid, single references,
leakage; ``score_image``) and compute every set metric with bootstrap intervals (``evaluate``).
Worker start-up (spawn + model load, paid once per command) is reported separately.

Workload: real public-domain photos from ``imagegen.samples``, the astronaut and Grace Hopper,
augmented (crop, light, rotation, JPEG, downscale of the mirrored photo) and written as PNGs;
every image has one face. Each configuration runs ``--trials`` times; the best trial is the
figure (on a shared machine slower trials measure the neighbours) and the JSON keeps them all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import ImageOps

KINDS = ("crop", "brightness", "rotate", "jpeg", "downscale")


def write_workload(root: Path, count: int) -> list[tuple[Path, str]]:
    from imagegen import samples

    people = {
        "astronaut": (samples.astronaut(), samples.ASTRONAUT_FACE_BOX),
        "hopper": (samples.grace_hopper(), samples.GRACE_HOPPER_FACE_BOX),
    }
    files = []
    for i in range(count):
        person = "astronaut" if i % 2 == 0 else "hopper"
        base, box = people[person]
        mirrored = ImageOps.mirror(base)
        mbox = (base.width - box[2], box[1], base.width - box[0], box[3])
        image = samples.augment(mirrored, KINDS[i % len(KINDS)], seed=i, face_box=mbox)
        path = root / f"{person}-{i:03d}.png"
        image.save(path)
        files.append((path, person))
    return files


def identities(backend: str):
    from imagegen import samples
    from imagegen.eval.identities import identity_from_images
    from imagegen.faces import get_analyzer

    analyzer = get_analyzer(backend)
    out = {}
    for person, base, box in (
        ("astronaut", samples.astronaut(), samples.ASTRONAUT_FACE_BOX),
        ("hopper", samples.grace_hopper(), samples.GRACE_HOPPER_FACE_BOX),
    ):
        refs = [base] + [samples.augment(base, k, seed=i, face_box=box) for i, k in enumerate(KINDS[1:4], 1)]
        out[person] = identity_from_images(person, refs, analyzer)
    return out


def run(backend: str, workers: int, files, ids, bootstrap: int) -> dict:
    from imagegen.eval.metrics import evaluate, score_image
    from imagegen.eval.scoring import FaceScorer
    from imagegen.eval.thresholds import resolve_thresholds

    thresholds = resolve_thresholds(backend)
    started = time.perf_counter()
    with FaceScorer(backend, workers) as scorer:
        scorer.warm_up()
        ready = time.perf_counter()
        results = scorer.analyze([p for p, _ in files])
        analysed = time.perf_counter()
        scores = [
            score_image(r, person, ids, thresholds, file=p.name) for r, (p, person) in zip(results, files, strict=True)
        ]
        evaluation = evaluate(scores, thresholds, characters=list(ids), bootstrap=bootstrap)
        done = time.perf_counter()
    wall = done - ready
    return {
        "backend": backend,
        "workers": workers,
        "images": len(files),
        "faces": evaluation.overall["n_faces"],
        "startup_s": round(ready - started, 3),
        "analyse_s": round(analysed - ready, 3),
        "metrics_s": round(done - analysed, 3),
        "seconds": round(wall, 3),
        "images_per_s": round(len(files) / wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="dlib")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per interval")
    parser.add_argument("--json", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)

    import logging

    logging.disable(logging.WARNING)
    from rich.console import Console
    from rich.table import Table

    rows = []
    with tempfile.TemporaryDirectory(prefix="imagegen-bench-eval-") as tmp:
        files = write_workload(Path(tmp), args.images)
        ids = identities(args.backend)
        for workers in args.workers:
            trials = [run(args.backend, workers, files, ids, args.bootstrap) for _ in range(args.trials)]
            best = dict(max(trials, key=lambda r: r["images_per_s"]))
            best["trials_images_per_s"] = [r["images_per_s"] for r in trials]
            best["median_images_per_s"] = float(np.median(best["trials_images_per_s"]))
            rows.append(best)
    report = {
        "benchmark": "eval_score",
        "command": "python bench/eval_score.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "image_size": "512x512 / 512x600 photos, augmented (downscaled ones smaller)",
        "rows": rows,
    }
    table = Table(title=f"eval scoring throughput ({args.backend}, {args.images} images, best of {args.trials})")
    for column in ("workers", "images/s", "median", "analyse s", "metrics s", "start-up s", "faces"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["workers"]),
            f"{row['images_per_s']:.2f}",
            f"{row['median_images_per_s']:.2f}",
            f"{row['analyse_s']:.2f}",
            f"{row['metrics_s']:.2f}",
            f"{row['startup_s']:.2f}",
            f"{row['faces']}/{row['images']}",
        )
    console = Console(width=120)
    console.print(table)
    console.print_json(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
