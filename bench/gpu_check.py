"""GPU check: full-size timings of the optimisation profiles with and without identity methods, and the identity and
pipeline tests on CUDA.

On a machine with one CUDA GPU (no downloads, no network; at most 8 minutes: --budget-s 480 and a row only starts when
it fits):

    python bench/gpu_check.py --out out/gpu_check.json     # + out/gpu_check.md (for docs/benchmarks.md) + a table
    python bench/gpu_check.py --families flux --skip-tests  # only the FLUX timings
    python bench/gpu_check.py --flux-profiles quality fastest --keep-step-cache --methods all   # another plan
    python bench/gpu_check.py --families flux --flux-profiles quality fastest --skip-tests --budget-s 560 \
        --flux-budget-s 560   # FLUX fastest + PuLID: its fp8 compile warm-up alone took 336 s on an H200

Without a GPU:

    python bench/gpu_check.py --dry-run     # the script end to end: --device cpu --tiny --steps 2, one test file
    python bench/gpu_check.py --proxy       # the full-width CPU proxy: real widths, few blocks, 128 px, 2 steps

What it does, each part under its own time budget (a row that does not fit is reported as skipped, with why; the
JSON and Markdown are rewritten after every part, so a run cut short still leaves what it measured):

1. **timings** (``--families flux sdxl``). The FLUX.1-dev transformer + VAE (bf16, the ``flux-dev`` preset) and the
   SDXL base UNet + VAE (fp16, ``sdxl-base``), full size, with **random weights made on the GPU** (configs:
   ``tests/fixtures/ipadapter/full_size_configs.json``), at the presets' defaults (1024 x 1024; FLUX 28 steps,
   guidance 3.5; SDXL 30 steps with CFG 5), through diffusers' pipelines and imagegen's own
   ``pipelines.{flux,sdxl}.call``. The text encoders are skipped: random prompt embeddings of the right shapes go in
   as ``prompt_embeds`` (what the renderer does with its cached ones).

   Per **optimisation profile** (``--flux-profiles``, default quality fast fastest; ``--sdxl-profiles``, default
   quality fast) a fresh pipeline with the profile applied by imagegen's ``apply_profile`` (regional compile,
   torchao quantisation with its fallback, channels_last + fused QKV on SDXL ...). Random weights time compile,
   quantisation and attention backends truly, but not a step cache (whether a step is skipped depends on real
   weights' outputs), so step caches are dropped unless ``--keep-step-cache``. Rows: plain, then the identity
   methods (``--methods``; default PuLID on FLUX, PuLID and IP-Adapter FaceID-PlusV2 on SDXL; ``all``: every method
   of the preset), attached by imagegen's code with random full-size weights after the profile (as a renderer
   attaches them after loading); a method whose ``check_profile`` refuses the profile is a row saying so:

   - ``pulid-flux-v0.9.1``: IDFormer + 20 ``PerceiverAttentionCA`` (PuLID-FLUX v0.9.1's sizes), ``attach_pulid_flux``,
     a ``PulidFluxState`` per call;
   - ``pulid-sdxl-v1.1``: IDFormer (output 2048) + ``id_to_k``/``id_to_v`` on the 70 cross-attentions,
     ``attach_pulid_sdxl``, a ``PulidSDXLState`` (CFG negatives, ``num_zero`` 20, ortho v2);
   - ``ipadapter-*``: a random file in the released key layout (``bench/make_ipadapter_manifests.py``) written to a
     scratch folder, loaded by the method's load spec and ``attach_ip_adapter`` (diffusers' ``load_ip_adapter``),
     armed per call with an ``IPAdapterState`` and per-sample embeddings shaped as the methods pass them.

   The identity tensors are random too: they are cached per character, so no face model runs in a render. Every
   row is a first call (1 step; under a compiling profile it traces and compiles: reported apart, with the dynamo
   counters) and ``--repeats`` timed calls (all steps + VAE decode): total seconds, seconds per denoising step,
   decode seconds, the ratio to the eager plain row and to the same profile's plain row at the same batch size
   (measured in the same run), recompiles, and peak GPU memory; with ``--busy``, one more call under
   ``torch.profiler`` gives the device's working time (CUDA: kernels and copies, graph replays included), its
   share of the row's time and its ratio to the plain row's: whether an identity method's overhead is device work
   or host work; with ``--stamp-beside``, each plain row one more call while ``min(batch, 4)`` threads stamp
   ``--stamp-size`` images without pause (imagegen's ``provenance.stamp`` where OpenCV and c2pa are installed,
   else CPU work shaped like it): the cost of a replica's stamps behind the next batch to the render they overlap
   (``x_beside_stamps``). Every profile runs at batch 1; the first profile
   (eager) also at the other ``--batches`` (identity overhead at batch > 1). The goals of issue 13 are checked
   against the rows: PuLID within 3% of plain of the same profile; ``fastest`` FLUX.1-dev + PuLID, 1024², 28 steps
   under 3 s on an H100-class GPU.
2. **tests**: ``pytest tests/identity_pulid tests/identity_ipadapter tests/pipelines`` with ``IMAGEGEN_DEVICE=cuda``
   (the tiny presets then run on the GPU in their presets' dtypes): pass / fail / skip / error counts and the ids of
   the failures. Run after the timings, in what is left of the budget (at most ``--tests-budget-s``).
3. **output**: JSON (``--out``), a table on stdout and a Markdown section (``--markdown``) ready to paste.

The **full-width CPU proxy** (``--proxy``) runs part 1 on the CPU with the released widths and few blocks
(``PROXY_BLOCKS``: FLUX 1 double + 2 single blocks of 3072 wide, 24 heads of 128; SDXL 320/640/1280 channels with
one transformer layer per attention block), 128 x 128, 2 steps, 64 text tokens: real-width kernels, so identity
overhead and profile ratios are not inflated by toy widths; absolute seconds mean nothing.
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


#: the full-width CPU proxy: the released configs with their widths (FLUX 3072, 24 heads of 128, T5 4096; SDXL
#: 320/640/1280 channels, cross-attention 2048) and few blocks, so a CPU times real-width kernels in minutes
PROXY_BLOCKS = {
    "flux": {"num_layers": 1, "num_single_layers": 2},
    "sdxl": {"layers_per_block": 1, "transformer_layers_per_block": [1, 1, 1]},
}


def model_configs(family: str, tiny: bool, proxy: bool = False) -> dict:
    """``{"model", "vae", "scheduler"}`` configs: full size from the fixture (``proxy``: with ``PROXY_BLOCKS``), tiny
    from imagegen's tiny builders."""
    if not tiny:
        configs = json.loads(CONFIGS.read_text())
        model = "flux_transformer" if family == "flux" else "sdxl_unet"
        return {
            "model": {**configs[model], **(PROXY_BLOCKS[family] if proxy else {})},
            "vae": configs[f"{family}_vae"],
            "scheduler": configs[f"{family}_scheduler"],
        }
    from imagegen.pipelines.tiny import build_flux_pipeline, build_sdxl_pipeline

    pipe = build_flux_pipeline() if family == "flux" else build_sdxl_pipeline()
    model = pipe.transformer if family == "flux" else pipe.unet
    return {"model": dict(model.config), "vae": dict(pipe.vae.config), "scheduler": dict(pipe.scheduler.config)}


