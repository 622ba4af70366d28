"""PuLID weights: the released checkpoints, loaded from local safetensors files the asset store resolved.

The files (declared in ``configs/assets.yaml``, fetched and converted by ``imagegen models pull``):

- ``pulid_flux_v0.9.1.safetensors`` (``guozinan/PuLID``): ``pulid_encoder.*`` (IDFormer) + ``pulid_ca.{0..19}.*``.
- ``pulid_v1.1.safetensors`` (``guozinan/PuLID``): ``id_adapter.*`` + ``id_adapter_attn_layers.{i}.id_to_k|v``.
- EVA02-CLIP-L-14-336 (``QuanSun/EVA-CLIP`` ``EVA02_CLIP_L_336_psz14_s6B.pt``), published only as a pickle: the
  asset store converts it once to safetensors with ``torch.load(weights_only=True)``; this module only ever reads
  safetensors.

Sizes are read from the weights themselves (or from the file's ``imagegen.pulid`` safetensors metadata when it has
one), so a file of other sizes in the released layout (the tiny presets' stand-ins) loads through the same code.
Every loaded file carries its sha256 (:func:`file_sha256`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from imagegen.errors import ImagegenError, UnsafeCheckpointError
from imagegen.files import atomic_write
from imagegen.identity.pulid.encoder import IDFormer, IDFormerConfig
from imagegen.identity.pulid.eva_clip import EvaClipConfig, EvaClipVision
from imagegen.identity.pulid.flux_ca import (
    CrossAttentionConfig,
    PerceiverAttentionCA,
    PulidFluxHandle,
    attach_pulid_flux,
)
from imagegen.identity.pulid.sdxl_processor import PREFIX as SDXL_LAYER_PREFIX
from imagegen.identity.pulid.sdxl_processor import PulidSDXLHandle, attach_pulid_sdxl
from imagegen.pipelines.assets import PICKLE_SUFFIXES, file_sha256

log = logging.getLogger(__name__)

#: method names of configs/models.yaml
FLUX_METHOD = "pulid-flux-v0.9.1"
SDXL_METHOD = "pulid-sdxl-v1.1"
#: safetensors metadata key holding the sizes of a file as JSON (files imagegen writes)
METADATA_KEY = "imagegen.pulid"

__all__ = ["file_sha256", "load_pulid_flux", "load_pulid_sdxl", "load_eva_clip"]


class PulidWeightsError(ImagegenError):
    """A PuLID / EVA-CLIP checkpoint that does not have the expected layout."""

    code = "pulid_weights"


# files ------------------------------------------------------------------------------------------------------


def check_format(path: Path) -> None:
    """Refuse pickle checkpoints: the asset store converts them to safetensors first."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeCheckpointError(
            f"{path.name} is a pickle checkpoint, which can run arbitrary code when loaded, and is refused. "
            "`imagegen models pull` converts the released pickles to safetensors (torch.load(weights_only=True))."
        )


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, safetensors metadata)`` of a safetensors checkpoint, on the CPU."""
    path = Path(path)
    check_format(path)
    if not path.is_file():
        raise PulidWeightsError(f"checkpoint {path} does not exist")
    from safetensors import safe_open

    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:
        raise PulidWeightsError(f"{path} is not a readable safetensors file ({exc})") from exc
    return tensors, metadata


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: Path, metadata: Mapping | None = None) -> Path:
    """Write ``state_dict`` atomically (temporary file renamed into place), sizes in the metadata."""
    from safetensors.torch import save_file

    # one metadata entry at most: safetensors writes the metadata map in no fixed order, and a written file must be
    # the same bytes (the same sha256) on every build
    meta = {METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata is not None else None
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _file_config(metadata: Mapping[str, str]) -> dict:
    raw = metadata.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def _subdict(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _load_module(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, dtype, device) -> nn.Module:
    try:
        module.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        raise PulidWeightsError(f"{what} does not match the expected layout: {str(exc)[:600]}") from exc
    module.to(device=device or "cpu", dtype=dtype or torch.float32)
    return module.eval().requires_grad_(False)


def build_idformer(
    state_dict: Mapping[str, torch.Tensor], config: IDFormerConfig | None = None, dtype=None, device=None
) -> IDFormer:
    """An IDFormer loaded (``strict=True``) from its unprefixed state dict; sizes read from it by default."""
    if config is None:
        try:
            config = IDFormerConfig.from_state_dict(state_dict)
        except (KeyError, ValueError, IndexError) as exc:
            raise PulidWeightsError(f"cannot read the IDFormer's sizes from the checkpoint ({exc!r})") from exc
    with torch.device("meta"):
        module = IDFormer(config)
    return _load_module(module, state_dict, "IDFormer", dtype, device)


def build_cross_attentions(
    state_dict: Mapping[str, torch.Tensor], config: CrossAttentionConfig | None = None, dtype=None, device=None
) -> nn.ModuleList:
    """``pulid_ca.{i}.*`` → ``ModuleList`` of :class:`PerceiverAttentionCA` (``strict=True`` each)."""
    count = len({k.split(".")[1] for k in state_dict if k.startswith("pulid_ca.")})
    if count == 0:
        raise PulidWeightsError("no pulid_ca.* cross-attention weights in the checkpoint")
    modules = nn.ModuleList()
    for i in range(count):
        sub = _subdict(state_dict, f"pulid_ca.{i}.")
        try:
            cfg = config or CrossAttentionConfig.from_state_dict(sub)
        except (KeyError, ValueError) as exc:
            raise PulidWeightsError(f"cannot read pulid_ca.{i}'s sizes from the checkpoint ({exc!r})") from exc
        with torch.device("meta"):
            module = PerceiverAttentionCA(cfg)
        modules.append(_load_module(module, sub, f"pulid_ca.{i}", dtype, device))
    return modules


# released PuLID models ----------------------------------------------------------------------------------


@dataclass
class PulidFluxWeights:
    """PuLID-FLUX: the id encoder and the cross-attentions, with the file's hash."""

    encoder: IDFormer
    cross_attentions: nn.ModuleList
    double_interval: int = 2
    single_interval: int = 4
    sha256: str = ""
    path: Path | None = None
    method: str = FLUX_METHOD

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], metadata: Mapping | None = None, dtype=None, device=None, **extra
    ) -> PulidFluxWeights:
        config = dict(metadata or {})
        if not any(k.startswith("pulid_encoder.") for k in state_dict):
            raise PulidWeightsError("no pulid_encoder.* keys: not a PuLID-FLUX checkpoint (pulid_flux_v0.9.x)")
        encoder_config = IDFormerConfig(**config["idformer"]) if "idformer" in config else None
        ca_config = CrossAttentionConfig(**config["ca"]) if "ca" in config else None
        encoder = build_idformer(_subdict(state_dict, "pulid_encoder."), encoder_config, dtype, device)
        cas = build_cross_attentions(state_dict, ca_config, dtype, device)
        unknown = [k for k in state_dict if not k.startswith(("pulid_encoder.", "pulid_ca."))]
        if unknown:
            raise PulidWeightsError(f"unexpected keys in a PuLID-FLUX checkpoint: {unknown[:5]}")
        intervals = config.get("double_interval", 2), config.get("single_interval", 4)
        return cls(encoder, cas, *intervals, **extra)

    def attach(self, transformer: nn.Module) -> PulidFluxHandle:
        """Hook the cross-attentions into a diffusers ``FluxTransformer2DModel`` (see :func:`attach_pulid_flux`)."""
        return attach_pulid_flux(transformer, self.cross_attentions, self.double_interval, self.single_interval)

    @property
    def cache_key(self) -> str:
        return f"{self.method}:{self.sha256}"


