"""Throughput of a busy renderer replica with its images stamped behind the next batch, against stamped in line.

Every served image is scored, watermarked, PNG-encoded and C2PA-signed in its replica (~70 CPU ms at 1024 px).
With ``overlap_finishing`` (the default) a batch's stamps run in a finishing thread while the next queued batch
renders; without it the renderer stamps before it takes the next batch, and the accelerator waits. This bench
drives the real ``RendererDeployment`` in one process (no Ray: the batcher, the pipeline thread, the finishing
thread and the stamp threads as a replica runs them) with a backlog: ``--requests`` calls at once, rendered in
batches of ``--batch``, both arms alternated over ``--rounds``:

    .venv/bin/python bench/finish_overlap.py [--preset tiny-flux] [--size 256] [--steps 4] [--batch 4] \\
        [--requests 24] [--rounds 5] [--torch-threads 1] [--json out.json]

Per arm: images/s (median of rounds), the renderer's busy share of the wall time (its pipeline calls' ``total_s``
over the backlog's wall time: what a GPU would bill), the stamp's median ``stamp_s``. Prints a table and a JSON line
with ``images_per_s`` / ``renderer_busy`` per arm and ``speedup`` (overlapped over in line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from typing import Any

from rich.console import Console
from rich.table import Table

ARMS = {"overlapped": True, "in line": False}


async def backlog(replica: Any, args: argparse.Namespace, round_: int) -> dict[str, float]:
    """``args.requests`` calls submitted at once; the wall time until the last image, and the images' timings."""
    from imagegen.pipelines.types import RenderRequest
    from imagegen.serve.actors import RenderCall, RenderedImage

    calls = [
        RenderCall(
            RenderRequest(
                prompt=f"a portrait, take {i}",
                seed=round_ * 1000 + i,
                width=args.size,
                height=args.size,
                steps=args.steps,
            ),
            request_id=f"bench-{round_}-{i}",
        )
        for i in range(args.requests)
    ]
    started = time.perf_counter()
    images = await asyncio.gather(*(replica.render_once(c) for c in calls))
    wall = time.perf_counter() - started
    bad = [i for i in images if not isinstance(i, RenderedImage)]
    if bad:
        raise SystemExit(f"a render failed: {bad[0]}")
    renders = {i.batch["id"]: i.timings["total_s"] for i in images}
    return {
        "wall_s": wall,
        "images_per_s": len(images) / wall,
        "renderer_busy": sum(renders.values()) / wall,
        "batches": len(renders),
        "stamp_ms": statistics.median(i.timings["stamp_s"] for i in images) * 1000,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from imagegen.pipelines.assets import prepare
    from imagegen.pipelines.presets import get_preset
    from imagegen.serve.renderer_deployment import RendererDeployment

    prepare(get_preset(args.preset))
    loop = asyncio.new_event_loop()
    replica = RendererDeployment.func_or_class(args.preset, warmup=True)
    config = {
        "max_batch_size": args.batch,
        "warmup_sizes": [[args.size, args.size]],
        "warmup_batch_sizes": sorted({1, args.batch}),
        "warmup_identity": False,
    }
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    try:
        for round_ in range(args.rounds + 1):  # round 0 warms both arms up and is not counted
            order = list(ARMS) if round_ % 2 else list(reversed(ARMS))
            for arm in order:
                loop.run_until_complete(replica.reconfigure({**config, "overlap_finishing": ARMS[arm]}))
                result = loop.run_until_complete(backlog(replica, args, round_))
                if round_:
                    runs[arm].append(result)
        behind = replica.health()["batching"]["finished_behind_next"]
    finally:
        loop.run_until_complete(replica.batcher.close())
        loop.close()
    figures = {
        arm: {
            name: round(statistics.median(r[name] for r in results), 4)
            for name in ("images_per_s", "renderer_busy", "wall_s", "stamp_ms", "batches")
        }
        for arm, results in runs.items()
    }
    return {
        "preset": args.preset,
        "size": args.size,
        "steps": args.steps,
        "batch": args.batch,
        "requests": args.requests,
        "rounds": args.rounds,
        "torch_threads": args.torch_threads,
        "batches_finished_behind": behind,
        "arms": figures,
        "speedup": round(figures["overlapped"]["images_per_s"] / figures["in line"]["images_per_s"], 4),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-flux")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=1, help="as a renderer replica at one CPU")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("IMAGEGEN_HOME", tempfile.mkdtemp(prefix="finish-overlap-"))
    os.environ.setdefault("IMAGEGEN_ALLOW_UNVERIFIED_AGE", "1")  # development only, as the demo sets it

    import torch

    torch.set_num_threads(args.torch_threads)
    figures = measure(args)
    table = Table(title=f"finishing behind the next batch ({args.preset}, {args.size} px, batch {args.batch})")
    table.add_column("figure")
    for arm in ARMS:
        table.add_column(arm, justify="right")
    for name in ("images_per_s", "renderer_busy", "wall_s", "stamp_ms", "batches"):
        table.add_row(name, *(f"{figures['arms'][arm][name]:.3f}" for arm in ARMS))
    Console().print(table)
    line = json.dumps(figures)
    print(line)
    if args.json:
        with open(args.json, "w") as out:
            out.write(line + "\n")


if __name__ == "__main__":
    main()