def block_counts(family: str, config: dict) -> dict:
    """The repeated blocks of a denoiser config (what regional compilation compiles once and reuses)."""
    if family == "flux":
        return {"double": config["num_layers"], "single": config["num_single_layers"]}
    return {
        "layers_per_block": config["layers_per_block"],
        "transformer_layers": config["transformer_layers_per_block"],
    }


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


def device_busy(pipe, family: str, request, embeds: dict, batch: int, identity: Identity, device) -> tuple[float, int]:
    """One more call under ``torch.profiler``: the seconds the device spent working in it, and in how many events.

    On CUDA the kernels' and copies' own time (CUPTI records the kernels of a CUDA graph replay one by one); on the
    CPU the time inside aten ops. Against the call's wall time it says whether a row's time is the device's work or
    the host's (Python, launches, a graph's input copies): where an identity method's overhead under CUDA graphs
    comes from. The profiled call itself is slower and is not timed.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        render(pipe, family, request, embeds, batch, identity, device)
    events = [e for e in prof.key_averages() if (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0]
    busy_us = sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in events)
    return busy_us / 1e6, sum(e.count for e in events)


def stamp_work(size: int) -> tuple[str, Callable[[], None]]:
    """One served image's stamp as CPU work: imagegen's own (``provenance.stamp``: watermark, PNG, C2PA) where its
    libraries are installed, else work shaped like it (the PNG encode at the served zlib level and strategy, which
    lets go of the GIL, then its SHA-256 fed in 2 KiB pieces and a JSON record, which hold it, as the C2PA step
    does). Returns which, and the work."""
    import zlib

    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.float32)
    noise = np.random.default_rng(0).normal(0, 8, (size, size, 3)).astype(np.float32)
    pixels = (ramp[None, :, None] * 0.6 + ramp[:, None, None] * 0.4 + noise).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    try:
        from imagegen.provenance.stamp import stamp

        stamp(image, {"seed": 1}, image_id="0" * 32, request_id="gpu-check")  # the signer made before timing
        return "imagegen", lambda: stamp(image, {"seed": 1}, image_id="0" * 32, request_id="gpu-check")
    except Exception as exc:  # noqa: BLE001 - a GPU machine without OpenCV / c2pa: the shaped work instead
        print(f"  stamp beside: imagegen's stamp unavailable ({type(exc).__name__}: {exc}); shaped work", flush=True)

    def shaped() -> None:
        import hashlib
        import io

        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
        data, digest = buffer.getvalue(), hashlib.sha256()
        for start in range(0, len(data), 2047):
            digest.update(data[start : start + 2047])
        json.dumps({"digest": digest.hexdigest(), "record": {str(i): i for i in range(200)}})

    return "shaped", shaped


def beside_stamps(
    pipe, family: str, request, embeds: dict, batch: int, identity: Identity, device, work: Callable[[], None]
) -> tuple[Run, int]:
    """One more timed call while ``min(batch, 4)`` threads stamp images without pause (what the replica's finishing
    thread and stamp threads do while the next batch renders, ``RendererConfig.overlap_finishing``): does their
    CPU work, and the GIL its Python parts take, slow the thread that launches the kernels? Returns the call and how
    many stamps ran beside it."""
    import threading

    stop, done = threading.Event(), [0]

    def loop() -> None:
        while not stop.is_set():
            work()
            done[0] += 1

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(min(batch, 4))]
    for thread in threads:
        thread.start()
    try:
        run = render(pipe, family, request, embeds, batch, identity, device)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return run, done[0]


#: the default plan at full size (a row only starts when it fits the time budget): every profile at batch 1 with
#: plain and the methods below, then the eager profile at the larger batch sizes (identity overhead at batch > 1)
DEFAULT_PROFILES = {"flux": ["quality", "fast", "fastest"], "sdxl": ["quality", "fast"]}
DEFAULT_METHODS = {"flux": ["pulid-flux-v0.9.1"], "sdxl": ["pulid-sdxl-v1.1", "ipadapter-faceid-plusv2-sdxl"]}
#: first-call seconds assumed for a compiling profile before one was measured in this family (budget estimates)
COMPILE_GUESS_S = {"cuda": 75.0, "cpu": 90.0}
#: the same for a compiling profile that also quantises: FLUX.1-dev under ``fastest`` (fp8-dynamic) took 336 s to
#: compile on an H200 (2026-12-04), against 9 s for ``fast``; a guess below that lets it eat every later row's budget
QUANTISED_COMPILE_GUESS_S = {"cuda": 340.0, "cpu": 90.0}


def method_class(name: str):
    """The identity method's class (its ``step_caches`` and ``check_profile``), imported, not instantiated."""
    from imagegen.identity.ipadapter import method as ipadapter
    from imagegen.identity.pulid import method as pulid

    for module in (pulid, ipadapter):
        for value in vars(module).values():
            if isinstance(value, type) and getattr(value, "name", None) == name:
                return value
    raise KeyError(name)