@dataclass
class PulidSDXLWeights:
    """PuLID v1.1 for SDXL: the id encoder and the per-layer ``id_to_k``/``id_to_v`` weights."""

    encoder: IDFormer
    layer_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    sha256: str = ""
    path: Path | None = None
    method: str = SDXL_METHOD

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], metadata: Mapping | None = None, dtype=None, device=None, **extra
    ) -> PulidSDXLWeights:
        config = dict(metadata or {})
        if not any(k.startswith("id_adapter.") for k in state_dict):
            raise PulidWeightsError("no id_adapter.* keys: not a PuLID SDXL checkpoint (pulid_v1.1)")
        encoder_config = IDFormerConfig(**config["idformer"]) if "idformer" in config else None
        encoder = build_idformer(_subdict(state_dict, "id_adapter."), encoder_config, dtype, device)
        layers = {k: v for k, v in state_dict.items() if k.startswith(SDXL_LAYER_PREFIX)}
        if not layers:
            raise PulidWeightsError("no id_adapter_attn_layers.* weights in the PuLID SDXL checkpoint")
        unknown = [k for k in state_dict if not k.startswith(("id_adapter.", SDXL_LAYER_PREFIX))]
        if unknown:
            raise PulidWeightsError(f"unexpected keys in a PuLID SDXL checkpoint: {unknown[:5]}")
        return cls(encoder, layers, **extra)

    def attach(self, unet: nn.Module) -> PulidSDXLHandle:
        """Install the processors on a diffusers ``UNet2DConditionModel`` (see :func:`attach_pulid_sdxl`)."""
        return attach_pulid_sdxl(unet, self.layer_weights)

    @property
    def cache_key(self) -> str:
        return f"{self.method}:{self.sha256}"


def load_pulid_flux(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> PulidFluxWeights:
    """PuLID-FLUX v0.9.1 from a local safetensors file."""
    tensors, metadata = read_state_dict(path)
    log.info("loading PuLID-FLUX weights from %s", path)
    return PulidFluxWeights.from_state_dict(
        tensors, _file_config(metadata), dtype, device, sha256=file_sha256(path), path=Path(path)
    )


def load_pulid_sdxl(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> PulidSDXLWeights:
    """PuLID v1.1 (SDXL) from a local safetensors file."""
    tensors, metadata = read_state_dict(path)
    log.info("loading PuLID SDXL weights from %s", path)
    return PulidSDXLWeights.from_state_dict(
        tensors, _file_config(metadata), dtype, device, sha256=file_sha256(path), path=Path(path)
    )


@dataclass
class EvaClipWeights:
    model: EvaClipVision
    sha256: str = ""
    path: Path | None = None

    @property
    def config(self) -> EvaClipConfig:
        return self.model.config


def load_eva_clip(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    config: EvaClipConfig | None = None,
) -> EvaClipWeights:
    """The EVA02-CLIP visual tower from a safetensors file (the converted official checkpoint, ``visual.*``).

    Sizes: ``config`` when given, else read from the weights (EVA02-CLIP-L-14-336's for the released file).
    """
    tensors, _ = read_state_dict(path)
    try:
        config = config or EvaClipConfig.from_state_dict(tensors)
        model = EvaClipVision(config)
        model.load_checkpoint(tensors)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise PulidWeightsError(f"{Path(path).name} is not an EVA02-CLIP checkpoint: {str(exc)[:600]}") from exc
    model.to(device=device or "cpu", dtype=dtype or torch.float32).eval().requires_grad_(False)
    return EvaClipWeights(model, sha256=file_sha256(path), path=Path(path))
