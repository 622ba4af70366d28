"""Images per second for batch sizes 1, 2, 4, 8, per optimisation profile.

    python bench/render_batch.py                                   # tiny-flux and tiny-sdxl, their own profile
    python bench/render_batch.py --profile quality,fast,fastest    # each profile (eager first: the ratios' base)
    python bench/render_batch.py --preset flux-dev --profile fast  # any preset, e.g. on a GPU machine

Per preset x profile x batch size: the first call of that batch size timed on its own (under a compiling profile:
compile warm-up, see bench/profile_bench.py), then the median of ``--repeats`` pipeline calls; s/image and its ratio
to the eager (``quality``) render at the same batch size. Identity methods: bench/identity_overhead.py. Prints a
table and, last, one JSON document (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_bench import (  # noqa: E402
    add_ratios,
    markdown_table,
    parse_profiles,
    print_table,
    reset_compiled,
    time_calls,
    timing_fields,
)

from imagegen.errors import ImagegenError  # noqa: E402
from imagegen.pipelines.presets import get_preset  # noqa: E402
from imagegen.pipelines.renderer import Renderer  # noqa: E402
from imagegen.pipelines.types import RenderRequest  # noqa: E402


def bench_preset(
    name: str, choice, batch_sizes: list[int], repeats: int, steps: int | None, size: int | None, stat: str = "median"
) -> list[dict]:
    preset = get_preset(name)
    base = {"preset": name, "profile": choice.label, "method": "none"}
    try:
        renderer = Renderer(preset, profile=choice.resolve(preset))
    except ImagegenError as exc:
        return [{**base, "batch": b, "note": f"refused: {exc}"} for b in batch_sizes]
    rows = []
    for batch in batch_sizes:
        requests = [
            RenderRequest(
                prompt=f"a photo of character {i % 2} at a cafe", seed=i, steps=steps, width=size, height=size
            )
            for i in range(batch)
        ]
        try:
            timing = time_calls(lambda: renderer.render(requests), repeats, renderer.device)  # noqa: B023
        except Exception as exc:  # noqa: BLE001 - a crash mid-render (e.g. a compile limit) is a result too
            note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            rows.append({**base, "batch": batch, "note": note})
            print(f"  {name} {choice.label} batch {batch}: {note}", flush=True)
            continue
        first = renderer.prepare(requests[0])
        rows.append(
            {
                **base,
                "batch": batch,
                **timing_fields(timing, batch, stat),
                "steps": first.steps,
                "size": f"{first.width}x{first.height}",
                "device": f"{renderer.device} {str(renderer.dtype).replace('torch.', '')}",
                "load_s": round(renderer.load_seconds, 2),
                "applied": renderer.applied_profile.summary(),
            }
        )
        rows[-1]["images_per_s"] = round(1 / rows[-1]["s_per_image"], 2)
        print(f"  {name} {choice.label} batch {batch}: {rows[-1]['s_per_image']:.4f} s/image", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", help="preset(s) to measure (default: tiny-flux, tiny-sdxl)")
    parser.add_argument(
        "--profile",
        action="append",
        help="optimisation profile(s), repeatable or comma-separated; <name>:no-step-cache drops its step cache "
        "(default: quality)",
    )
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--stat", choices=("median", "best"), default="median", help="s/image from the median or the best call"
    )
    parser.add_argument("--steps", type=int, default=None, help="override the preset's default steps")
    parser.add_argument("--size", type=int, default=None, help="square size (default: the preset's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON document here")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    choices = parse_profiles(args.profile)
    rows = []
    for preset in args.preset or ["tiny-flux", "tiny-sdxl"]:
        for choice in choices:
            rows += bench_preset(preset, choice, batch_sizes, args.repeats, args.steps, args.size, args.stat)
            reset_compiled()  # the renderer is gone: its compiled code too (the next profile starts cold)
    add_ratios(rows)
    report = {
        "command": "python bench/render_batch.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
        },
        "rows": rows,
    }
    print_table("render throughput per profile (no identity)", rows)
    print(markdown_table(rows))
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