def resolve_profile(preset, label: str, keep_step_cache: bool):
    """The ``Profile`` of ``label`` for ``preset``; random weights: its step cache dropped unless asked to keep it
    (whether a cached step is skipped depends on real weights' outputs; report cache speed-ups from real runs).

    ``<profile>:graphs`` is the profile with its compiled blocks in CUDA graphs (``torch.compile`` mode
    ``reduce-overhead``), ``<profile>:cpp`` with inductor's C++ wrapper (``cpp_wrapper``: kernels launched from C++,
    not Python): SDXL's identity overhead is host time per kernel, which the first replays without the host and the
    second shortens; measures of those two levers, not shipped profiles yet. ``<profile>:cudnn`` runs diffusers'
    attention through cuDNN's fused attention (``attention_backend: _native_cudnn``), which is faster than the default
    SDPA kernel for FLUX's 4,608-token joint attention on Hopper in published figures: time it before a profile
    ships it."""
    from imagegen.pipelines.profiles import CompileOptions, ProfileError, profile_for

    name, _, variant = label.partition(":")
    if variant not in ("", "no-step-cache", "graphs", "cpp", "cudnn"):
        raise ProfileError(f"unknown variant {variant!r} of profile {name!r}: no-step-cache, graphs, cpp or cudnn")
    profile = profile_for(preset, name)
    if profile.step_cache is not None and (variant == "no-step-cache" or not keep_step_cache):
        profile = profile.model_copy(update={"step_cache": None})
    lever = {"graphs": {"mode": "reduce-overhead"}, "cpp": {"mode": None, "options": {"cpp_wrapper": True}}}
    if variant in lever:
        compile_options = (profile.compile or CompileOptions()).model_copy(update=lever[variant])
        profile = profile.model_copy(update={"name": label, "compile": compile_options})
    if variant == "cudnn":
        profile = profile.model_copy(update={"name": label, "attention_backend": "_native_cudnn"})
    return profile


