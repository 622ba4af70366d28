"""PuLID weights: the released checkpoints (hub or local file, safetensors only) and the tiny seeded ones.

Released checkpoints (``guozinan/PuLID`` on the Hugging Face hub, cached under ``IMAGEGEN_HOME/models/hub``):

- ``pulid_flux_v0.9.1.safetensors``: ``pulid_encoder.*`` (IDFormer) + ``pulid_ca.{0..19}.*`` (cross-attentions).
- ``pulid_v1.1.safetensors``: ``id_adapter.*`` (IDFormer) + ``id_adapter_attn_layers.{i}.id_to_k|v.weight``.
- EVA02-CLIP-L-14-336 (``QuanSun/EVA-CLIP`` ``EVA02_CLIP_L_336_psz14_s6B.pt``) is only published as a pickle;
  it is refused unless ``allow_pickle=True``. :func:`convert_to_safetensors` turns it into a safetensors file
  once, which is then loaded like any other.

Every loaded file carries its sha256 (:func:`file_sha256`), which goes into the cache key of anything computed
from it (id tokens of a character, say).

Tiny weights (for the ``tiny-flux`` / ``tiny-sdxl`` presets) have the released key layout at toy sizes, with every
tensor drawn from a generator seeded by the CRC32 of its key (the recipe of the parity fixtures). Their sizes are
stored in the file's safetensors metadata (``imagegen.pulid``), so the same loader reads them:

==================  =================================================================================
tiny EVA-CLIP       112 px, patch 14 (65 tokens), width 64, 6 blocks of 2 heads, embedding 32;
                    hidden states entering blocks 1..5
tiny IDFormer       dim 32, depth 5 (one layer per scale), 2 heads of 16, 2 id tokens, 8 queries, ff x2,
                    id vector 512 (ArcFace) + 32 (tiny EVA) = 544, mapping MLPs 64 wide, ViT width 64;
                    output 48 for FLUX, 64 (the tiny UNet's cross-attention width) for SDXL
tiny FLUX CAs       width 64 (the tiny transformer's), 2 heads of 32, id width 48; intervals 2 / 4 over the
                    tiny transformer's 3 double / 5 single blocks: after double 0, 2 and single 0, 4 (4 CAs)
tiny SDXL layers    one ``id_to_k``/``id_to_v`` pair per cross-attention of the tiny UNet (64 → its width)
==================  =================================================================================
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from imagegen.errors import ImagegenError, ModelNotAvailableError, UnsafeCheckpointError
from imagegen.identity.pulid.encoder import IDFormer, IDFormerConfig
from imagegen.identity.pulid.eva_clip import (
    EVA02_CLIP_L_336,
    TINY_EVA_CLIP,
    EvaClipConfig,
    EvaClipVision,
    to_official_state_dict,
)
from imagegen.identity.pulid.flux_ca import (
    CrossAttentionConfig,
    PerceiverAttentionCA,
    PulidFluxHandle,
    attach_pulid_flux,
    ca_positions,
)
from imagegen.identity.pulid.sdxl_processor import PREFIX as SDXL_LAYER_PREFIX
from imagegen.identity.pulid.sdxl_processor import PulidSDXLHandle, attach_pulid_sdxl, cross_attention_layers
from imagegen.settings import Settings, get_settings

log = logging.getLogger(__name__)

PULID_REPO = "guozinan/PuLID"
PULID_FLUX_FILE = "pulid_flux_v0.9.1.safetensors"
PULID_SDXL_FILE = "pulid_v1.1.safetensors"
EVA_CLIP_REPO = "QuanSun/EVA-CLIP"
EVA_CLIP_FILE = "EVA02_CLIP_L_336_psz14_s6B.pt"
#: method names of configs/models.yaml
FLUX_METHOD = "pulid-flux-v0.9.1"
SDXL_METHOD = "pulid-sdxl-v1.1"

#: safetensors metadata key holding the sizes of a (tiny) file as JSON
METADATA_KEY = "imagegen.pulid"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: bump when the tiny sizes or their seeding change; older tiny files are rebuilt
TINY_PULID_VERSION = 1
TINY_DIR = Path("tiny") / "pulid"

TINY_IDFORMER = IDFormerConfig(
    dim=32,
    depth=5,
    dim_head=16,
    heads=2,
    num_id_token=2,
    num_queries=8,
    output_dim=48,
    ff_mult=2,
    id_dim=512 + TINY_EVA_CLIP.output_dim,
    id_hidden=64,
    vit_dim=TINY_EVA_CLIP.embed_dim,
    vit_hidden=64,
)
TINY_FLUX_CA = CrossAttentionConfig(dim=64, dim_head=32, heads=2, kv_dim=TINY_IDFORMER.output_dim)
TINY_FLUX_INTERVALS = (2, 4)
#: the tiny UNet's cross_attention_dim (2 x the tiny text encoders' width)
TINY_SDXL_CROSS_DIM = 64


class PulidWeightsError(ImagegenError):
    """A PuLID / EVA-CLIP checkpoint that does not have the expected layout."""

    code = "pulid_weights"


# files ------------------------------------------------------------------------------------------------------


def hub_cache_dir(settings: Settings | None = None) -> Path:
    """Where hub downloads are cached: the same cache diffusers pipelines use (``<model cache>/hub``)."""
    return (settings or get_settings()).model_cache / "hub"


def resolve_file(
    source: str | os.PathLike | None,
    repo: str,
    filename: str,
    *,
    allow_pickle: bool = False,
    settings: Settings | None = None,
) -> Path:
    """A local checkpoint path: ``source`` when given (a file), else ``filename`` of hub ``repo`` (downloaded
    into the model cache unless downloads are disabled). Pickle formats are refused before any download."""
    settings = settings or get_settings()
    if source is not None:
        path = Path(source).expanduser()
        check_format(path, allow_pickle)
        if not path.is_file():
            raise ModelNotAvailableError(f"checkpoint {path} does not exist; pass the path of a .safetensors file")
        return path
    check_format(Path(filename), allow_pickle)
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(
                repo,
                filename,
                cache_dir=str(hub_cache_dir(settings)),
                local_files_only=not settings.allow_downloads,
            )
        )
    except Exception as exc:  # huggingface_hub raises several unrelated types for "not there"
        hint = (
            "downloads are disabled (IMAGEGEN_ALLOW_DOWNLOADS=false)"
            if not settings.allow_downloads
            else "the download failed (no network access to the hub?)"
        )
        raise ModelNotAvailableError(
            f"'{filename}' of {repo} is not in the model cache {hub_cache_dir(settings)} and {hint}. Run once on "
            f"a machine with hub access, or pass the local path of the file. ({str(exc).splitlines()[0][:200]})"
        ) from exc


def check_format(path: Path, allow_pickle: bool) -> None:
    """Refuse pickle checkpoints unless the caller opted in."""
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{path.name} is a pickle checkpoint, which can run arbitrary code when loaded, and is refused. "
            "Convert it to safetensors (imagegen.identity.pulid.weights.convert_to_safetensors) or pass "
            "allow_pickle=True if you trust its source."
        )


def read_state_dict(path: Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, safetensors metadata)`` of a checkpoint file, on the CPU."""
    check_format(path, allow_pickle)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "module"):
            if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
                loaded = loaded[key]
        return dict(loaded), {}
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


