"""Optimisation profiles: how a loaded pipeline is made faster (or smaller) without changing what it renders.

A profile is plain data in ``configs/models.yaml`` (``profiles:``), chosen per preset (``profile:``), per
deployment (the renderer's ``profile`` in ``configs/serve.yaml``), through ``IMAGEGEN_PROFILE`` or on the CLI
(``--profile``). Each option maps to the well-kept tool of the field, applied once after loading:

- ``compile``: diffusers' regional compilation (``compile_repeated_blocks``: the transformer blocks are compiled
  once and the compiled code reused by every repeated block; a full-model compile costs minutes);
- ``quantize``: torchao weight quantisation of the denoiser only (text encoders, VAE and identity modules keep
  the preset's precision); fp8 needs an NVIDIA GPU of compute capability 8.9 or newer, so a profile names a
  ``quantize_fallback`` for other hardware (or loading fails in one line);
- ``step_cache``: diffusers' ``enable_cache`` (First-Block, TaylorSeer, MagCache) on transformers that support it;
- ``attention_backend``: diffusers' attention dispatcher (``set_attention_backend``);
- ``channels_last`` and ``fuse_qkv``: memory format and fused projections of a UNet's convolutions and attentions;
- ``offload``: diffusers' model / sequential CPU offload for small GPUs (nothing to do where the model already
  lives in CPU memory); ``vae_tiling`` / ``vae_slicing``: decode big images, or big batches, in pieces.

Unknown names or options, and combinations the hardware or the model cannot run, are a :class:`ProfileError` at
load, never a crash mid-render. What was applied, and what did not apply on this device and why, is kept on the
:class:`AppliedProfile` (``/readyz`` shows it). Identity conditioners check a profile against their own needs when
they are loaded (``Conditioner.check_profile``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from imagegen.errors import ConfigError
from imagegen.pipelines.presets import Preset, read_yaml_config
from imagegen.settings import Settings, get_settings

log = logging.getLogger(__name__)

Quantisation = Literal["none", "int8-weight-only", "int8-dynamic", "fp8-weight-only", "fp8-dynamic"]
#: the smallest CUDA compute capability with fp8 tensor cores (Ada Lovelace, Hopper and newer)
FP8_CAPABILITY = (8, 9)
#: the profile a preset renders with when nothing chooses another
DEFAULT_PROFILE = "quality"


class ProfileError(ConfigError):
    """A profile that does not exist, or that this model or device cannot run."""


class CompileOptions(BaseModel):
    """``torch.compile`` of the denoiser's repeated blocks."""

    model_config = ConfigDict(extra="forbid")

    #: torch.compile mode; ``max-autotune-no-cudagraphs`` tunes kernels without CUDA graphs (which would pin
    #: every batch shape); None is inductor's default
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    #: refuse graph breaks inside a block (a break per step would undo the point of compiling)
    fullgraph: bool = True
    #: symbolic shapes from the start (None: torch marks a dimension dynamic the second time it changes, so a
    #: new batch size costs one recompile, then none)
    dynamic: bool | None = None
    #: inductor options (``torch.compile``'s ``options``, e.g. ``{cpp_wrapper: true}``: the generated code launches
    #: its kernels from C++ rather than Python, less host time per kernel); torch takes these or ``mode``, not both
    options: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _mode_or_options(self) -> CompileOptions:
        if self.options:
            if self.mode is not None:
                raise ValueError("set compile.mode or compile.options, not both (torch.compile takes one of them)")
            from typing import get_origin

            from torch._inductor import config

            known = config.get_config_copy()  # what torch.compile accepts (as it spells them: '-' read as '_')
            names = {key: key.replace("-", "_") for key in self.options}
            unknown = sorted(key for key, name in names.items() if name not in known)
            if unknown:
                raise ValueError(f"unknown inductor option(s) {unknown} (torch._inductor.list_options() has them all)")
            for key, value in self.options.items():
                expected = config.get_type(names[key])
                if get_origin(expected) is None and not isinstance(value, expected):
                    kind = type(known[names[key]]).__name__
                    raise ValueError(f"inductor option {key} takes a {kind}, got {value!r} ({type(value).__name__})")
            self.options = {names[key]: value for key, value in self.options.items()}  # as torch spells them
        return self

    @property
    def cuda_graphs(self) -> bool:
        """Whether the compiled blocks run in CUDA graphs (mode ``reduce-overhead``, or inductor's
        ``triton.cudagraphs`` option)."""
        return self.mode == "reduce-overhead" or bool((self.options or {}).get("triton.cudagraphs"))


