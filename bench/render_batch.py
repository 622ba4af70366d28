"""Images per second for batch sizes 1, 2, 4, 8.

    python bench/render_batch.py                      # tiny-flux and tiny-sdxl on this machine
    python bench/render_batch.py --preset flux-dev    # any preset, e.g. on a GPU machine

Every batch size is warmed up once (prompt embeddings cached, kernels compiled), then timed over
``--repeats`` pipeline calls. Prints a table and, last, one JSON document.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from imagegen.pipelines.renderer import Renderer
from imagegen.pipelines.types import RenderRequest


def bench_preset(name: str, batch_sizes: list[int], repeats: int, steps: int | None, size: int | None) -> dict:
    renderer = Renderer(name)
    rows = []
    for batch in batch_sizes:
        requests = [
            RenderRequest(
                prompt=f"a photo of character {i % 2} at a cafe", seed=i, steps=steps, width=size, height=size
            )
            for i in range(batch)
        ]
        renderer.render(requests)  # warm-up
        times = []
        for _ in range(repeats):
            if renderer.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            results = renderer.render(requests)
            if renderer.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        first = results[0].request
        rows.append(
            {
                "batch_size": batch,
                "median_s": round(median, 4),
                "images_per_s": round(batch / median, 2),
                "s_per_image": round(median / batch, 4),
                "steps": first.steps,
                "size": f"{first.width}x{first.height}",
            }
        )
    return {
        "preset": name,
        "device": str(renderer.device),
        "dtype": str(renderer.dtype).replace("torch.", ""),
        "load_s": round(renderer.load_seconds, 2),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", help="preset(s) to measure (default: tiny-flux, tiny-sdxl)")
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="override the preset's default steps")
    parser.add_argument("--size", type=int, default=None, help="square size (default: the preset's)")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
        },
        "results": [
            bench_preset(p, batch_sizes, args.repeats, args.steps, args.size)
            for p in (args.preset or ["tiny-flux", "tiny-sdxl"])
        ],
    }
    table = Table(title="render throughput")
    for column in ("preset", "device", "size", "steps", "batch", "median s/call", "images/s", "s/image"):
        table.add_column(column, justify="right")
    for result in report["results"]:
        for row in result["rows"]:
            table.add_row(
                result["preset"],
                f"{result['device']} {result['dtype']}",
                row["size"],
                str(row["steps"]),
                str(row["batch_size"]),
                f"{row['median_s']:.3f}",
                f"{row['images_per_s']:.2f}",
                f"{row['s_per_image']:.3f}",
            )
    Console(width=140).print(table)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