_HASHES: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (remembered per path, size and mtime within the process)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _HASH_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _HASH_LOCK:
        _HASHES[key] = value
    return value


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: Path, metadata: Mapping | None = None) -> Path:
    """Write ``state_dict`` atomically (temporary file renamed into place), sizes in the metadata."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # one metadata entry at most: safetensors writes the metadata map in no fixed order, and a tiny file must be
    # the same bytes (the same sha256) on every build
    meta = {METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata is not None else None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def convert_to_safetensors(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Turn a trusted pickle checkpoint (e.g. the official EVA-CLIP ``.pt``) into a safetensors file."""
    tensors, _ = read_state_dict(Path(source), allow_pickle=True)
    tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    return save_safetensors(tensors, Path(target))


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


# released / tiny PuLID models ----------------------------------------------------------------------------------


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
    source: str | os.PathLike | None = None,
    *,
    allow_pickle: bool = False,
    settings: Settings | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> PulidFluxWeights:
    """PuLID-FLUX v0.9.1 from ``source`` (a local file) or, by default, from the hub."""
    path = resolve_file(source, PULID_REPO, PULID_FLUX_FILE, allow_pickle=allow_pickle, settings=settings)
    tensors, metadata = read_state_dict(path, allow_pickle)
    log.info("loading PuLID-FLUX weights from %s", path)
    return PulidFluxWeights.from_state_dict(
        tensors, _file_config(metadata), dtype, device, sha256=file_sha256(path), path=path
    )