class StepCacheOptions(BaseModel):
    """A diffusers step cache: later steps reuse (parts of) earlier steps' transformer outputs."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["first-block", "taylorseer", "magcache"]
    #: the cache config's own fields (``FirstBlockCacheConfig(threshold=...)`` ...), checked when it is built
    options: dict[str, Any] = Field(default_factory=dict)


class ProfileOptions(BaseModel):
    """The options of a profile (one family section may override any of them)."""

    model_config = ConfigDict(extra="forbid")

    compile: CompileOptions | None = None
    quantize: Quantisation = "none"
    #: used instead of ``quantize`` where the hardware lacks it (fp8 off Ada/Hopper); None: such hardware is refused
    quantize_fallback: Quantisation | None = None
    step_cache: StepCacheOptions | None = None
    attention_backend: str | None = None
    channels_last: bool = False
    fuse_qkv: bool = False
    offload: Literal["none", "model", "sequential"] = "none"
    vae_tiling: bool = False
    vae_slicing: bool = False


class Profile(ProfileOptions):
    """One named profile of configs/models.yaml, resolved for one preset (family section and overrides merged)."""

    name: str
    description: str = ""

    @property
    def is_eager(self) -> bool:
        """Renders exactly what a freshly loaded pipeline renders (the reference numerics)."""
        return self == Profile(name=self.name, description=self.description)


class _ProfileEntry(ProfileOptions):
    """A profile as written in configs/models.yaml: options, plus sections per family that override them."""

    description: str = ""
    flux: dict[str, Any] = Field(default_factory=dict)
    sdxl: dict[str, Any] = Field(default_factory=dict)


@lru_cache(maxsize=8)
def _load_profiles(path: Path) -> dict[str, dict[str, Any]]:
    raw = read_yaml_config(path, "presets", "model presets file", "IMAGEGEN_MODELS_CONFIG")
    entries = raw.get("profiles") or {}
    if not isinstance(entries, dict):
        raise ProfileError(f"{path}: 'profiles' must be a mapping of profile names to options")
    profiles: dict[str, dict[str, Any]] = {}
    for name, body in entries.items():
        try:
            _ProfileEntry(**(body or {}))
        except (ValidationError, TypeError) as exc:
            raise ProfileError(f"{path}: profile '{name}' is invalid: {_first_error(exc)}") from exc
        profiles[name] = dict(body or {})
    if DEFAULT_PROFILE not in profiles:
        profiles[DEFAULT_PROFILE] = {"description": "eager, the reference numerics"}
    return profiles


def all_profiles(settings: Settings | None = None) -> dict[str, dict[str, Any]]:
    """Every profile of the configured models.yaml, by name, as written (before a preset's overrides)."""
    return dict(_load_profiles((settings or get_settings()).models_config.resolve()))


def profile_for(preset: Preset, name: str | None = None, settings: Settings | None = None) -> Profile:
    """The profile ``name`` (None: ``IMAGEGEN_PROFILE``, else the preset's own) as it applies to ``preset``:
    the profile's options, then its section for the preset's family, then the preset's ``profile_overrides``."""
    settings = settings or get_settings()
    chosen = name or settings.profile or preset.profile
    profiles = all_profiles(settings)
    if chosen not in profiles:
        raise ProfileError(f"unknown profile '{chosen}'; known profiles: {', '.join(sorted(profiles))}")
    body = {k: v for k, v in profiles[chosen].items() if k not in ("flux", "sdxl")}
    body.update(profiles[chosen].get(preset.family) or {})
    body.update(preset.profile_overrides.get(chosen) or {})
    try:
        return Profile(name=chosen, **body)
    except (ValidationError, TypeError) as exc:
        raise ProfileError(f"profile '{chosen}' for preset '{preset.name}' is invalid: {_first_error(exc)}") from exc


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where}: {err['msg']}" if where else err["msg"]
    return str(exc)


