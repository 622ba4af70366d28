"""Operators per denoising step, plain and with each identity method: the host-cost figure of an eager step.

SDXL at 1024² on a fast GPU is bound by the host (docs/benchmarks.md, "Full size on a GPU"): every aten operator an
eager step runs is dispatched by Python and the CPU, and on CUDA almost each one is a kernel launch. The identity
methods' overhead there grew with how many operators they add per layer, not with their arithmetic. This counts them
without a GPU, on the same pipelines and identity code ``bench/gpu_check.py`` times (imagegen's ``apply_profile``,
``attach_*``, ``pipelines.{flux,sdxl}.call``), with ``torch.profiler``: aten operators per step (all of them,
views included) and, on CUDA, kernel launches per step.

    python bench/step_ops.py                                  # tiny SDXL on the CPU, eager: plain, PuLID, IP FaceID
    python bench/step_ops.py --families sdxl flux --profiles quality fast
    python bench/step_ops.py --proxy --families sdxl          # real widths, few blocks, 128 px (CPU)
    python bench/step_ops.py --device cuda --full-size --profiles quality fast fast:graphs   # launches (GPU)

Prints a table and one JSON line per row (``aten_ops_per_step``, ``over_plain``, ``launches_per_step``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check as check  # noqa: E402

from imagegen.pipelines.presets import get_preset  # noqa: E402
from imagegen.pipelines.profiles import apply_profile  # noqa: E402
from imagegen.pipelines.types import RenderRequest  # noqa: E402

#: CUDA runtime / driver calls that launch work (eager kernels, Triton's, a captured graph's replay)
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


def count_step(pipe, family: str, request: RenderRequest, embeds: dict, identity, device) -> dict[str, float]:
    """Aten operators and kernel launches per step of one call (after two calls that warm everything up)."""
    for _ in range(2):
        check.render(pipe, family, request, embeds, 1, identity, device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        check.render(pipe, family, request, embeds, 1, identity, device)
    events = prof.key_averages()
    aten = sum(e.count for e in events if e.key.startswith("aten::"))
    launches = sum(e.count for e in events if e.key in LAUNCHES)
    return {
        "aten_ops_per_step": round(aten / request.steps, 1),
        "launches_per_step": round(launches / request.steps, 1) if device.type == "cuda" else None,
    }


def rows_for(family: str, profile_name: str, opts: argparse.Namespace) -> list[dict]:
    device = torch.device(opts.device)
    tiny = not (opts.full_size or opts.proxy)
    preset = get_preset(check.PRESETS[(family, tiny)])
    dtype = getattr(torch, preset.dtype) if device.type == "cuda" else torch.float32
    profile = check.resolve_profile(preset, profile_name, keep_step_cache=False)
    pipe = check.build_pipeline(family, check.model_configs(family, tiny, opts.proxy), device, dtype)
    apply_profile(pipe, profile, family, device)
    embeds = check.prompt_embeds(pipe, family, 1, preset.max_sequence_length)
    size = opts.size or (64 if tiny else 128 if opts.proxy else preset.defaults.width)
    request = RenderRequest(
        prompt="step ops", width=size, height=size, steps=opts.steps, guidance=preset.defaults.guidance
    )
    scratch = Path(tempfile.mkdtemp(prefix="step_ops-"))
    rows = []
    try:
        for name in ["plain", *check.DEFAULT_METHODS[family]]:
            identity = (
                check.Identity("plain", check.plain_conditioning, lambda: None)
                if name == "plain"
                else check.attach_method(name, pipe, tiny, device, dtype, scratch)
            )
            try:
                counts = count_step(pipe, family, request, embeds, identity, device)
            finally:
                identity.detach()
            rows.append({"family": family, "preset": preset.name, "profile": profile_name, "method": name, **counts})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    plain = rows[0]
    for row in rows:
        row["over_plain"] = round(row["aten_ops_per_step"] - plain["aten_ops_per_step"], 1)
        if row["launches_per_step"] is not None:
            row["launches_over_plain"] = round(row["launches_per_step"] - plain["launches_per_step"], 1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="*", default=["sdxl"], choices=["flux", "sdxl"])
    parser.add_argument(
        "--profiles",
        nargs="*",
        default=["quality"],
        help="profiles (<name>:graphs / <name>:cpp: bench/gpu_check.py's variants)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-size", action="store_true", help="full-size random-weight models (a GPU's work)")
    parser.add_argument("--proxy", action="store_true", help="the full-width CPU proxy: real widths, few blocks")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=None, help="square size (default: 64 tiny, the preset's full)")
    opts = parser.parse_args()
    rows = [row for family in opts.families for profile in opts.profiles for row in rows_for(family, profile, opts)]
    header = ["family", "profile", "method", "aten ops/step", "over plain", "launches/step"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * 3 + "---:|" * 3)
    for row in rows:
        launches = "-" if row["launches_per_step"] is None else f"{row['launches_per_step']:.0f}"
        cells = [row["family"], row["profile"], row["method"], f"{row['aten_ops_per_step']:.0f}"]
        print("| " + " | ".join([*cells, f"{row['over_plain']:+.0f}", launches]) + " |")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
