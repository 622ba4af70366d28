"""What identity conditioning costs per image, per optimisation profile and batch size, and what caching it saves.

    python bench/identity_overhead.py                                    # tiny-flux and tiny-sdxl, eager
    python bench/identity_overhead.py --profile quality,fast,fastest:no-step-cache --batch 1,4
    python bench/identity_overhead.py --preset flux-dev --profile fast   # full size (GPU; weights must be reachable)

Rows per preset x profile x identity method x batch size (``--batch``), each the first call of that shape timed on
its own (compile warm-up under a compiling profile) and the median of ``--repeats`` calls after it:

- ``none``: the plain pipeline;
- ``<method>``: every request of the batch renders one character, its identity tensors from the renderer's cache
  (what imagegen does);
- ``<method>`` with ``mix`` > 1: the batch mixes ``--mixed`` characters (per-sample identity tensors); compare with
  the single-character row of the same batch size;
- ``methods in turn`` (presets with several methods): every call renders with the next method, so the renderer
  switches methods before each; ``x_one_method`` and ``switch_ms`` compare it with the mean of the same methods'
  single-character rows (a switch puts back the layers the method's first attach built: imagegen.identity.reattach);
- ``recompute <method>`` (batch 1, first profile only; ``--no-recompute`` skips it): the id embedding recomputed for
  every request from the reference images (face detection, alignment, parsing, encoders: what the reference
  implementations do).

s/image, its ratio to the eager (``quality``) plain render (``x eager plain``) and to the plain render of the same
profile (``x plain``: the identity overhead under that profile), at the same batch size; see
bench/profile_bench.py. A combination the renderer refuses (a step cache an identity method does not honour) is a
row saying so. Methods default to every method of the preset (configs/models.yaml). A throw-away registry holds
``--mixed`` characters made from the bundled public-domain photos (augmented variants when there are more
characters than photos).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
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

from imagegen import samples  # noqa: E402
from imagegen.errors import ImagegenError  # noqa: E402
from imagegen.identity.characters import approve_character, register_character  # noqa: E402
from imagegen.identity.provider import RegistryIdentity  # noqa: E402
from imagegen.identity.registry import Registry  # noqa: E402
from imagegen.pipelines.conditioning import IdentitySample  # noqa: E402
from imagegen.pipelines.presets import get_preset  # noqa: E402
from imagegen.pipelines.renderer import Renderer  # noqa: E402
from imagegen.pipelines.types import RenderRequest  # noqa: E402
from imagegen.settings import Settings, get_settings  # noqa: E402

CHARACTER = "bench-character"


def reference_files(photo: str = "astronaut", variant: int = 0) -> list[tuple[str, bytes]]:
    """Reference PNGs of a bundled photo and same-person augmentations; ``variant`` draws other augmentations (other
    references, so other identity tensors: another character for timing purposes)."""
    base, box = samples.PHOTOS[photo][0](), samples.PHOTOS[photo][1]
    kinds = ("flip", "brightness", "jpeg") if variant == 0 else ("crop", "brightness", "jpeg")
    images = [base] + [samples.augment(base, k, seed=10 * variant + i, face_box=box) for i, k in enumerate(kinds)]
    files = []
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files.append((f"ref{i}.png", buffer.getvalue()))
    return files


def register_characters(registry: Registry, count: int) -> list[str]:
    """``count`` approved characters (the first is ``CHARACTER``), cycling through the bundled photos."""
    photos = list(samples.PHOTOS)
    ids = []
    for i in range(count):
        character = CHARACTER if i == 0 else f"{CHARACTER}-{i}"
        photo = photos[i % len(photos)]
        register_character(
            registry,
            character_id=character,
            name=f"bench {i}",
            provenance=samples.provenance(photo),
            files=reference_files(photo, variant=i // len(photos)),
        )
        approve_character(registry, character)
        ids.append(character)
    return ids


def recompute_row(renderer: Renderer, registry: Registry, method_name: str, repeats: int) -> float:
    """Median seconds of one image whose identity is recomputed from the references (no cache)."""
    method = renderer.identity_method(method_name)
    request = RenderRequest(prompt="a portrait at a cafe", seed=1, character=CHARACTER, method=method_name)
    references = renderer.identity.conditioning_cache.usable_references(registry.characters.get(CHARACTER))

    def recompute_and_render():
        tensors = method.compute(references)
        prepared = renderer.prepare(request)
        sample = IdentitySample(tensors=tensors, weight=1.0)
        with renderer._lock, torch.inference_mode():
            embeds = renderer._encode(prepared)
            generator = [torch.Generator("cpu").manual_seed(prepared.seed)]
            cfg = renderer.preset.family == "sdxl" and (prepared.guidance or 0) > 1
            with method.conditioning(renderer.pipe, [sample], cfg=cfg) as identity:
                renderer.family.call(
                    renderer.pipe, embeds, prepared, generator, identity.on_step_end, **identity.kwargs
                )

    recompute_and_render()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        recompute_and_render()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


#: the ``method`` of the rows whose calls take the preset's methods in turn (a switch before every call)
IN_TURN = "methods in turn"


def bench_profile(
    name: str,
    choice,
    registry: Registry,
    settings: Settings,
    characters: list[str],
    opts: argparse.Namespace,
    recompute: bool,
) -> list[dict]:
    preset = get_preset(name)
    base = {"preset": name, "profile": choice.label}
    methods = [m for m in opts.method if m in preset.methods] if opts.method else preset.methods
    try:
        renderer = Renderer(
            preset, settings=settings, identity=RegistryIdentity(registry, settings), profile=choice.resolve(preset)
        )
    except ImagegenError as exc:
        return [{**base, "method": "none", "batch": b, "mix": 1, "note": f"refused: {exc}"} for b in opts.batch]
    device = renderer.device
    rows = []

    def requests(batch: int, method: str | None, mix: int) -> list[RenderRequest]:
        return [
            RenderRequest(
                prompt=f"a portrait of someone at a cafe, take {i}",
                seed=i,
                steps=opts.steps,
                width=opts.size,
                height=opts.size,
                character=None if method is None else characters[i % mix],
                method=method,
            )
            for i in range(batch)
        ]

    shapes: list[tuple[str | tuple[str, ...] | None, int, int]] = [(None, b, 1) for b in opts.batch]
    for method in methods:
        shapes += [(method, b, 1) for b in opts.batch]
        shapes += [(method, b, min(opts.mixed, b)) for b in opts.batch if min(opts.mixed, b) > 1]
    if len(methods) > 1:
        # each call with the next method: what a replica serving several methods pays to switch between batches
        shapes += [(tuple(methods), b, 1) for b in opts.batch]
    for method, batch, mix in shapes:
        in_turn = isinstance(method, tuple)
        row = {**base, "method": IN_TURN if in_turn else method or "none", "batch": batch, "mix": mix}
        if in_turn:
            row["methods"] = list(method)
        turns = [requests(batch, m, mix) for m in (method if in_turn else [method])]
        calls = itertools.count()
        batch_requests = turns[0]
        try:
            timing = time_calls(
                lambda: renderer.render(turns[next(calls) % len(turns)], strict=True),  # noqa: B023
                opts.repeats,
                device,
            )
        except ImagegenError as exc:
            rows.append({**row, "note": f"refused: {exc}"})
            print(f"  {name} {choice.label} {row['method']} batch {batch}: refused: {exc}", flush=True)
            continue
        except Exception as exc:  # noqa: BLE001 - a crash mid-render (e.g. a compile limit) is a result too
            note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            rows.append({**row, "note": note})
            print(f"  {name} {choice.label} {row['method']} batch {batch} mix {mix}: {note}", flush=True)
            continue
        prepared = renderer.prepare(batch_requests[0])
        rows.append(
            {
                **row,
                **timing_fields(timing, batch, opts.stat),
                "steps": prepared.steps,
                "size": f"{prepared.width}x{prepared.height}",
                "device": f"{device} {str(renderer.dtype).replace('torch.', '')}",
                "applied": renderer.applied_profile.summary(),
                "note": f"{mix} characters" if mix > 1 else ", ".join(method) if in_turn else "",
            }
        )
        shown = f"{rows[-1]['s_per_image']:.4f} s/image (first call {timing.first_s:.2f} s)"
        print(f"  {name} {choice.label} {row['method']} batch {batch} mix {mix}: {shown}", flush=True)
    if recompute:
        for method in methods:
            try:
                median = recompute_row(renderer, registry, method, opts.repeats)
            except ImagegenError as exc:
                rows.append({**base, "method": f"recompute {method}", "batch": 1, "mix": 1, "note": str(exc)})
                continue
            rows.append(
                {
                    **base,
                    "method": f"recompute {method}",
                    "batch": 1,
                    "mix": 1,
                    "median_s": round(median, 4),
                    "s_per_image": round(median, 4),
                    "note": "id embedding recomputed per request",
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", help="preset(s) (default: tiny-flux, tiny-sdxl)")
    parser.add_argument("--method", action="append", help="method(s) (default: every method of the preset)")
    parser.add_argument(
        "--profile",
        action="append",
        help="optimisation profile(s), repeatable or comma-separated; <name>:no-step-cache drops its step cache "
        "(default: quality)",
    )
    parser.add_argument("--batch", default="1,4", help="batch sizes (comma-separated; default 1,4)")
    parser.add_argument("--mixed", type=int, default=4, help="characters in the mixed batches (1: none)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--stat", choices=("median", "best"), default="median", help="s/image from the median or the best call"
    )
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    parser.add_argument("--size", type=int, default=None, help="square size (default: the preset's)")
    parser.add_argument("--no-recompute", action="store_true", help="skip the recompute rows")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON document here")
    opts = parser.parse_args()
    opts.batch = [int(b) for b in opts.batch.split(",")]
    choices = parse_profiles(opts.profile)
    home = Path(tempfile.mkdtemp(prefix="imagegen-bench-"))
    # a throw-away registry of public-domain sample photos; no age estimator is installed offline (development setting)
    settings = Settings(home=home, model_cache_dir=get_settings().model_cache, allow_unverified_age=True)
    rows = []
    with Registry.open(settings) as registry:
        characters = register_characters(registry, max(1, opts.mixed))
        for preset in opts.preset or ["tiny-flux", "tiny-sdxl"]:
            for i, choice in enumerate(choices):
                recompute = i == 0 and not opts.no_recompute
                rows += bench_profile(preset, choice, registry, settings, characters, opts, recompute)
                reset_compiled()  # the renderer is gone: its compiled code too (the next profile starts cold)
    add_ratios(rows, keys=("preset",))
    single = {
        (r["preset"], r["profile"], r["method"], r["batch"]): r["s_per_image"]
        for r in rows
        if r.get("s_per_image") and r.get("mix") == 1
    }
    for row in rows:  # a mixed batch against the single-character batch of the same method, profile and size
        one = single.get((row["preset"], row["profile"], row["method"], row["batch"]))
        if row.get("mix", 1) > 1 and row.get("s_per_image") and one:
            row["x_single_character"] = round(row["s_per_image"] / one, 3)
        if row["method"] == IN_TURN and row.get("s_per_image"):
            # against the same methods' batches each after one of its own (their mean)
            ones = [single.get((row["preset"], row["profile"], m, row["batch"])) for m in row["methods"]]
            if all(ones):
                row["x_one_method"] = round(row["s_per_image"] / statistics.fmean(ones), 3)
                row["switch_ms"] = round((row["s_per_image"] - statistics.fmean(ones)) * row["batch"] * 1e3, 1)
                row["note"] += f"; {row['x_one_method']}x one method, {row['switch_ms']} ms a switch"
    report = {
        "command": "python bench/identity_overhead.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
        },
        "rows": rows,
    }
    print_table("identity overhead per profile and batch size", rows, extra=("mix",))
    print(markdown_table(rows, extra=("mix",)))
    text = json.dumps(report, indent=2)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
