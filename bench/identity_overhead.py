"""What identity conditioning costs per render, and what caching it saves.

    python bench/identity_overhead.py                     # tiny-flux and tiny-sdxl on this machine
    python bench/identity_overhead.py --preset flux-dev   # full size (GPU; weights must be reachable)

Rows per preset and method, each the median of ``--repeats`` single-image renders after a warm-up:
- ``no identity``: the plain pipeline;
- ``cached <method>``: identity tensors from the renderer's cache (what imagegen does);
- ``recompute <method>``: the id embedding recomputed for every request from the reference images
  (face detection, alignment, parsing, encoders: what the reference implementations do).
Methods default to every method of the preset (configs/models.yaml): PuLID and the IP-Adapter family
(``ipadapter-faceid-plusv2-sdxl``, ``ipadapter-plus-face-sdxl`` on SDXL, ``ipadapter-flux`` on FLUX).
A throw-away registry holds one character made from the bundled public-domain photos.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from imagegen import samples
from imagegen.identity.characters import approve_character, register_character
from imagegen.identity.provider import identity_renderer
from imagegen.identity.registry import Registry
from imagegen.pipelines.conditioning import IdentitySample
from imagegen.pipelines.types import RenderRequest
from imagegen.settings import Settings, get_settings

CHARACTER = "bench-character"


def reference_files() -> list[tuple[str, bytes]]:
    base = samples.astronaut()
    images = [base] + [samples.augment(base, k, seed=i) for i, k in enumerate(("flip", "brightness", "jpeg"))]
    files = []
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files.append((f"ref{i}.png", buffer.getvalue()))
    return files


def timed(fn, repeats: int, cuda: bool) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_preset(name: str, registry: Registry, repeats: int, methods: list[str] | None) -> list[dict]:
    renderer = identity_renderer(name, registry)
    cuda = renderer.device.type == "cuda"
    request = RenderRequest(prompt="a portrait at a cafe", seed=1)
    rows = [
        {"preset": name, "mode": "no identity", "median_s": timed(lambda: renderer.render([request]), repeats, cuda)}
    ]
    for method_name in methods or renderer.preset.methods:
        method = renderer.identity_method(method_name)
        with_id = request.model_copy(update={"character": CHARACTER, "method": method_name})
        rows.append(
            {
                "preset": name,
                "mode": f"cached {method_name}",
                "median_s": timed(lambda: renderer.render([with_id]), repeats, cuda),  # noqa: B023
            }
        )
        character = registry.characters.get(CHARACTER)
        references = renderer.identity.conditioning_cache.usable_references(character)

        def recompute_and_render():
            tensors = method.compute(references)  # noqa: B023
            prepared = renderer.prepare(with_id)  # noqa: B023
            sample = IdentitySample(tensors=tensors, weight=1.0)
            with renderer._lock, torch.inference_mode():
                embeds = renderer._encode(prepared)
                generator = [torch.Generator("cpu").manual_seed(prepared.seed)]
                cfg = renderer.preset.family == "sdxl" and (prepared.guidance or 0) > 1
                with method.conditioning(renderer.pipe, [sample], cfg=cfg) as identity:  # noqa: B023
                    renderer.family.call(
                        renderer.pipe, embeds, prepared, generator, identity.on_step_end, **identity.kwargs
                    )

        rows.append(
            {
                "preset": name,
                "mode": f"recompute {method_name}",
                "median_s": timed(recompute_and_render, repeats, cuda),
            }
        )
    base = rows[0]["median_s"]
    for row in rows:
        row["median_s"] = round(row["median_s"], 4)
        row["vs_plain"] = round(row["median_s"] / base, 2)
        row["device"] = f"{renderer.device} {str(renderer.dtype).replace('torch.', '')}"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", help="preset(s) (default: tiny-flux, tiny-sdxl)")
    parser.add_argument("--method", action="append", help="method(s) (default: every method of the preset)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="imagegen-bench-"))
    settings = Settings(home=home, model_cache_dir=get_settings().model_cache)
    rows = []
    with Registry.open(settings) as registry:
        register_character(
            registry,
            character_id=CHARACTER,
            name="bench",
            provenance={"kind": "licensed", "creator": "NASA (public domain)", "evidence": "skimage astronaut"},
            files=reference_files(),
        )
        approve_character(registry, CHARACTER)
        for preset in args.preset or ["tiny-flux", "tiny-sdxl"]:
            rows.extend(bench_preset(preset, registry, args.repeats, args.method))
    table = Table(title="identity overhead (one image per render)")
    for column in ("preset", "device", "mode", "median s", "x plain"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["preset"], row["device"], row["mode"], f"{row['median_s']:.3f}", f"{row['vs_plain']:.2f}")
    Console(width=140).print(table)
    print(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