@dataclass
class AppliedProfile:
    """What a profile did to one loaded pipeline: the options applied, and those that had nothing to do here."""

    profile: Profile
    #: the quantisation actually used (the fallback where the hardware lacks the first choice)
    quantize: Quantisation = "none"
    applied: list[str] = field(default_factory=list)
    #: option -> why it did not apply on this device (e.g. offload where the model already lives in CPU memory)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def step_cache(self) -> StepCacheOptions | None:
        return self.profile.step_cache

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "quantize": self.quantize,
            "applied": list(self.applied),
            "skipped": dict(self.skipped),
        }


def check_profile(profile: Profile, family: str, device: torch.device) -> Quantisation:
    """Refuse what this family or device cannot run (one line naming the option); the quantisation to use."""
    quantize = profile.quantize
    if quantize.startswith("fp8") and not has_fp8(device):
        if profile.quantize_fallback is None:
            raise ProfileError(
                f"profile '{profile.name}' quantises to {quantize}, which needs an NVIDIA GPU of compute capability "
                f"{FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer (Ada, Hopper); this device is {_describe(device)}. "
                "Give the profile a quantize_fallback (e.g. int8-weight-only) or choose another profile."
            )
        quantize = profile.quantize_fallback
        if quantize.startswith("fp8"):
            raise ProfileError(f"profile '{profile.name}': quantize_fallback {quantize} needs fp8 hardware too")
    if quantize != "none":
        _require_torchao(profile.name)
    if profile.step_cache is not None and family != "flux":
        raise ProfileError(
            f"profile '{profile.name}' uses a step cache ({profile.step_cache.kind}), which diffusers offers for "
            f"transformer denoisers only; {family}'s UNet has none: drop step_cache for {family} "
            f"(a '{family}:' section of the profile) or choose another profile"
        )
    if profile.fuse_qkv and family != "sdxl":
        raise ProfileError(
            f"profile '{profile.name}': fuse_qkv is for SDXL's UNet; on {family} it would replace the attention "
            "processors identity adapters attach to. Move it into the profile's 'sdxl:' section."
        )
    if profile.attention_backend is not None:
        _check_attention_backend(profile, device)
    if profile.step_cache is not None:
        step_cache_config(profile)
        if profile.compile is not None and profile.compile.fullgraph:
            raise ProfileError(
                f"profile '{profile.name}': a step cache decides on the host at every step whether to skip the "
                "blocks (one sync in the first block), which a fullgraph compile refuses; set compile.fullgraph: false "
                "with step_cache"
            )
    if profile.compile is not None and profile.compile.cuda_graphs:
        if profile.step_cache is not None:
            raise ProfileError(
                f"profile '{profile.name}': a step cache keeps block outputs from one denoiser call to the next, and "
                "CUDA graphs (compile mode reduce-overhead) replay over them; drop step_cache or the CUDA graphs"
            )
        if profile.offload != "none":
            raise ProfileError(
                f"profile '{profile.name}': offload moves the weights between calls, and CUDA graphs (compile mode "
                "reduce-overhead) are captured on their addresses; use offload: none with CUDA graphs"
            )
    if profile.offload == "sequential" and profile.compile is not None:
        raise ProfileError(
            f"profile '{profile.name}': sequential offload moves every weight at every call, which compiled blocks "
            "cannot follow; use offload: model with compile, or drop compile"
        )
    return quantize