def load_pulid_sdxl(
    source: str | os.PathLike | None = None,
    *,
    allow_pickle: bool = False,
    settings: Settings | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> PulidSDXLWeights:
    """PuLID v1.1 (SDXL) from ``source`` (a local file) or, by default, from the hub."""
    path = resolve_file(source, PULID_REPO, PULID_SDXL_FILE, allow_pickle=allow_pickle, settings=settings)
    tensors, metadata = read_state_dict(path, allow_pickle)
    log.info("loading PuLID SDXL weights from %s", path)
    return PulidSDXLWeights.from_state_dict(
        tensors, _file_config(metadata), dtype, device, sha256=file_sha256(path), path=path
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
    source: str | os.PathLike | None = None,
    *,
    allow_pickle: bool = False,
    settings: Settings | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    config: EvaClipConfig | None = None,
) -> EvaClipWeights:
    """The EVA02-CLIP-L-14-336 visual tower from ``source`` or the official (pickle) checkpoint on the hub.

    Sizes: ``config`` when given, else the file's metadata (tiny files), else EVA02-CLIP-L-14-336's.
    """
    path = resolve_file(source, EVA_CLIP_REPO, EVA_CLIP_FILE, allow_pickle=allow_pickle, settings=settings)
    tensors, metadata = read_state_dict(path, allow_pickle)
    if config is None:
        stored = _file_config(metadata)
        config = EvaClipConfig(**stored["eva_clip"]) if "eva_clip" in stored else EVA02_CLIP_L_336
    model = EvaClipVision(config)
    try:
        model.load_checkpoint(tensors)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise PulidWeightsError(f"{path.name} is not an EVA02-CLIP-L-14-336 checkpoint: {str(exc)[:600]}") from exc
    model.to(device=device or "cpu", dtype=dtype or torch.float32).eval().requires_grad_(False)
    return EvaClipWeights(model, sha256=file_sha256(path), path=path)


# seeded / tiny weights -----------------------------------------------------------------------------------------


def seeded_state_dict(shapes: Mapping[str, tuple[int, ...]], std: float = 0.02) -> dict[str, torch.Tensor]:
    """Deterministic weights: each tensor drawn from a generator seeded by the CRC32 of its key.

    1-D ``*.weight`` (norm scales) are ``1 + 0.1 x``, biases ``0.02 x``, everything else ``std * x`` with
    ``x ~ N(0, 1)``: the recipe of the parity fixtures, so tiny files are reproducible anywhere.
    """
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        x = torch.randn(shape, generator=generator, dtype=torch.float32)
        if key.endswith(".weight") and len(shape) == 1:
            x = 1.0 + 0.1 * x
        elif key.endswith(".bias"):
            x = 0.02 * x
        else:
            x = std * x
        out[key] = x
    return out


def _shapes(module: nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def tiny_flux_state_dict(
    idformer: IDFormerConfig = TINY_IDFORMER,
    ca: CrossAttentionConfig = TINY_FLUX_CA,
    num_double: int = 3,
    num_single: int = 5,
    intervals: tuple[int, int] = TINY_FLUX_INTERVALS,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Seeded PuLID-FLUX weights (released key layout) for a transformer of ``num_double``/``num_single`` blocks."""
    count = len(ca_positions(num_double, num_single, *intervals))
    with torch.device("meta"):
        shapes = _shapes(IDFormer(idformer), "pulid_encoder.")
        for i in range(count):
            shapes.update(_shapes(PerceiverAttentionCA(ca), f"pulid_ca.{i}."))
    metadata = {
        "kind": "flux",
        "version": TINY_PULID_VERSION,
        "idformer": idformer.to_dict(),
        "ca": ca.to_dict(),
        "double_interval": intervals[0],
        "single_interval": intervals[1],
    }
    return seeded_state_dict(shapes), metadata


def tiny_sdxl_state_dict(unet: nn.Module, idformer: IDFormerConfig | None = None) -> tuple[dict, dict]:
    """Seeded PuLID v1.1 weights for ``unet`` (any diffusers ``UNet2DConditionModel``, meta device is fine)."""
    cross_dim = int(unet.config.cross_attention_dim)
    idformer = idformer or IDFormerConfig(**{**TINY_IDFORMER.to_dict(), "output_dim": cross_dim})
    with torch.device("meta"):
        shapes = _shapes(IDFormer(idformer), "id_adapter.")
    for index, _, module in cross_attention_layers(unet):
        shape = (module.to_k.out_features, module.to_k.in_features)
        shapes[f"{SDXL_LAYER_PREFIX}{index}.id_to_k.weight"] = shape
        shapes[f"{SDXL_LAYER_PREFIX}{index}.id_to_v.weight"] = shape
    metadata = {"kind": "sdxl", "version": TINY_PULID_VERSION, "idformer": idformer.to_dict()}
    return seeded_state_dict(shapes), metadata


def tiny_eva_clip_state_dict(config: EvaClipConfig = TINY_EVA_CLIP) -> tuple[dict, dict]:
    """Seeded EVA-CLIP weights in the official checkpoint's layout (``visual.*``)."""
    with torch.device("meta"):
        model = EvaClipVision(config)
    shapes = {k: tuple(v.shape) for k, v in to_official_state_dict(model).items()}
    return seeded_state_dict(shapes), {"kind": "eva_clip", "version": TINY_PULID_VERSION, "eva_clip": config.to_dict()}


TINY_FILES = {
    "flux": "pulid_flux_tiny.safetensors",
    "sdxl": "pulid_sdxl_tiny.safetensors",
    "eva_clip": "eva02_clip_tiny.safetensors",
}


def tiny_weights_path(kind: str, settings: Settings | None = None) -> Path:
    if kind not in TINY_FILES:
        raise KeyError(f"unknown tiny PuLID weights '{kind}'; known: {', '.join(sorted(TINY_FILES))}")
    return (settings or get_settings()).model_cache / TINY_DIR / TINY_FILES[kind]


def _tiny_is_current(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return _file_config(f.metadata() or {}).get("version") == TINY_PULID_VERSION
    except Exception:
        return False


def _tiny_sdxl_unet(settings: Settings):
    """The tiny preset's UNet architecture (meta device), read from the tiny SDXL repo's config."""
    from diffusers import UNet2DConditionModel

    from imagegen.pipelines.tiny import ensure_tiny_repo

    repo = ensure_tiny_repo("sdxl", settings.model_cache)
    config = UNet2DConditionModel.load_config(str(repo / "unet"))
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def ensure_tiny_weights(kind: str, settings: Settings | None = None, force: bool = False) -> Path:
    """Write the tiny ``flux`` / ``sdxl`` / ``eva_clip`` weights into the model cache unless current; their path.

    The tiny FLUX sizes fit :mod:`imagegen.pipelines.tiny`'s transformer (width 64, 3 double / 5 single
    blocks); the SDXL layers are generated from the tiny SDXL repo's UNet config, so they always match it.
    """
    settings = settings or get_settings()
    path = tiny_weights_path(kind, settings)
    if _tiny_is_current(path) and not force:
        return path
    log.info("writing tiny PuLID %s weights to %s", kind, path)
    if kind == "flux":
        tensors, metadata = tiny_flux_state_dict()
    elif kind == "sdxl":
        tensors, metadata = tiny_sdxl_state_dict(_tiny_sdxl_unet(settings))
    else:
        tensors, metadata = tiny_eva_clip_state_dict()
    return save_safetensors(tensors, path, metadata)


def load_tiny_pulid_flux(settings: Settings | None = None, **kwargs) -> PulidFluxWeights:
    return load_pulid_flux(ensure_tiny_weights("flux", settings), settings=settings, **kwargs)


def load_tiny_pulid_sdxl(settings: Settings | None = None, **kwargs) -> PulidSDXLWeights:
    return load_pulid_sdxl(ensure_tiny_weights("sdxl", settings), settings=settings, **kwargs)


def load_tiny_eva_clip(settings: Settings | None = None, **kwargs) -> EvaClipWeights:
    return load_eva_clip(ensure_tiny_weights("eva_clip", settings), settings=settings, **kwargs)
