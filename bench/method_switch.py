"""What a renderer pays to switch identity methods on SDXL's UNet at full size: building a method's layers against
putting back the ones its first attach built.

A replica serving PuLID and IP-Adapter characters attaches one method at a time and switches between batches. Each
switch used to detach the old method for good and attach the new one from scratch (for IP-Adapter: the adapter
file read again and diffusers' ``load_ip_adapter`` building its processors and projection); now a handle keeps its
layers when detached and ``reattach`` installs the very same objects (``imagegen.identity.reattach``). This bench
builds the released SDXL UNet with random weights (bench/gpu_check.py's builders: the parity fixture's configs),
writes each IP-Adapter method's random weights in the released layout, and times per method:

- ``attach_s``: the first attach, what every switch to the method cost before (IP-Adapter: file read + diffusers'
  build + the LoRA split off; PuLID: its 70 processors from the weights the conditioner holds);
- ``detach_ms`` and ``reattach_ms``: taking the layers off and putting the same ones back, what a switch costs now
  (medians of ``--repeats``).

    .venv/bin/python bench/method_switch.py                  # full size on this machine's CPU, fp16
    .venv/bin/python bench/method_switch.py --tiny --dtype float32
    python bench/method_switch.py --device cuda              # on a GPU (weights created there)

Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check as check  # noqa: E402

IP_METHODS = ("ipadapter-faceid-plusv2-sdxl", "ipadapter-plus-face-sdxl")


def timed(fn, device: torch.device):
    check.sync(device)
    started = time.perf_counter()
    out = fn()
    check.sync(device)
    return out, time.perf_counter() - started


def switch_rows(handle, device: torch.device, repeats: int) -> dict[str, float]:
    """Median ms of ``detach`` and of ``reattach`` over ``repeats`` switches away and back."""
    detaches, reattaches = [], []
    for _ in range(repeats):
        _, seconds = timed(handle.detach, device)
        detaches.append(seconds)
        back, seconds = timed(handle.reattach, device)
        if not back:
            raise SystemExit("reattach refused: the UNet's processors changed under the handle")
        reattaches.append(seconds)
    return {
        "detach_ms": round(statistics.median(detaches) * 1e3, 2),
        "reattach_ms": round(statistics.median(reattaches) * 1e3, 2),
    }


def bench(opts: argparse.Namespace) -> list[dict]:
    from imagegen.identity.ipadapter.adapter import attach_ip_adapter
    from imagegen.identity.pulid.sdxl_processor import PREFIX, attach_pulid_sdxl, cross_attention_layers

    device, dtype = torch.device(opts.device), getattr(torch, opts.dtype)
    configs = check.model_configs("sdxl", opts.tiny)
    pipe, built = timed(lambda: check.build_pipeline("sdxl", configs, device, dtype), device)
    print(f"SDXL UNet built in {built:.1f} s", flush=True)
    unet = pipe.unet
    rows = []
    with tempfile.TemporaryDirectory(prefix="imagegen-switch-") as scratch:
        for name in IP_METHODS:
            method_cls, files, params = check.random_adapter_file(name, unet, opts.tiny, Path(scratch), device, dtype)
            size = files.weight_file.stat().st_size
            handle, seconds = timed(lambda: attach_ip_adapter(pipe, "sdxl", check.load_spec(method_cls, files)), device)  # noqa: B023
            rows.append(
                {"method": name, "params": params, "file_mb": round(size / 2**20), "attach_s": round(seconds, 3)}
                | switch_rows(handle, device, opts.repeats)
            )
            handle.detach()
            print(rows[-1], flush=True)
    weights = {}
    for index, _, attn in cross_attention_layers(unet):
        for kind in ("k", "v"):
            shape = (attn.to_k.out_features, attn.to_k.in_features)
            weights[f"{PREFIX}{index}.id_to_{kind}.weight"] = 0.02 * check.randn(shape, device, dtype, seed=32 + index)
    handle, seconds = timed(lambda: attach_pulid_sdxl(unet, weights), device)
    rows.append(
        {
            "method": "pulid-sdxl-v1.1",
            "params": sum(w.numel() for w in weights.values()),
            "file_mb": None,
            "attach_s": round(seconds, 3),
        }
        | switch_rows(handle, device, opts.repeats)
    )
    handle.detach()
    print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--tiny", action="store_true", help="imagegen's tiny SDXL instead of the released size")
    parser.add_argument("--repeats", type=int, default=5, help="switches away and back per method")
    opts = parser.parse_args()
    rows = bench(opts)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"switching identity methods on SDXL ({'tiny' if opts.tiny else 'full size'}, {opts.device})")
    for column in ("method", "params", "file MB", "attach s (a switch before)", "detach ms", "reattach ms (now)"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in rows:
        table.add_row(
            r["method"],
            f"{r['params'] / 1e6:.1f} M",
            "-" if r["file_mb"] is None else str(r["file_mb"]),
            f"{r['attach_s']:.3f}",
            f"{r['detach_ms']:.2f}",
            f"{r['reattach_ms']:.2f}",
        )
    Console().print(table)
    print(json.dumps({"device": opts.device, "dtype": opts.dtype, "tiny": opts.tiny, "rows": rows}))


if __name__ == "__main__":
    main()