def has_fp8(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_CAPABILITY


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return device.type


def _require_torchao(profile: str) -> None:
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise ProfileError(
            f"profile '{profile}' quantises with torchao, which is not installed: pip install torchao"
        ) from exc


def _check_attention_backend(profile: Profile, device: torch.device) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = {b.value for b in AttentionBackendName}
    if profile.attention_backend not in known:
        raise ProfileError(
            f"profile '{profile.name}': unknown attention_backend '{profile.attention_backend}'; "
            f"diffusers knows: {', '.join(sorted(known))}"
        )
    if device.type != "cuda" and not profile.attention_backend.startswith(("native", "_native_math")):
        raise ProfileError(
            f"profile '{profile.name}': attention_backend '{profile.attention_backend}' needs a GPU; "
            f"this device is {device.type} (use 'native')"
        )


def apply_profile(pipe, profile: Profile, family: str, device: torch.device) -> AppliedProfile:
    """Apply ``profile`` to a pipeline loaded on the CPU; moves it to ``device`` (or sets up offload to it).

    Order matters: memory format and fused projections change modules before quantisation swaps their weights,
    quantisation precedes compilation (so the compiled code sees the quantised kernels), and the step cache's
    hooks go on last (outside the compiled blocks, so its per-step decision does not break their graphs).
    """
    quantize = check_profile(profile, family, device)
    result = AppliedProfile(profile=profile, quantize=quantize)
    denoiser = pipe.transformer if family == "flux" else pipe.unet
    if profile.channels_last:
        denoiser.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        result.applied.append("channels_last")
    if profile.fuse_qkv:
        denoiser.fuse_qkv_projections()
        result.applied.append("fuse_qkv")
    _place(pipe, profile, device, result)
    if quantize != "none":
        _quantise(denoiser, quantize)
        result.applied.append(f"quantize:{quantize}")
    if profile.attention_backend is not None:
        denoiser.set_attention_backend(profile.attention_backend)
        result.applied.append(f"attention:{profile.attention_backend}")
    if profile.vae_tiling:
        pipe.vae.enable_tiling()
        result.applied.append("vae_tiling")
    if profile.vae_slicing:
        pipe.vae.enable_slicing()
        result.applied.append("vae_slicing")
    if profile.compile is not None:
        options = profile.compile
        raise_recompile_limit()
        denoiser.compile_repeated_blocks(
            fullgraph=options.fullgraph, dynamic=options.dynamic, mode=options.mode, options=options.options
        )
        result.applied.append("compile")
        if options.cuda_graphs:
            # marked on every device (harmless where inductor runs no graphs), reported where graphs exist
            denoiser.register_forward_pre_hook(_new_cuda_graph_step)
            if device.type == "cuda":
                result.applied.append("cuda_graphs")
            else:
                result.skipped["cuda_graphs"] = f"CUDA graphs need a CUDA device; this is {_describe(device)}"
    if profile.step_cache is not None:
        denoiser.enable_cache(step_cache_config(profile))
        result.applied.append(f"step_cache:{profile.step_cache.kind}")
    if result.skipped:
        log.info("profile %s: not applied here: %s", profile.name, result.skipped)
    return result


def _new_cuda_graph_step(module: torch.nn.Module, args) -> None:
    """A denoiser call begins: the CUDA graphs of the previous call's blocks may be replayed over.

    Regional compilation makes every block call a call of a compiled function, and torch's CUDA graph trees treat
    each such call as a new iteration unless told where iterations begin: block ``k + 1`` then replays into the
    memory holding block ``k``'s output, and the next read of it fails ("accessing tensor output of CUDAGraphs that
    has been overwritten", seen on an H200). Marked once per denoiser call, the blocks of one call form one path of
    graphs whose outputs stay valid until the next call; nothing a block returns outlives the call (the denoiser's
    own output comes from eager layers after the last block).
    """
    torch.compiler.cudagraph_mark_step_begin()


def has_compiled_blocks(model: torch.nn.Module) -> bool:
    """Whether ``model`` or any of its submodules was compiled in place (``Module.compile``: a profile's regional
    compile). Eager-only shortcuts of the identity hooks check it: compiled code must not see them."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


#: the most compiled variants dynamo keeps per code object once a profile compiles (its default is 8)
RECOMPILE_LIMIT = 64


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Let dynamo keep up to ``limit`` compiled variants of one code object (never lowers it).

    For the calling thread only: dynamo's settings set in code are per thread (``torch.utils._config_module``: "user
    overrides are thread-local", a ``ContextVar`` a new thread does not inherit), so whatever thread runs compiled
    blocks must call this (``Renderer`` does before every pipeline call; a replica renders on its own threads). It
    costs two reads when the limit is already raised.

    Regional compilation compiles a block class's ``forward`` once and shares it with every instance of the class,
    in every pipeline of the process; each variant is keyed by what its guards saw: the batch (static for 1, then
    symbolic), the layout of the block's inputs (the first block's differ from the later ones'), the identity method
    attached (IP-Adapter adds per-block keyword arguments, PuLID's hooks return contiguous tensors) and a step
    cache's compute / skip branch. A replica serving plain renders, PuLID and IP-Adapter at a few batch sizes needs
    more than dynamo's default 8; past the limit dynamo runs the frame eagerly from then on (silently, or a hard error
    under ``fullgraph=True``). What is compiled is still counted by :func:`compile_counters`.
    """
    import torch._dynamo

    config = torch._dynamo.config
    if config.recompile_limit < limit:
        config.recompile_limit = limit
    if config.accumulated_recompile_limit < 4 * limit:
        config.accumulated_recompile_limit = 4 * limit


def _place(pipe, profile: Profile, device: torch.device, result: AppliedProfile) -> None:
    if profile.offload == "none":
        pipe.to(device)
    elif device.type == "cpu":
        pipe.to(device)
        result.skipped["offload"] = "the model already lives in CPU memory"
    elif profile.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
        result.applied.append("offload:model")
    else:
        pipe.enable_sequential_cpu_offload(device=device)
        result.applied.append("offload:sequential")


def _quantise(module: torch.nn.Module, quantize: Quantisation) -> None:
    from torchao import quantization as q

    config = {
        "int8-weight-only": q.Int8WeightOnlyConfig,
        "int8-dynamic": q.Int8DynamicActivationInt8WeightConfig,
        "fp8-weight-only": q.Float8WeightOnlyConfig,
        "fp8-dynamic": q.Float8DynamicActivationFloat8WeightConfig,
    }[quantize]()
    q.quantize_(module, config)


def step_cache_config(profile: Profile):
    """The diffusers cache config of ``profile``'s step cache (its options checked by diffusers' own class)."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    assert profile.step_cache is not None
    cls = {"first-block": FirstBlockCacheConfig, "taylorseer": TaylorSeerCacheConfig, "magcache": MagCacheConfig}[
        profile.step_cache.kind
    ]
    try:
        return cls(**profile.step_cache.options)
    except TypeError as exc:
        raise ProfileError(f"profile '{profile.name}': step_cache options invalid for {cls.__name__}: {exc}") from exc


def reset_step_cache(pipe, family: str) -> None:
    """Forget the step cache's state: a pipeline call starts from nothing (diffusers resets it only when a call
    ends normally; a call stopped by cancellation or an error would leave the next one another batch's residuals)."""
    denoiser = pipe.transformer if family == "flux" else pipe.unet
    if getattr(denoiser, "_cache_config", None) is not None:
        denoiser._reset_stateful_cache()


# Step caches seen from the blocks: for identity hooks that sit on a cached transformer's blocks ------------------

#: diffusers' hook names (``diffusers.hooks``) of the step caches that skip the blocks after the first one and add a
#: cached residual instead: the First-Block cache and MagCache, each with a head-block hook and a hook on every other
#: block (the tail among them: ``is_tail``); their shared state's ``should_compute`` is the current call's decision
_RESIDUAL_CACHE_HEAD_HOOKS = ("fbc_leader_block_hook", "mag_cache_leader_block_hook")
_RESIDUAL_CACHE_HOOKS = (*_RESIDUAL_CACHE_HEAD_HOOKS, "fbc_block_hook", "mag_cache_block_hook")


def _cache_hook(block: torch.nn.Module, names: tuple[str, ...]):
    registry = getattr(block, "_diffusers_hook", None)
    if registry is None:
        return None
    for name in names:
        hook = registry.get_hook(name)
        if hook is not None:
            return hook
    return None


def _cache_state(hook):
    manager = getattr(hook, "state_manager", None)
    if manager is None or manager._context is None:  # called outside the pipeline's cache_context
        return None
    return manager.get_state()


@torch.compiler.disable
def step_skipped(block: torch.nn.Module) -> bool:
    """Whether a residual step cache answers the current call of ``block`` from its cache, with an output that already
    holds what torch forward hooks on ``block`` added on the step the cache was filled at.

    Read by identity hooks on a transformer's blocks (PuLID-FLUX): with diffusers' First-Block cache or MagCache on,
    a skipped step runs the first (head) block, then returns its output plus the residual of all other blocks cached
    at the last computed step, and every other block returns its input unchanged. That residual was measured from the
    head's own output (First-Block) or input (MagCache) to the tail's output *before* the tail's forward hooks ran, so
    it includes every forward hook's term except the tail's. Hence True for the head and inner blocks on a skipped
    step (a hook adding its term again would count it twice), False on computed steps, without such a cache (none,
    or TaylorSeer, which predicts attention outputs inside the blocks and leaves the blocks' hooks to run), and for
    the tail block (its term is not in the residual; its input on a skipped step is the cached estimate of its output,
    to which the hook adds its term as on a computed step).

    Reads diffusers' hook registry (``block._diffusers_hook``) and the caches' shared state (``should_compute``), which
    diffusers' caches keep per cache context ("cond" / "uncond"); checked against diffusers 0.42. Never traced by
    dynamo (a compiled caller would guard on, and recompile for, every value read here): call it from eager code.
    """
    hook = _cache_hook(block, _RESIDUAL_CACHE_HOOKS)
    if hook is None or getattr(hook, "is_tail", False):
        return False
    state = _cache_state(hook)
    return state is not None and not state.should_compute


def compute_step_when_changed(denoiser: torch.nn.Module, key: object) -> None:
    """Make a residual step cache (First-Block, MagCache) compute every block of the denoiser call about to start when
    ``key`` is not the one given for the previous call in the same cache context ("cond" / "uncond").

    For conditioners whose contribution changes between two steps in a way the cache cannot see coming: ``key`` is
    what decides the contribution (the identity's step phase: which samples have reached their start step). A skipped
    step would otherwise add a residual computed before the change (without the identity of a sample that just
    started). Called from a forward pre-hook on the denoiser, inside the pipeline's cache context: it drops the state
    the cache's next decision compares with (First-Block: the head's last residual; MagCache: the last residual), so
    the cache computes this call and fills its state again from it. No-op without such a cache, and on the first call
    of a pipeline call (the cache computes it anyway). The key is kept on diffusers' per-context state object, which
    diffusers drops when the cache is reset (before every pipeline call here).
    """
    state = None
    for _, child in denoiser.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child):
            state = _cache_state(_cache_hook(child[0], _RESIDUAL_CACHE_HEAD_HOOKS))
            if state is not None:
                break
    if state is None or state.__dict__.get("_imagegen_key", _NO_KEY) is key:
        return
    state.__dict__["_imagegen_key"] = key
    if hasattr(state, "head_block_residual"):
        state.head_block_residual = None
    if hasattr(state, "previous_residual"):
        state.previous_residual = None


