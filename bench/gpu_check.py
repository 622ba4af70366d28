"""GPU check: the identity and pipeline tests on CUDA, and full-size timings with and without every identity method.

On a machine with one CUDA GPU (no downloads, no network; at most about 7.5 minutes: --budget-s 420 and a row only
starts when it fits):

    python bench/gpu_check.py --out out/gpu_check.json     # + out/gpu_check.md (for docs/benchmarks.md) + a table
    python bench/gpu_check.py --families flux --skip-tests  # only the FLUX timings

Without a GPU, to check the script itself end to end (tiny models on the CPU, a few minutes):

    python bench/gpu_check.py --dry-run                     # = --device cpu --tiny --steps 2, one test file

What it does, each part under its own time budget (a row that does not fit is reported as skipped, with why; the
JSON and Markdown are rewritten after every part, so a run cut short still leaves what it measured):

1. **timings** (``--families flux sdxl``). The FLUX.1-dev transformer + VAE (bf16, the ``flux-dev`` preset) and the
   SDXL base UNet + VAE (fp16, ``sdxl-base``), full size, with **random weights made on the GPU** (configs:
   ``tests/fixtures/ipadapter/full_size_configs.json``), at the presets' defaults (1024 x 1024; FLUX 28 steps,
   guidance 3.5; SDXL 30 steps with CFG 5), through diffusers' pipelines and imagegen's own
   ``pipelines.{flux,sdxl}.call``. The text encoders are skipped: random prompt embeddings of the right shapes go in
   as ``prompt_embeds`` (what the renderer does with its cached ones). Rows: plain, then every identity method of
   the preset, attached by imagegen's code with random full-size weights:

   - ``pulid-flux-v0.9.1``: IDFormer + 20 ``PerceiverAttentionCA`` (PuLID-FLUX v0.9.1's sizes), ``attach_pulid_flux``,
     a ``PulidFluxState`` per call;
   - ``pulid-sdxl-v1.1``: IDFormer (output 2048) + ``id_to_k``/``id_to_v`` on the 70 cross-attentions,
     ``attach_pulid_sdxl``, a ``PulidSDXLState`` (CFG negatives, ``num_zero`` 20, ortho v2);
   - ``ipadapter-*``: a random file in the released key layout (``bench/make_ipadapter_manifests.py``) written to a
     scratch folder, loaded by the method's load spec and ``attach_ip_adapter`` (diffusers' ``load_ip_adapter``),
     armed per call with an ``IPAdapterState`` and per-sample embeddings shaped as the methods pass them.

   The identity tensors are random too: they are cached per character, so no face model runs in a render. Every
   row is one warm-up call (1 step) and one timed call (all steps + VAE decode), at batch 1 and 4: total seconds,
   seconds per denoising step, decode seconds, the ratio to plain at the same batch size measured in the same run,
   and peak GPU memory (``torch.cuda.max_memory_allocated``, weights included).
2. **tests**: ``pytest tests/identity_pulid tests/identity_ipadapter tests/pipelines`` with ``IMAGEGEN_DEVICE=cuda``
   (the tiny presets then run on the GPU in their presets' dtypes): pass / fail / skip / error counts and the ids of
   the failures. Run after the timings, in what is left of the budget (at most ``--tests-budget-s``).
3. **output**: JSON (``--out``), a table on stdout and a Markdown section (``--markdown``) ready to paste.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

CONFIGS = ROOT / "tests" / "fixtures" / "ipadapter" / "full_size_configs.json"
TEST_PATHS = ["tests/identity_pulid", "tests/identity_ipadapter", "tests/pipelines"]
DRY_RUN_TESTS = ["tests/identity_ipadapter/test_fullsize.py"]
PRESETS = {
    ("flux", False): "flux-dev",
    ("sdxl", False): "sdxl-base",
    ("flux", True): "tiny-flux",
    ("sdxl", True): "tiny-sdxl",
}
GIB = 1024**3


# time and devices -------------------------------------------------------------------------------------------------


class Clock:
    """The run's deadline and the current part's."""

    def __init__(self, total_s: float):
        self.start = time.perf_counter()
        self.deadline = self.start + total_s
        self.part_deadline = self.deadline

    def begin(self, budget_s: float) -> None:
        self.part_deadline = min(self.deadline, time.perf_counter() + budget_s)

    def left(self) -> float:
        return self.part_deadline - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def materialize(module: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A module built on the meta device, given storage on ``device`` in ``dtype`` and random weights drawn there.

    Weights ~ N(0, 0.02), 1-D weights (norm scales) 1, biases 0: numbers that keep activations finite; the values
    do not matter for timing, the shapes do.
    """
    # nn.Module.to: diffusers' ModelMixin.to warns about float32 modules when it casts, which is beside the point here
    module = nn.Module.to(module, dtype=dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return module.eval().requires_grad_(False)


def randn(shape, device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def allocated_gib(device: torch.device) -> float | None:
    return round(torch.cuda.memory_allocated(device) / GIB, 2) if device.type == "cuda" else None


# models -------------------------------------------------------------------------------------------------------


def model_configs(family: str, tiny: bool) -> dict:
    """``{"model", "vae", "scheduler"}`` configs: full size from the fixture, tiny from imagegen's tiny builders."""
    if not tiny:
        configs = json.loads(CONFIGS.read_text())
        model = "flux_transformer" if family == "flux" else "sdxl_unet"
        return {
            "model": configs[model],
            "vae": configs[f"{family}_vae"],
            "scheduler": configs[f"{family}_scheduler"],
        }
    from imagegen.pipelines.tiny import build_flux_pipeline, build_sdxl_pipeline

    pipe = build_flux_pipeline() if family == "flux" else build_sdxl_pipeline()
    model = pipe.transformer if family == "flux" else pipe.unet
    return {"model": dict(model.config), "vae": dict(pipe.vae.config), "scheduler": dict(pipe.scheduler.config)}


def build_pipeline(family: str, configs: dict, device: torch.device, dtype: torch.dtype):
    """The diffusers pipeline of ``family`` with random-weight model + VAE on ``device`` and no text encoders."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    model_cls = FluxTransformer2DModel if family == "flux" else UNet2DConditionModel
    with torch.device("meta"):
        model = model_cls.from_config(configs["model"])
        vae = AutoencoderKL.from_config(configs["vae"])
    model = materialize(model, device, dtype, seed=1)
    vae = materialize(vae, device, dtype, seed=2)
    none = dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    if family == "flux":
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"])
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, transformer=model, **none)
    else:
        scheduler = EulerDiscreteScheduler.from_config(configs["scheduler"])
        pipe = StableDiffusionXLPipeline(
            vae=vae, unet=model, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False, **none
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeds(pipe, family: str, batch: int, max_sequence_length: int) -> dict[str, torch.Tensor]:
    """Random prompt embeddings in the shapes the text encoders give (SDXL: with the CFG negatives)."""
    model = pipe.transformer if family == "flux" else pipe.unet
    device, dtype, config = model.device, model.dtype, model.config
    if family == "flux":
        return {
            "prompt_embeds": randn((batch, max_sequence_length, config.joint_attention_dim), device, dtype, 11),
            "pooled_prompt_embeds": randn((batch, config.pooled_projection_dim), device, dtype, 12),
        }
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    text = (batch, 77, config.cross_attention_dim)
    return {
        "prompt_embeds": randn(text, device, dtype, 11),
        "pooled_prompt_embeds": randn((batch, pooled), device, dtype, 12),
        "negative_prompt_embeds": randn(text, device, dtype, 13),
        "negative_pooled_prompt_embeds": randn((batch, pooled), device, dtype, 14),
    }


# identity methods, attached with imagegen's code -----------------------------------------------------------------

#: toy sizes for --tiny (a multiple of 64 where diffusers reads heads as width // 64)
TINY_CLIP = {"width": 32, "tokens": 17, "projection": 32, "plus_width": 64, "rank": 4}
FULL_CLIP = {"width": 1280, "tokens": 257, "projection": 768, "plus_width": 1280, "rank": 128}


@dataclass
class Identity:
    """One identity method on one pipeline: ``conditioning(batch)`` gives the call's kwargs and step callback."""

    name: str
    conditioning: Callable[[int], contextlib.AbstractContextManager]
    detach: Callable[[], None]
    info: dict = field(default_factory=dict)


@contextlib.contextmanager
def plain_conditioning(batch: int) -> Iterator[tuple[dict, Callable | None]]:
    yield {}, None


def idformer_config(tiny: bool, output_dim: int):
    from imagegen.identity.pulid.encoder import IDFormerConfig

    if not tiny:
        return IDFormerConfig(output_dim=output_dim)  # the released sizes
    return IDFormerConfig(
        dim=32, depth=5, dim_head=16, heads=2, num_id_token=2, num_queries=8, output_dim=output_dim, ff_mult=2,
        id_dim=544, id_hidden=64, vit_dim=64, vit_hidden=64,
    )  # fmt: skip


def id_tokens(encoder, batch: int, device: torch.device, seed: int) -> torch.Tensor:
    """IDFormer tokens of random inputs (576 + 1 EVA-CLIP tokens per scale at full size): what registration caches."""
    c = encoder.config
    param = next(encoder.parameters())
    x = randn((batch, c.id_dim), device, param.dtype, seed)
    y = [randn((batch, 577 if c.vit_dim == 1024 else 17, c.vit_dim), device, param.dtype, seed + i) for i in range(5)]
    with torch.inference_mode():
        return encoder(x, y)


def attach_pulid_flux_method(pipe, tiny: bool, device, dtype) -> Identity:
    from imagegen.identity.pulid.encoder import IDFormer
    from imagegen.identity.pulid.flux_ca import (
        CrossAttentionConfig,
        PerceiverAttentionCA,
        PulidFluxState,
        attach_pulid_flux,
        num_cross_attentions,
    )

    transformer = pipe.transformer
    config = transformer.config
    encoder_config = idformer_config(tiny, output_dim=48 if tiny else 2048)
    width = config.num_attention_heads * config.attention_head_dim
    ca_config = CrossAttentionConfig(
        dim=width, dim_head=32 if tiny else 128, heads=2 if tiny else 16, kv_dim=encoder_config.output_dim
    )
    count = num_cross_attentions(config.num_layers, config.num_single_layers, 2, 4)
    with torch.device("meta"):
        encoder = IDFormer(encoder_config)
        cas = nn.ModuleList(PerceiverAttentionCA(ca_config) for _ in range(count))
    encoder = materialize(encoder, device, dtype, seed=21)
    cas = materialize(cas, device, dtype, seed=22)
    handle = attach_pulid_flux(transformer, cas, 2, 4)
    tokens = {}

    @contextlib.contextmanager
    def conditioning(batch: int):
        if batch not in tokens:
            tokens[batch] = id_tokens(encoder, batch, device, seed=23)
        state = PulidFluxState(tokens[batch], weight=1.0)
        with handle.use(state):
            yield {}, state.callback

    params = sum(p.numel() for p in cas.parameters())
    return Identity("pulid-flux-v0.9.1", conditioning, handle.detach, {"cross_attentions": count, "params": params})


def attach_pulid_sdxl_method(pipe, tiny: bool, device, dtype) -> Identity:
    from imagegen.identity.pulid.encoder import IDFormer
    from imagegen.identity.pulid.sdxl_processor import PREFIX, PulidSDXLState, attach_pulid_sdxl, cross_attention_layers

    unet = pipe.unet
    cross = unet.config.cross_attention_dim
    with torch.device("meta"):
        encoder = IDFormer(idformer_config(tiny, output_dim=cross))
    encoder = materialize(encoder, device, torch.float32, seed=31)  # the reference runs SDXL's IDFormer in float32
    weights = {}
    for index, _, attn in cross_attention_layers(unet):
        for kind in ("k", "v"):
            shape = (attn.to_k.out_features, attn.to_k.in_features)
            weights[f"{PREFIX}{index}.id_to_{kind}.weight"] = 0.02 * randn(shape, device, dtype, seed=32 + index)
    handle = attach_pulid_sdxl(unet, weights)
    tokens = {}

    @contextlib.contextmanager
    def conditioning(batch: int):
        if batch not in tokens:
            tokens[batch] = (
                id_tokens(encoder, batch, device, 33).to(dtype),
                id_tokens(encoder, batch, device, 34).to(dtype),
            )
        cond, uncond = tokens[batch]
        state = PulidSDXLState(cond, scale=1.0, uncond_id_tokens=uncond)  # num_zero 20, ortho v2: v1.1's defaults
        with handle.use(state):
            yield {}, state.callback

    params = sum(w.numel() for w in weights.values())
    return Identity("pulid-sdxl-v1.1", conditioning, handle.detach, {"layers": len(weights) // 2, "params": params})


def random_adapter_file(name: str, model, tiny: bool, folder: Path, device, dtype):
    """A random IP-Adapter file in the released layout for ``model``, written where the method expects it."""
    import make_ipadapter_manifests as layouts
    from safetensors.torch import save_file

    from imagegen.identity.ipadapter.method import FaceIDPlusV2SDXLMethod, FluxIPAdapterMethod, PlusFaceSDXLMethod
    from imagegen.identity.ipadapter.weights import AdapterFiles

    clip = TINY_CLIP if tiny else FULL_CLIP
    method_cls, keys = {
        "ipadapter-plus-face-sdxl": (
            PlusFaceSDXLMethod,
            lambda: layouts.plus_face_sdxl(model, clip_width=clip["width"], width=clip["plus_width"]),
        ),
        "ipadapter-faceid-plusv2-sdxl": (
            FaceIDPlusV2SDXLMethod,
            lambda: layouts.faceid_plusv2_sdxl(model, clip_width=clip["width"], rank=clip["rank"]),
        ),
        "ipadapter-flux": (FluxIPAdapterMethod, lambda: layouts.xlabs_flux(model, image_embed_dim=clip["projection"])),
    }[name]
    shapes = keys()
    files = AdapterFiles(method_cls.source, folder / method_cls.source.repo, folder / "unused-image-encoder")
    tensors = {}
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        if key.endswith(".bias"):
            value = torch.zeros(shape, device=device, dtype=dtype)
        elif len(shape) == 1:  # norm scales
            value = torch.ones(shape, device=device, dtype=dtype)
        else:
            value = 0.02 * randn(shape, device, dtype, seed=100 + i)
        tensors[key] = value.cpu()
    files.weight_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(files.weight_file))
    return method_cls, files, sum(t.numel() for t in tensors.values())


def load_spec(method_cls, files):
    """The method's own ``LoadSpec`` (FaceID: the file read and its LoRA split off); its ``__init__`` would also load
    the image encoder and the face analyser, which the adapter's loading does not use."""
    method = object.__new__(method_cls)
    method.files = files
    method.handle = None
    return method._load_spec()


def attach_ipadapter_method(name: str, pipe, tiny: bool, device, dtype, folder: Path) -> Identity:
    from imagegen.identity.ipadapter.adapter import IPAdapterState, attach_ip_adapter, describe

    family = "flux" if name == "ipadapter-flux" else "sdxl"
    model = pipe.transformer if family == "flux" else pipe.unet
    method_cls, files, params = random_adapter_file(name, model, tiny, folder, device, dtype)
    handle = attach_ip_adapter(pipe, family, load_spec(method_cls, files))
    clip = TINY_CLIP if tiny else FULL_CLIP

    @contextlib.contextmanager
    def conditioning(batch: int):
        layer_inputs = {}
        if name == "ipadapter-plus-face-sdxl":  # CLIP ViT-H penultimate hidden states, CFG negatives first
            embeds = randn((2, batch, clip["tokens"], clip["width"]), device, dtype, 41)
            kwargs = {"ip_adapter_image_embeds": [embeds]}
        elif name == "ipadapter-faceid-plusv2-sdxl":  # ArcFace embeddings + the CLIP hidden states as a layer input
            kwargs = {"ip_adapter_image_embeds": [randn((2, batch, 512), device, dtype, 42)]}
            hidden = (batch, 1, clip["tokens"], clip["width"])
            layer_inputs = {"clip_embeds": (randn(hidden, device, dtype, 43), randn(hidden, device, dtype, 44))}
        else:  # CLIP ViT-L/14 image embeddings, and the negatives diffusers' FLUX pipeline always takes
            kwargs = {
                "ip_adapter_image_embeds": [randn((1, batch, clip["projection"]), device, dtype, 45)],
                "negative_ip_adapter_image_embeds": [randn((1, batch, clip["projection"]), device, dtype, 46)],
            }
        state = IPAdapterState(1.0, batch, 0, layer_inputs=layer_inputs)
        with handle.armed(state):
            yield kwargs, state.callback

    info = describe(handle)
    return Identity(
        name,
        conditioning,
        handle.detach,
        {"params": params, "wrapped_layers": info["wrapped_layers"], "lora_hooks": info["lora_hooks"]},
    )


def attach_method(name: str, pipe, tiny: bool, device, dtype, folder: Path) -> Identity:
    if name == "pulid-flux-v0.9.1":
        return attach_pulid_flux_method(pipe, tiny, device, dtype)
    if name == "pulid-sdxl-v1.1":
        return attach_pulid_sdxl_method(pipe, tiny, device, dtype)
    if name.startswith("ipadapter-"):
        return attach_ipadapter_method(name, pipe, tiny, device, dtype, folder)
    raise KeyError(f"no GPU check for identity method {name!r}")


# timing ---------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    total_s: float
    denoise_s: float
    peak_gib: float | None


def render(pipe, family: str, request, embeds: dict, batch: int, identity: Identity, device) -> Run:
    """One pipeline call through imagegen's ``pipelines.{family}.call``, timed; the step callback syncs the device."""
    from imagegen.pipelines import flux, sdxl

    call = flux.call if family == "flux" else sdxl.call
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
    marks: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    started = time.perf_counter()
    with torch.inference_mode(), identity.conditioning(batch) as (kwargs, identity_callback):

        def on_step(pipe, step, timestep, callback_kwargs):
            if identity_callback is not None:
                callback_kwargs = identity_callback(pipe, step, timestep, callback_kwargs)
            sync(device)
            marks.append(time.perf_counter())
            return callback_kwargs

        call(pipe, embeds, request, generators, on_step, **kwargs)
    sync(device)
    finished = time.perf_counter()
    peak = round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None
    return Run(finished - started, (marks[-1] if marks else finished) - started, peak)


def time_family(family: str, opts: argparse.Namespace, clock: Clock, report: dict) -> None:
    from imagegen.pipelines.presets import get_preset
    from imagegen.pipelines.types import RenderRequest

    device, tiny = torch.device(opts.device), opts.tiny
    preset = get_preset(PRESETS[(family, tiny)])
    dtype = getattr(torch, preset.dtype) if device.type == "cuda" else torch.float32
    steps = opts.steps or preset.defaults.steps
    request = RenderRequest(
        prompt="gpu check",
        width=preset.defaults.width,
        height=preset.defaults.height,
        steps=steps,
        guidance=preset.defaults.guidance,
    )
    warmup = request.model_copy(update={"steps": 1})
    methods = [m for m in preset.methods if not opts.methods or m in opts.methods]
    rows = report["timings"]
    built = time.perf_counter()
    pipe = build_pipeline(family, model_configs(family, tiny), device, dtype)
    report["families"][family] = {
        "preset": preset.name,
        "dtype": str(dtype).replace("torch.", ""),
        "size": f"{request.width}x{request.height}",
        "steps": steps,
        "guidance": request.guidance,
        "build_s": round(time.perf_counter() - built, 1),
        "weights_gib": allocated_gib(device),
        "methods": {},
    }
    embeds = {b: prompt_embeds(pipe, family, b, preset.max_sequence_length) for b in opts.batches}
    plain = Identity("plain", plain_conditioning, lambda: None)
    per_step: dict[int, float] = {}  # plain seconds per step, for the budget
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=opts.workdir))
    try:
        names = ["plain", *methods]
        for position, name in enumerate(names):
            if clock.left() <= 0:
                report["skipped"].append(f"{family} {name}: out of the {family} time budget")
                continue
            attached = time.perf_counter()
            try:
                identity = plain if name == "plain" else attach_method(name, pipe, tiny, device, dtype, scratch)
            except Exception as exc:  # a method that cannot attach is a result, not the end of the check
                traceback.print_exc()
                report["skipped"].append(f"{family} {name}: attach failed: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            report["families"][family]["methods"][name] = {
                "attach_s": round(time.perf_counter() - attached, 1),
                "weights_gib": allocated_gib(device),
                **identity.info,
            }
            try:
                for batch in opts.batches:
                    # what the rest needs: this row, and batch 1 of every method after this one
                    estimate = per_step.get(1, 0.0) * batch * (steps + 2) * 1.5
                    later = per_step.get(1, 0.0) * (steps + 2) * 1.5 * (len(names) - position - 1)
                    if per_step and clock.left() < estimate + (later if batch > 1 else 0.0):
                        report["skipped"].append(f"{family} {name} batch {batch}: would not fit the time budget")
                        continue
                    try:
                        render(pipe, family, warmup, embeds[batch], batch, identity, device)
                        run = render(pipe, family, request, embeds[batch], batch, identity, device)
                    except Exception as exc:  # out of memory, or a method failing at this size: report, go on
                        traceback.print_exc()
                        report["skipped"].append(
                            f"{family} {name} batch {batch}: {type(exc).__name__}: {str(exc)[:300]}"
                        )
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    if name == "plain":
                        per_step[batch] = run.denoise_s / steps
                        per_step.setdefault(1, run.denoise_s / steps / batch)
                    rows.append(
                        {
                            "family": family,
                            "preset": preset.name,
                            "method": name,
                            "batch": batch,
                            "steps": steps,
                            "total_s": round(run.total_s, 3),
                            "step_s": round(run.denoise_s / steps, 4),
                            "decode_s": round(run.total_s - run.denoise_s, 3),
                            "peak_gib": run.peak_gib,
                        }
                    )
                    print(f"  {family} {name} batch {batch}: {run.total_s:.2f} s", flush=True)
            finally:
                identity.detach()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        del pipe, embeds
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        base = next(
            (r for r in rows if (r["family"], r["method"], r["batch"]) == (row["family"], "plain", row["batch"])), None
        )
        row["x_plain"] = round(row["total_s"] / base["total_s"], 3) if base else None
        row["x_plain_step"] = round(row["step_s"] / base["step_s"], 3) if base else None


# tests ----------------------------------------------------------------------------------------------------------

_RESULT = re.compile(r"^(\S+::\S+?)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_RESULT_AFTER = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+::\S+)")


def run_tests(paths: list[str], device: str, budget_s: float) -> dict:
    """``pytest -v`` on ``paths`` with ``IMAGEGEN_DEVICE``; counts parsed from its lines (also when cut short)."""
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *paths]
    env = dict(os.environ, IMAGEGEN_DEVICE=device, PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    timed_out = False
    try:
        output, _ = process.communicate(timeout=max(budget_s, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGTERM)  # the pytest run this function started, and its children
        try:
            output, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
    outcomes: dict[str, str] = {}
    for line in output.splitlines():
        match = _RESULT.match(line) or _RESULT_AFTER.match(line)
        if match:
            test, outcome = match.groups() if _RESULT.match(line) else reversed(match.groups())
            outcomes.setdefault(test, outcome)  # the first verdict (a teardown ERROR adds a second line)
    counts = {k.lower(): sum(1 for v in outcomes.values() if v == k) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    summary = next((line.strip("= ") for line in reversed(output.splitlines()) if " in " in line and "==" in line), "")
    return {
        "command": " ".join(["IMAGEGEN_DEVICE=" + device, "pytest", *paths]),
        "returncode": process.returncode,
        "timed_out": timed_out,
        "seconds": round(time.perf_counter() - started, 1),
        **counts,
        "failures": sorted(t for t, v in outcomes.items() if v in ("FAILED", "ERROR"))[:30],
        "summary": summary,
        "tail": output.splitlines()[-40:] if counts["failed"] or counts["error"] or process.returncode else [],
    }


# output ---------------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    env = {
        "device": str(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1), cuda=torch.version.cuda)
    else:
        env["gpu"] = None
    return env


def table_rows(report: dict) -> list[list[str]]:
    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    return [
        [
            r["family"],
            r["method"],
            str(r["batch"]),
            str(r["steps"]),
            fmt(r["total_s"], ".2f"),
            fmt(r["step_s"], ".3f"),
            fmt(r["decode_s"], ".2f"),
            fmt(r.get("x_plain"), ".3f"),
            fmt(r.get("x_plain_step"), ".3f"),
            fmt(r["peak_gib"], ".1f"),
        ]
        for r in report["timings"]
    ]


HEADER = ["family", "method", "batch", "steps", "total s", "s/step", "decode s", "x plain", "x plain/step", "peak GiB"]


def markdown(report: dict) -> str:
    env = report["environment"]
    where = env.get("gpu") or f"{env['device']} (dry run: tiny models)"
    lines = [
        f"## GPU check: {where}, {env['date']}",
        "",
        f"`{report['command']}`: torch {env['torch']}, diffusers {env['diffusers']}"
        + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
        + f"; {report['wall_s']:.0f} s in all.",
        "",
    ]
    tests = report.get("tests")
    if tests:
        state = " (cut short by its time budget)" if tests["timed_out"] else ""
        lines += [
            f"**Tests** (`{tests['command']}`, {tests['seconds']:.0f} s{state}): {tests['passed']} passed, "
            f"{tests['failed']} failed, {tests['error']} errors, {tests['skipped']} skipped."
            + (f" Failing: {', '.join(f'`{t}`' for t in tests['failures'][:10])}." if tests["failures"] else ""),
            "",
        ]
    for family, info in report["families"].items():
        weights = "" if info["weights_gib"] is None else f", {info['weights_gib']} GiB"
        lines.append(
            f"- {family}: preset `{info['preset']}` ({info['dtype']}, {info['size']}, {info['steps']} steps, guidance "
            f"{info['guidance']}); random weights{weights}"
        )
    lines += [
        "",
        f"Random weights ({'tiny models' if report['tiny'] else 'full-size architectures'}), text encoders skipped "
        "(random prompt embeddings), identity tensors cached (random); one warm-up call and one timed call per row "
        "(all steps + VAE decode). *x plain*: total time over the plain pipeline's at the same batch size, in the "
        "same run; *x plain/step*: the same for the time per denoising step. *peak GiB*: "
        "`torch.cuda.max_memory_allocated` during the timed call, weights included.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(HEADER))) + "|",
        *("| " + " | ".join(row) + " |" for row in table_rows(report)),
    ]
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(report["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def write(report: dict, opts: argparse.Namespace, clock: Clock) -> None:
    report["wall_s"] = round(clock.elapsed(), 1)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    opts.markdown.parent.mkdir(parents=True, exist_ok=True)
    opts.markdown.write_text(markdown(report))


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gpu check ({report['environment'].get('gpu') or report['environment']['device']})")
    for i, column in enumerate(HEADER):
        table.add_column(column, justify="left" if i < 2 else "right")
    for row in table_rows(report):
        table.add_row(*row)
    console = Console(width=140)
    console.print(table)
    tests = report.get("tests")
    if tests:
        console.print(
            f"tests: {tests['passed']} passed, {tests['failed']} failed, {tests['error']} errors, "
            f"{tests['skipped']} skipped in {tests['seconds']} s{' (TIMED OUT)' if tests['timed_out'] else ''}"
        )
    for line in report["skipped"]:
        console.print(f"skipped: {line}")


# main -----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--out", type=Path, default=Path("out/gpu_check.json"), help="JSON report")
    parser.add_argument("--markdown", type=Path, default=Path("out/gpu_check.md"), help="Markdown section")
    parser.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models instead of full size")
    parser.add_argument("--dry-run", action="store_true", help="--device cpu --tiny --steps 2, one test file")
    parser.add_argument("--families", nargs="*", default=["flux", "sdxl"], choices=["flux", "sdxl"])
    parser.add_argument("--methods", nargs="*", default=None, help="only these identity methods (default: all)")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 4])
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--tests", nargs="*", default=None, help=f"test paths (default: {' '.join(TEST_PATHS)})")
    parser.add_argument("--budget-s", type=float, default=None, help="the whole run (default 420; dry run 1800)")
    parser.add_argument("--flux-budget-s", type=float, default=None, help="FLUX timings (default 160)")
    parser.add_argument("--sdxl-budget-s", type=float, default=None, help="SDXL timings (default 120)")
    parser.add_argument("--tests-budget-s", type=float, default=None, help="tests (default 170)")
    parser.add_argument("--workdir", default=None, help="scratch folder for the random adapter files")
    opts = parser.parse_args(argv)
    budgets = {"budget_s": 420, "flux_budget_s": 160, "sdxl_budget_s": 120, "tests_budget_s": 170}
    if opts.dry_run:  # every row runs: the point is to go through all the code, however slow this CPU is
        opts.device, opts.tiny, opts.steps = opts.device or "cpu", True, opts.steps or 2
        opts.tests = opts.tests or DRY_RUN_TESTS
        budgets = {"budget_s": 1800, "flux_budget_s": 600, "sdxl_budget_s": 600, "tests_budget_s": 600}
    for name, default in budgets.items():
        if getattr(opts, name) is None:
            setattr(opts, name, default)
    opts.device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    opts.tests = opts.tests or TEST_PATHS
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --dry-run (or --device cpu --tiny)")
    if opts.device == "cpu" and not opts.tiny:
        parser.error("full-size models on the CPU would take hours: add --tiny (or use --dry-run)")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    device = torch.device(opts.device)
    clock = Clock(opts.budget_s)
    report = {
        "command": "python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(device),
        "tiny": opts.tiny,
        "families": {},
        "timings": [],
        "tests": None,
        "skipped": [],
    }
    for family in opts.families:
        clock.begin(opts.flux_budget_s if family == "flux" else opts.sdxl_budget_s)
        print(f"{family}: timing (budget {clock.left():.0f} s)", flush=True)
        try:
            time_family(family, opts, clock, report)
        except Exception as exc:
            traceback.print_exc()
            report["skipped"].append(f"{family}: failed: {type(exc).__name__}: {str(exc)[:300]}")
        write(report, opts, clock)
    if not opts.skip_tests:
        clock.begin(opts.tests_budget_s)
        budget = max(clock.left(), 30.0)
        print(f"tests: {' '.join(opts.tests)} on {device.type} (budget {budget:.0f} s)", flush=True)
        report["tests"] = run_tests(opts.tests, device.type, budget)
    write(report, opts, clock)
    print_table(report)
    print(f"wrote {opts.out} and {opts.markdown} ({report['wall_s']:.0f} s)")
    tests = report["tests"] or {}
    return 1 if tests.get("failed") or tests.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
