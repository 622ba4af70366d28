"""Load a preset's diffusers pipeline once, on the right device and dtype.

Every preset goes through ``from_pretrained``: tiny presets from the repo ``tiny.py`` wrote to the
model cache, real presets from the hub cache (``IMAGEGEN_HOME/models/hub``, filled by
``imagegen models pull``) or a local directory. Loading never downloads: a missing model is one line
naming the ``models pull`` command (:func:`imagegen.pipelines.assets.preflight` checks it, and every
identity asset, before anything loads). Only safetensors are loaded unless the preset opts into pickle
weights.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from imagegen.errors import ModelNotAvailableError, UnsafeCheckpointError
from imagegen.pipelines.presets import Preset
from imagegen.pipelines.profiles import AppliedProfile, Profile, apply_profile, check_profile, profile_for
from imagegen.pipelines.tiny import ensure_tiny_repo
from imagegen.settings import Settings, get_settings

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(settings: Settings | None = None) -> torch.device:
    """CUDA when there is one (unless IMAGEGEN_DEVICE says otherwise), else CPU."""
    choice = (settings or get_settings()).device
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def pick_dtype(preset: Preset, device: torch.device) -> torch.dtype:
    """The preset's dtype on CUDA; float32 on CPU, where half precision is slow or unsupported."""
    return DTYPES[preset.dtype] if device.type == "cuda" else torch.float32


def pipeline_class(family: str):
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    return {"flux": FluxPipeline, "sdxl": StableDiffusionXLPipeline}[family]


def load_pipeline(
    preset: Preset,
    device: torch.device,
    dtype: torch.dtype,
    settings: Settings | None = None,
    profile: Profile | None = None,
):
    """The preset's pipeline on ``device``, optimised by ``profile`` (default: the preset's)."""
    return load_optimised_pipeline(preset, device, dtype, settings, profile)[0]


def load_optimised_pipeline(
    preset: Preset,
    device: torch.device,
    dtype: torch.dtype,
    settings: Settings | None = None,
    profile: Profile | None = None,
) -> tuple[Any, AppliedProfile]:
    """The preset's pipeline, loaded through ``from_pretrained``, optimised by ``profile`` (default: the preset's)
    and moved to ``device``; with what the profile applied."""
    settings = settings or get_settings()
    profile = profile or profile_for(preset, settings=settings)
    check_profile(profile, preset.family, device)  # before minutes of loading
    _quiet_library_progress_bars()
    cls = pipeline_class(preset.family)
    kwargs: dict = {"dtype": dtype, "use_safetensors": not preset.allow_pickle}
    if preset.family == "sdxl":
        kwargs["add_watermarker"] = False  # outputs are watermarked by imagegen itself, robustly
    if preset.is_tiny:
        source = str(ensure_tiny_repo(preset.tiny_name, settings.model_cache))
        kwargs["local_files_only"] = True
    else:
        source = preset.repo
        kwargs["cache_dir"] = str(settings.model_cache / "hub")
        kwargs["local_files_only"] = True  # `imagegen models pull` downloads; a render never does
        if preset.variant:
            kwargs["variant"] = preset.variant
        if preset.vae:
            from diffusers import AutoencoderKL

            kwargs["vae"] = _from_pretrained(AutoencoderKL, preset.vae, preset, dict(kwargs, variant=None))
    pipe = _from_pretrained(cls, source, preset, kwargs)
    applied = apply_profile(pipe, profile, preset.family, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, applied


def _quiet_library_progress_bars() -> None:
    """diffusers/transformers draw a bar per component; imagegen shows its own progress instead."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _from_pretrained(cls, source: str, preset: Preset, kwargs: dict):
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if cls.__name__ == "AutoencoderKL":
        kwargs.pop("add_watermarker", None)
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        text = str(exc)
        if "safetensors" in text and not preset.allow_pickle:
            raise UnsafeCheckpointError(
                f"preset '{preset.name}': {source} has no safetensors weights; pickle checkpoints can run "
                "arbitrary code and are refused. Convert the weights to safetensors, or set "
                "`allow_pickle: true` on the preset if you trust the source."
            ) from exc
        raise ModelNotAvailableError(
            f"preset '{preset.name}' needs '{source}', which is not complete in the model cache "
            f"{get_settings().model_cache}; run `imagegen models pull {preset.name}` (or point the preset's repo "
            f"at a local diffusers directory). ({text.splitlines()[0][:200]})"
        ) from exc