def row_plan(family: str, opts: argparse.Namespace, preset) -> list[tuple[str, list[str], int]]:
    """(profile, [identities], batch) groups in the order they run: every profile at batch 1, then the first
    profile at the other batch sizes."""
    profiles = getattr(opts, f"{family}_profiles") or DEFAULT_PROFILES[family]
    wanted = opts.methods if opts.methods is not None else DEFAULT_METHODS[family]
    methods = [m for m in preset.methods if m in wanted or opts.methods == ["all"]]
    names = ["plain", *methods]
    plan = [(p, names, 1) for p in profiles]
    plan += [(profiles[0], names, b) for b in opts.batches if b != 1]
    return plan


def time_family(family: str, opts: argparse.Namespace, clock: Clock, report: dict) -> None:
    """Per profile: a fresh random-weight pipeline, the profile applied (imagegen's ``apply_profile``), then plain
    and each identity method attached by imagegen's code; a 1-step first call (compile warm-up under a compiling
    profile, reported apart) and ``--repeats`` timed calls of all steps + VAE decode."""
    from imagegen.pipelines.presets import get_preset
    from imagegen.pipelines.profiles import (
        ProfileError,
        apply_profile,
        compile_counters,
        compile_phase_seconds,
        cuda_graphs_recorded,
    )
    from imagegen.pipelines.types import RenderRequest

    device, tiny = torch.device(opts.device), opts.tiny
    preset = get_preset(PRESETS[(family, tiny)])
    dtype = getattr(torch, preset.dtype) if device.type == "cuda" else torch.float32
    steps = opts.steps or preset.defaults.steps
    width = opts.size or preset.defaults.width
    request = RenderRequest(
        prompt="gpu check", width=width, height=width, steps=steps, guidance=preset.defaults.guidance
    )
    warmup = request.model_copy(update={"steps": 1})
    rows = report["timings"]
    configs = model_configs(family, tiny, opts.proxy)
    report["families"][family] = {
        "preset": preset.name,
        "dtype": str(dtype).replace("torch.", ""),
        "size": f"{request.width}x{request.height}",
        "steps": steps,
        "guidance": request.guidance,
        "model": "proxy" if opts.proxy else ("tiny" if tiny else "full size"),
        "blocks": block_counts(family, configs["model"]),
        "profiles": {},
        "methods": {},
    }
    sequence = opts.max_sequence_length or preset.max_sequence_length
    per_step: dict[tuple[str, int], float] = {}  # (profile, batch) -> plain seconds per step, for the budget
    first_guess = {
        "eager": 0.0,
        "compiled": COMPILE_GUESS_S[device.type],
        "quantised": QUANTISED_COMPILE_GUESS_S[device.type],
    }
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=opts.workdir))
    stamping = stamp_work(opts.stamp_size) if opts.stamp_beside else None
    if stamping is not None:
        report["stamp_beside"] = {"work": stamping[0], "size": opts.stamp_size}
    try:
        for label, names, batch in row_plan(family, opts, preset):
            try:
                profile = resolve_profile(preset, label, opts.keep_step_cache)
            except ProfileError as exc:
                report["skipped"].append(f"{family} {label}: {exc}")
                continue
            kind = "eager" if profile.compile is None else "compiled" if profile.quantize == "none" else "quantised"
            plain_step = per_step.get(("quality", 1), 0.0) * batch
            if clock.left() < first_guess[kind] + plain_step * (steps + 2) * 1.5 + 5:
                guess = f" (first call guessed at {first_guess[kind]:.0f} s)" if first_guess[kind] else ""
                report["skipped"].append(f"{family} {label} batch {batch}: would not fit the time budget{guess}")
                continue
            built = time.perf_counter()
            pipe = build_pipeline(family, configs, device, dtype)
            try:
                applied = apply_profile(pipe, profile, family, device)
            except Exception as exc:  # a profile this device cannot apply is a result
                traceback.print_exc()
                report["skipped"].append(f"{family} {label}: apply failed: {type(exc).__name__}: {str(exc)[:300]}")
                del pipe
                release(device)
                continue
            report["families"][family]["profiles"][label] = {
                **applied.summary(),
                "build_and_apply_s": round(time.perf_counter() - built, 1),
                "weights_gib": allocated_gib(device),
            }
            cache = compile_cache_of(opts, preset, profile, applied, device)
            embeds = prompt_embeds(pipe, family, batch, sequence)
            try:
                for name in names:
                    row = {"family": family, "preset": preset.name, "profile": label, "method": name, "batch": batch}
                    if name != "plain":
                        stub = object.__new__(method_class(name))
                        try:
                            stub.check_profile(profile)  # what the renderer would refuse, refused here too
                        except ProfileError as exc:
                            rows.append({**row, "steps": steps, "note": f"refused: {exc}"})
                            continue
                    calls = (
                        opts.repeats + 0.5 + (1.5 if opts.busy else 0) + (1.2 if stamping and name == "plain" else 0)
                    )
                    estimate = per_step.get((label, batch), plain_step) * (steps + 2) * calls
                    if clock.left() < estimate + first_guess[kind] * 0.5:
                        report["skipped"].append(
                            f"{family} {label} {name} batch {batch}: would not fit the time budget"
                        )
                        continue
                    attached = time.perf_counter()
                    try:
                        identity = (
                            Identity("plain", plain_conditioning, lambda: None)
                            if name == "plain"
                            else attach_method(name, pipe, tiny, device, dtype, scratch)
                        )
                    except Exception as exc:  # a method that cannot attach is a result, not the end of the check
                        traceback.print_exc()
                        rows.append(
                            {**row, "steps": steps, "note": f"attach failed: {type(exc).__name__}: {exc}"[:300]}
                        )
                        continue
                    report["families"][family]["methods"].setdefault(
                        name, {"attach_s": round(time.perf_counter() - attached, 1), **identity.info}
                    )
                    try:
                        before, graphs_before = compile_counters(), cuda_graphs_recorded(device)
                        phases_before = compile_phase_seconds()
                        first = render(pipe, family, warmup, embeds, batch, identity, device)
                        middle, graphs_middle = compile_counters(), cuda_graphs_recorded(device)
                        phases = counter_delta(phases_before, compile_phase_seconds())
                        runs = [
                            render(pipe, family, request, embeds, batch, identity, device) for _ in range(opts.repeats)
                        ]
                        after, graphs_after = compile_counters(), cuda_graphs_recorded(device)
                        busy = (
                            device_busy(pipe, family, request, embeds, batch, identity, device) if opts.busy else None
                        )
                        beside = (
                            beside_stamps(pipe, family, request, embeds, batch, identity, device, stamping[1])
                            if stamping is not None and name == "plain"
                            else None
                        )
                    except Exception as exc:  # out of memory, or a method failing at this size: report, go on
                        traceback.print_exc()
                        rows.append({**row, "steps": steps, "note": f"{type(exc).__name__}: {str(exc)[:300]}"})
                        release(device)
                        continue
                    finally:
                        identity.detach()
                    run = min(runs, key=lambda r: r.total_s)  # the best call: a shared CPU's noise only adds time
                    if name == "plain":
                        per_step[(label, batch)] = run.denoise_s / steps
                        per_step.setdefault(("quality", 1), run.denoise_s / steps / batch)
                    if kind != "eager" and name == "plain":
                        first_guess[kind] = max(first.total_s, 1.0)
                    rows.append(
                        {
                            **row,
                            "steps": steps,
                            "first_s": round(first.total_s, 3),
                            "total_s": round(run.total_s, 3),
                            "times": [round(r.total_s, 3) for r in runs],
                            "s_per_image": round(run.total_s / batch, 4),
                            "step_s": round(run.denoise_s / steps, 4),
                            "decode_s": round(run.total_s - run.denoise_s, 3),
                            "peak_gib": run.peak_gib,
                            "busy_s": None if busy is None else round(busy[0], 3),
                            "busy_events": None if busy is None else busy[1],
                            "busy_share": None if busy is None else round(busy[0] / run.total_s, 3),
                            "beside_stamps_s": None if beside is None else round(beside[0].total_s, 3),
                            "stamps_beside": None if beside is None else beside[1],
                            "x_beside_stamps": None if beside is None else round(beside[0].total_s / run.total_s, 3),
                            "first_compile": {k: v for k, v in counter_delta(before, middle).items() if v},
                            # where the first call's compile went (seconds per phase: profiles.COMPILE_PHASES)
                            "first_compile_phases": {k: round(v, 2) for k, v in phases.items() if v >= 0.005},
                            "steady_compile": {k: v for k, v in counter_delta(middle, after).items() if v},
                            # CUDA graphs recorded by the first call and by the timed calls (which should record none:
                            # a recording per call is a static input at a new address: identity/fixed_address.py)
                            "cuda_graphs_first": None if graphs_before is None else graphs_middle - graphs_before,
                            "cuda_graphs_steady": None if graphs_before is None else graphs_after - graphs_middle,
                        }
                    )
                    shown = f"{run.total_s:.2f} s (first call {first.total_s:.1f} s)"
                    if phases.get("dynamo_total", 0) >= 0.005:
                        shown += ", its compile: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items() if v >= 0.05)
                    print(f"  {family} {label} {name} batch {batch}: {shown}", flush=True)
            finally:
                if cache is not None:  # what this profile compiled, stored for the next process (--compile-store)
                    report["families"][family]["profiles"][label]["compile_cache"] = cache.finish().summary()
                # every reference to this profile's pipeline (the last identity's closures, the applied profile's
                # compiled blocks) goes before the next one is built: its weights must not count in the next rows'
                # peak memory (they did: 34.5 GiB allocated after FLUX's fp8 model was applied)
                identity = applied = None  # noqa: F841
                del pipe, embeds
                release(device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    add_ratios(rows)


def compile_cache_of(opts: argparse.Namespace, preset, profile, applied, device: torch.device):
    """With ``--compile-store DIR``, the compile cache a replica of this preset and profile uses
    (``imagegen.pipelines.compile_cache``), its artifact loaded from DIR before the first call compiles; else None.
    Run the check twice with an empty ``IMAGEGEN_COMPILE_CACHE_DIR`` each time: the second run's ``first_s`` is a
    replica's warm-up on a fresh machine (``bash bench/gpu_session.sh compile-cache``)."""
    if opts.compile_store is None or "compile" not in applied.applied:
        return None
    from imagegen.pipelines.compile_cache import CompileCache
    from imagegen.settings import get_settings

    settings = get_settings().model_copy(update={"storage_url": str(opts.compile_store)})
    cache = CompileCache.for_renderer(settings, preset.name, profile, device)  # what a Renderer of the preset opens
    report = cache.start()
    print(f"  compile cache: artifact {report.load}, local directory {report.local_dir}", flush=True)
    return cache


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def release(device: torch.device) -> None:
    """Forget compiled code and free memory (the next profile starts from a new pipeline, as a new replica would)."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_ratios(rows: list[dict]) -> None:
    """``x_eager_plain``: s/image over the eager (quality) plain row's, same family and batch; ``x_plain``: over the
    same profile's plain row (the identity overhead under that profile); the same two per denoising step;
    ``x_plain_busy``: the device's working time over the same profile's plain row's (``--busy``)."""

    def plain(row: dict, profile: str) -> dict | None:
        return next(
            (
                r
                for r in rows
                if r.get("total_s") is not None
                and (r["family"], r["profile"], r["method"], r["batch"])
                == (row["family"], profile, "plain", row["batch"])
            ),
            None,
        )

    for row in rows:
        if row.get("total_s") is None:
            continue
        eager, same = plain(row, "quality"), plain(row, row["profile"])
        row["x_eager_plain"] = round(row["total_s"] / eager["total_s"], 3) if eager else None
        row["x_plain"] = round(row["total_s"] / same["total_s"], 3) if same else None
        row["x_plain_step"] = round(row["step_s"] / same["step_s"], 3) if same else None
        busy, plain_busy = row.get("busy_s"), (same or {}).get("busy_s")
        row["x_plain_busy"] = round(busy / plain_busy, 3) if busy and plain_busy else None


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

    def compiles(r: dict) -> str:
        if r.get("first_s") is None:
            return "-"
        first, steady = r.get("first_compile") or {}, r.get("steady_compile") or {}
        return f"{first.get('unique_graphs', 0)}/{first.get('recompiles', 0)}/{steady.get('recompiles', 0)}"

    return [
        [
            r["family"],
            r["profile"],
            r["method"],
            str(r["batch"]),
            str(r["steps"]),
            fmt(r.get("first_s"), ".2f"),
            fmt(r.get("total_s"), ".2f"),
            fmt(r.get("step_s"), ".3f"),
            fmt(r.get("decode_s"), ".2f"),
            fmt(r.get("x_eager_plain"), ".3f"),
            fmt(r.get("x_plain"), ".3f"),
            fmt(r.get("x_plain_step"), ".3f"),
            compiles(r),
            f"{fmt(r.get('cuda_graphs_first'), 'd')}/{fmt(r.get('cuda_graphs_steady'), 'd')}",
            fmt(r.get("peak_gib"), ".1f"),
            fmt(r.get("busy_share"), ".2f"),
            fmt(r.get("x_plain_busy"), ".3f"),
            fmt(r.get("x_beside_stamps"), ".3f"),
            r.get("note", ""),
        ]
        for r in report["timings"]
    ]


HEADER = [
    "family",
    "profile",
    "method",
    "batch",
    "steps",
    "first call s",
    "total s",
    "s/step",
    "decode s",
    "x eager plain",
    "x plain",
    "x plain/step",
    "graphs/recompiles/steady",
    "CUDA graphs recorded first/steady",
    "peak GiB",
    "device busy share",
    "x plain busy",
    "x beside stamps",
    "note",
]
#: left-aligned columns of the table
TEXT_COLUMNS = 3


def goals(report: dict) -> list[str]:
    """The issue's goals at full size, checked against this run's rows (None where a row is missing)."""
    rows = [r for r in report["timings"] if r.get("total_s") is not None and r["batch"] == 1]
    full_size = not report["tiny"] and not report.get("proxy")
    lines = []
    for r in rows:
        if r["method"].startswith("pulid") and r.get("x_plain") is not None:
            verdict = ("meets" if r["x_plain"] <= 1.03 else "misses") if full_size else "not full size: indicative for"
            lines.append(
                f"{r['family']} {r['profile']} + {r['method']}: {100 * (r['x_plain'] - 1):+.1f}% over plain of the "
                f"same profile ({verdict} the 3% goal)"
            )
    fastest = [
        r for r in rows if r["family"] == "flux" and r["profile"].startswith("fastest") and "pulid" in r["method"]
    ]
    if fastest and full_size:
        r = fastest[0]
        verdict = "meets" if r["total_s"] < 3.0 else "misses"
        lines.append(
            f"fastest FLUX.1-dev + PuLID, {report['families']['flux']['size']}, {r['steps']} steps: "
            f"{r['total_s']:.2f} s "
            f"({verdict} the < 3 s goal on an H100-class GPU; this is {report['environment'].get('gpu')}, step cache "
            f"{'kept' if report.get('keep_step_cache') else 'not used (random weights)'})"
        )
    return lines


def markdown(report: dict) -> str:
    env = report["environment"]
    model = "full-width proxy" if report.get("proxy") else ("tiny models" if report["tiny"] else "full size")
    where = env.get("gpu") or f"{env['device']} ({model})"
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
        applied = "; ".join(
            f"{label}: {', '.join(p['applied']) or 'eager'}"
            + (f" (quantize {p['quantize']})" if p["quantize"] != "none" else "")
            for label, p in info["profiles"].items()
        )
        lines.append(
            f"- {family}: preset `{info['preset']}` ({info['model']}, blocks {info['blocks']}, {info['dtype']}, "
            f"{info['size']}, {info['steps']} steps, guidance {info['guidance']}); random weights; profiles: {applied}"
        )
    cache = "kept" if report.get("keep_step_cache") else "dropped (random weights: a cache's skips mean nothing)"
    lines += [
        "",
        f"Random weights ({model}), text encoders skipped (random prompt embeddings), identity tensors cached "
        "(random). Per profile a fresh pipeline with the profile applied by imagegen's `apply_profile`, then plain and "
        "each identity method attached by imagegen's code. *first call s*: a 1-step call of that shape (under a "
        "compiling profile: tracing and compiling, what a replica pays once in warm-up); *total s*: the fastest of "
        f"{report.get('repeats', 1)} timed call(s) after it (all steps + VAE decode). *x eager plain*: total over the "
        "eager (quality) plain row's at the same batch size; *x plain*: over the same profile's plain row (identity "
        "overhead under that profile); *x plain/step*: the same per denoising step. *graphs/recompiles/steady*: "
        "dynamo graphs compiled and recompiles in the first call, recompiles in the timed calls (should be 0). "
        f"Step caches {cache}. *peak GiB*: `torch.cuda.max_memory_allocated` during the timed call. *x beside "
        "stamps* (`--stamp-beside`, plain rows): one more call while min(batch, 4) threads stamp images without pause "
        f"({(report.get('stamp_beside') or {}).get('work', '-')} stamp work), over the row's total: what a replica's "
        "stamps behind the next batch cost the render they overlap.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" if i < TEXT_COLUMNS or c == "note" else "---:" for i, c in enumerate(HEADER)) + "|",
        *("| " + " | ".join(row) + " |" for row in table_rows(report)),
    ]
    if goals(report):
        lines += ["", *(f"- {line}" for line in goals(report))]
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
        table.add_column(column, justify="left" if i < TEXT_COLUMNS or column == "note" else "right")
    for row in table_rows(report):
        table.add_row(*row)
    console = Console(width=220)
    console.print(table)
    for line in goals(report):
        console.print(f"goal: {line}")
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
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="the full-width CPU proxy: real widths, few blocks (PROXY_BLOCKS), --size 128 --steps 2, no tests",
    )
    parser.add_argument("--families", nargs="*", default=["flux", "sdxl"], choices=["flux", "sdxl"])
    parser.add_argument(
        "--flux-profiles",
        nargs="*",
        default=None,
        help=f"FLUX profiles, eager first (default: {' '.join(DEFAULT_PROFILES['flux'])}; <name>:no-step-cache, "
        "<name>:graphs, <name>:cpp too)",
    )
    parser.add_argument(
        "--sdxl-profiles",
        nargs="*",
        default=None,
        help=f"SDXL profiles (default: {' '.join(DEFAULT_PROFILES['sdxl'])}; <name>:graphs: its compiled blocks in "
        "CUDA graphs; <name>:cpp: inductor's C++ wrapper)",
    )
    parser.add_argument(
        "--keep-step-cache",
        action="store_true",
        help="keep the profiles' step caches (default: dropped, random weights make their skips meaningless)",
    )
    parser.add_argument(
        "--methods",
        nargs="*",
        default=None,
        help="identity methods ('all': every method of the preset; default: "
        + "; ".join(f"{f}: {', '.join(m)}" for f, m in DEFAULT_METHODS.items())
        + ")",
    )
    parser.add_argument(
        "--batches", nargs="*", type=int, default=None, help="batch 1 for every profile, the others for the first "
        "profile only (default: 1 4; dry run and proxy: 1)"
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 1; proxy 2)")
    parser.add_argument(
        "--busy",
        action="store_true",
        help="one more call per row under torch.profiler: the device's working time, its share of the row's time "
        "and its ratio to the plain row's (is an identity method's overhead device work or host work?)",
    )
    parser.add_argument(
        "--stamp-beside",
        action="store_true",
        help="plain rows: one more call while stamp threads work without pause (the replica's stamps behind the next "
        "batch): does the CPU work beside it slow the thread launching kernels?",
    )
    parser.add_argument("--stamp-size", type=int, default=1024, help="the stamped images' side (--stamp-beside)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    parser.add_argument("--size", type=int, default=None, help="square size (default: the preset's; proxy 128)")
    parser.add_argument(
        "--max-sequence-length", type=int, default=None, help="FLUX text tokens (default: the preset's; proxy 64)"
    )
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--tests", nargs="*", default=None, help=f"test paths (default: {' '.join(TEST_PATHS)})")
    parser.add_argument("--budget-s", type=float, default=None, help="the whole run (default 480; dry run 1800)")
    parser.add_argument("--flux-budget-s", type=float, default=None, help="FLUX timings (default 250; alone: all)")
    parser.add_argument("--sdxl-budget-s", type=float, default=None, help="SDXL timings (default 150; alone: all)")
    parser.add_argument("--tests-budget-s", type=float, default=None, help="tests (default: what is left, <= 120)")
    parser.add_argument("--workdir", default=None, help="scratch folder for the random adapter files")
    parser.add_argument(
        "--compile-store",
        type=Path,
        default=None,
        help="object store (a directory) of compile artifacts: loaded before a compiling profile's first call, "
        "stored after its rows (imagegen.pipelines.compile_cache)",
    )
    opts = parser.parse_args(argv)
    budgets = {"budget_s": 480, "flux_budget_s": 250, "sdxl_budget_s": 150, "tests_budget_s": 120}
    if opts.dry_run:  # every row runs: the point is to go through all the code, however slow this CPU is
        opts.device, opts.tiny, opts.steps = opts.device or "cpu", True, opts.steps or 2
        opts.tests = opts.tests or DRY_RUN_TESTS
        opts.batches = opts.batches or [1]
        budgets = {"budget_s": 1800, "flux_budget_s": 900, "sdxl_budget_s": 900, "tests_budget_s": 600}
    if opts.proxy:
        if opts.tiny:
            parser.error("--proxy is the full-width proxy: drop --tiny")
        opts.device = opts.device or "cpu"
        opts.size, opts.steps = opts.size or 128, opts.steps or 2
        opts.max_sequence_length = opts.max_sequence_length or 64
        opts.batches, opts.repeats = opts.batches or [1], opts.repeats or 2
        opts.skip_tests = True
        budgets = {"budget_s": 1800, "flux_budget_s": 900, "sdxl_budget_s": 900, "tests_budget_s": 0}
    if len(opts.families) == 1:  # one family: its timings may take the whole budget (less the tests')
        family_budget = opts.budget_s or budgets["budget_s"]
        tests = 0 if opts.skip_tests else opts.tests_budget_s or budgets["tests_budget_s"]
        budgets[f"{opts.families[0]}_budget_s"] = max(family_budget - tests, 0)
    for name, default in budgets.items():
        if getattr(opts, name) is None:
            setattr(opts, name, default)
    opts.batches = sorted(set(opts.batches or [1, 4]), key=lambda b: b != 1)
    opts.repeats = max(1, opts.repeats or 1)
    opts.device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    opts.tests = opts.tests or TEST_PATHS
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --dry-run or --proxy (or --device cpu --tiny)")
    if opts.device == "cpu" and not (opts.tiny or opts.proxy):
        parser.error("full-size models on the CPU would take hours: add --tiny, --proxy (or use --dry-run)")
    if 1 not in opts.batches:
        parser.error("--batches must include 1 (every profile is timed at batch 1)")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    device = torch.device(opts.device)
    clock = Clock(opts.budget_s)
    report = {
        "command": "python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(device),
        "tiny": opts.tiny,
        "proxy": opts.proxy,
        "keep_step_cache": opts.keep_step_cache,
        "repeats": opts.repeats,
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
