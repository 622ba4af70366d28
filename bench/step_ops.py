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
    python bench/step_ops.py --device cuda --full-size --profiles fast --steps 3 # where PuLID's time goes (GPU)

Prints a table and one JSON line per row (``aten_ops_per_step``, ``over_plain``, ``launches_per_step``,
``graph_replays_per_step``, ``copies_per_step``: a CUDA-graph replay copies every input whose address is not static;
``wall_ms_per_step`` un-profiled, ``cuda_graphs_recorded_in_call`` (a graph recorded again each call: a static input
at a new address), ``device_ms_per_step``: the kernels' time, and ``top_host_ops_ms_per_step``: the
operators the host spent longest in). Where a step's wall time exceeds its device time, the device waited for the
host, and the top host operators say on what.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check as check  # noqa: E402

from imagegen.pipelines.presets import get_preset  # noqa: E402
from imagegen.pipelines.profiles import apply_profile, cuda_graphs_recorded  # noqa: E402
from imagegen.pipelines.types import RenderRequest  # noqa: E402

#: CUDA runtime / driver calls that launch work (eager kernels, Triton's, a captured graph's replay)
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


GRAPH_REPLAY = "cudaGraphLaunch"
#: calls that copy memory: a graph replay copies each input whose address is not static into its placeholder
COPIES = ("aten::copy_", "aten::_foreach_copy_", "cudaMemcpyAsync", "cuMemcpyAsync")
#: the host operators reported per row, by their own (self) CPU time
TOP_HOST_OPS = 8


def count_step(pipe, family: str, request: RenderRequest, embeds: dict, identity, device) -> dict[str, Any]:
    """Per step of one call (after two calls that warm everything up): aten operators, kernel launches, graph
    replays and copies; the call's wall time un-profiled, the device's kernel time, and the operators that took
    the host longest (where a step's time goes when the device waits for the host)."""
    for _ in range(2):
        check.render(pipe, family, request, embeds, 1, identity, device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    recorded = cuda_graphs_recorded(device)
    started = time.perf_counter()
    check.render(pipe, family, request, embeds, 1, identity, device)
    synchronize()
    wall = time.perf_counter() - started
    recorded = None if recorded is None else cuda_graphs_recorded(device) - recorded
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        check.render(pipe, family, request, embeds, 1, identity, device)
    events = prof.key_averages()
    steps = request.steps

    def per_step(value: float) -> float:
        return round(value / steps, 1)

    aten = sum(e.count for e in events if e.key.startswith("aten::"))
    launches = sum(e.count for e in events if e.key in LAUNCHES)
    device_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events)
    hosts = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP_HOST_OPS]
    cuda = device.type == "cuda"
    return {
        "aten_ops_per_step": per_step(aten),
        "launches_per_step": per_step(launches) if cuda else None,
        "graph_replays_per_step": per_step(sum(e.count for e in events if e.key == GRAPH_REPLAY)) if cuda else None,
        "copies_per_step": per_step(sum(e.count for e in events if e.key in COPIES)),
        "wall_ms_per_step": round(wall * 1000 / steps, 2),
        # CUDA graphs recorded by that (third) call: 0 when every graph input a block reads as static kept its address
        "cuda_graphs_recorded_in_call": recorded,
        "device_ms_per_step": round(device_us / 1000 / steps, 2) if cuda else None,
        "top_host_ops_ms_per_step": {e.key: round(e.self_cpu_time_total / 1000 / steps, 2) for e in hosts},
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
    header = ["family", "profile", "method", "aten ops/step", "over plain", "launches/step", "graph replays/step"]
    header += ["copies/step", "wall ms/step", "CUDA graphs recorded in a call", "device ms/step"]
    header += ["host's top operator (ms/step)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * 3 + "---:|" * 8 + "---|")
    for row in rows:
        cells = [row["family"], row["profile"], row["method"], f"{row['aten_ops_per_step']:.0f}"]
        cells.append(f"{row['over_plain']:+.0f}")
        for key in ("launches_per_step", "graph_replays_per_step", "copies_per_step"):
            cells.append("-" if row[key] is None else f"{row[key]:.0f}")
        cells.append(f"{row['wall_ms_per_step']:.1f}")
        cells.append("-" if row["cuda_graphs_recorded_in_call"] is None else str(row["cuda_graphs_recorded_in_call"]))
        cells.append("-" if row["device_ms_per_step"] is None else f"{row['device_ms_per_step']:.1f}")
        top = next(iter(row["top_host_ops_ms_per_step"].items()), ("-", 0.0))
        cells.append(f"{top[0][:48]} ({top[1]:.2f})")
        print("| " + " | ".join(cells) + " |")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