_NO_KEY = object()


def cuda_graphs_recorded(device: torch.device) -> int | None:
    """CUDA graphs torch's graph trees have recorded so far on ``device`` in this thread (the trees are per thread);
    None off CUDA. A graph recorded again adds one: after the warm-up, a replica's calls should record none (a call
    that does reads a static input at a new address, see :mod:`imagegen.identity.fixed_address`)."""
    if device.type != "cuda":
        return None
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(device.index or 0, create_if_none_exists=False)
    if manager is None:
        return 0
    count, pending = 0, [node for nodes in manager.roots.values() for node in nodes]
    while pending:
        node = pending.pop()
        count += 1
        pending.extend(child for children in node.children.values() for child in children)
    return count


def compile_counters() -> dict[str, int]:
    """Process-wide ``torch.compile`` counters so far: take two readings and subtract.

    - ``frames_compiled``: dynamo compilations (a frame's first compile, and every recompile);
    - ``recompiles``: compilations of a frame that had been compiled before (a guard failed: new shapes, new Python
      constants, another object where one was expected);
    - ``graph_breaks``: graph breaks met while tracing (a break splits a compiled frame; the compiled code then runs
      the broken-off part eagerly on every call);
    - ``unique_graphs``: FX graphs handed to the backend;
    - ``recompile_limit_hits``: frames that hit ``torch._dynamo.config.recompile_limit`` and run eagerly from then on
      (with ``fullgraph=True`` this raises instead).

    dynamo counts compilations per frame in ``torch._dynamo.convert_frame.FRAME_COMPILE_COUNTER`` and graph breaks in
    ``torch._dynamo.utils.counters``; its ``counters["frames"]`` group stays empty under ``fullgraph=True``, so it is
    not used.
    """
    import sys

    if "torch._dynamo" not in sys.modules:
        return dict.fromkeys(
            ("frames_compiled", "recompiles", "graph_breaks", "unique_graphs", "recompile_limit_hits"), 0
        )
    from torch._dynamo.convert_frame import FRAME_COMPILE_COUNTER
    from torch._dynamo.utils import counters

    per_frame = [count for key, count in FRAME_COMPILE_COUNTER.items() if isinstance(key, int)]
    limit_hits = sum(v for k, v in counters["unimplemented"].items() if "recompile limit" in str(k).lower())
    limit_hits += sum(v for k, v in counters["graph_break"].items() if "recompile limit" in str(k).lower())
    return {
        "frames_compiled": int(sum(per_frame)),
        "recompiles": int(sum(max(count - 1, 0) for count in per_frame)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "recompile_limit_hits": int(limit_hits),
    }


#: torch.compile's phases worth reporting (``torch._dynamo.utils.compile_times``, seconds summed over every compile):
#: the whole of dynamo's compile, its bytecode tracing, the backend (AOT autograd + inductor) and within it inductor's
#: code generation, the wait for kernels compiled in worker processes (Triton / C++), loading compiled modules, the
#: loads of cache hits, and guards
COMPILE_PHASES = {
    "_compile.compile_inner": "dynamo_total",
    "bytecode_tracing": "tracing",
    "OutputGraph.call_user_compiler": "backend",
    "compile_fx_inner": "inductor",
    "GraphLowering.codegen": "codegen",
    "async_compile.wait": "kernel_compile_wait",
    "PyCodeCache.load_by_key_path": "module_load",
    "AOTAutogradCache.inductor_load": "cache_load",
    "build_guards": "guards",
}


def compile_phase_seconds() -> dict[str, float]:
    """Seconds spent so far in each of :data:`COMPILE_PHASES` (take two readings and subtract): a replica's warm-up
    reports them, and so does ``bench/gpu_check.py`` per row (FLUX ``fastest``'s first call took 336 s on an H200:
    tracing, inductor or kernel compiles?). Zeros when dynamo was never imported."""
    import sys

    if "torch._dynamo.utils" not in sys.modules:
        return dict.fromkeys(COMPILE_PHASES.values(), 0.0)
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    seconds = dict(zip(names, values, strict=False))
    return {label: float(seconds.get(name, 0.0)) for name, label in COMPILE_PHASES.items()}
