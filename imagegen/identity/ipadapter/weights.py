"""IP-Adapter checkpoints: the released files and their key layouts.

The files are assets of the manifest (``configs/assets.yaml``), fetched and converted by ``imagegen models pull``;
the same code reads the released files and the tiny presets' stand-ins (diffusers' ``load_ip_adapter`` for the
adapters, transformers' ``CLIPVisionModelWithProjection.from_pretrained`` for the image encoders):

- ``ipadapter-plus-face-sdxl``: ``h94/IP-Adapter`` ``sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors``;
  image encoder ``h94/IP-Adapter`` ``models/image_encoder`` (OpenCLIP ViT-H/14).
- ``ipadapter-faceid-plusv2-sdxl``: ``h94/IP-Adapter-FaceID`` ``ip-adapter-faceid-plusv2_sdxl.bin``, released as a
  pickle only and converted once to safetensors by the asset store (``torch.load(weights_only=True)``, nested
  groups flattened to ``image_proj.*`` / ``ip_adapter.*`` as h94's safetensors files are); image encoder as above
  (FaceID-Plus was trained with the same ViT-H); face embedding: insightface ``buffalo_l``.
- ``ipadapter-flux``: ``XLabs-AI/flux-ip-adapter`` ``ip_adapter.safetensors``; image encoder
  ``openai/clip-vit-large-patch14`` (its root folder).

Key layouts:

- h94 SDXL adapters: ``image_proj.*`` (plus-face: the Resampler, ``latents``, ``proj_in``, ``layers.{0..3}.0``
  (``norm1``, ``norm2``, ``to_q``, ``to_kv``, ``to_out``) and ``.1`` (``0`` LayerNorm, ``1``/``3`` Linear),
  ``proj_out``, ``norm_out``; FaceID-Plus: ``proj.0|2`` (the ArcFace MLP), ``norm`` and the same resampler under
  ``perceiver_resampler.``) and ``ip_adapter.{i}.to_k_ip|to_v_ip.weight`` for every cross-attention processor
  ``i`` (the index among *all* processors of the UNet, in diffusers' ``attn_processors`` order: 1, 3, 5 ...).
  FaceID files also hold the LoRA of every processor: ``ip_adapter.{i}.to_q|to_k|to_v|to_out_lora.down|up.weight``.
- XLabs FLUX adapter: ``ip_adapter_proj_model.proj|norm.*`` and
  ``double_blocks.{i}.processor.ip_adapter_double_stream_k_proj|v_proj.weight|bias`` for every double block.
- image encoders: a ``CLIPVisionModelWithProjection`` folder, ``config.json`` + ``model.safetensors``.

The tiny presets' stand-ins of these files are written by :mod:`imagegen.standins`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from imagegen.errors import ImagegenError
from imagegen.pipelines.assets import file_sha256

log = logging.getLogger(__name__)

#: method names of configs/models.yaml
PLUS_FACE_SDXL_METHOD = "ipadapter-plus-face-sdxl"
FACEID_PLUSV2_SDXL_METHOD = "ipadapter-faceid-plusv2-sdxl"
FLUX_METHOD = "ipadapter-flux"

ARCFACE_DIM = 512
RESAMPLER_DEPTH = 4  # diffusers' IP-Adapter Plus / FaceID-Plus projections are built with depth 4
PLUS_NUM_QUERIES = 16
FACEID_NUM_TOKENS = 4
FLUX_NUM_TOKENS = 4


class IPAdapterWeightsError(ImagegenError):
    """An IP-Adapter checkpoint that does not have the expected layout."""

    code = "ipadapter_weights"


@dataclass(frozen=True)
class AdapterSource:
    """Where a method's adapter and image encoder are published."""

    repo: str
    #: folder of the weight file inside the repository ("" at its root)
    subfolder: str
    weight_name: str
    encoder_repo: str
    #: folder of the image encoder inside its repository ("" at its root)
    encoder_subfolder: str
    #: the file the publisher released, when ``weight_name`` is a local conversion of it (a pickle)
    released_name: str | None = None


PLUS_FACE_SDXL = AdapterSource(
    "h94/IP-Adapter",
    "sdxl_models",
    "ip-adapter-plus-face_sdxl_vit-h.safetensors",
    "h94/IP-Adapter",
    "models/image_encoder",
)
FACEID_PLUSV2_SDXL = AdapterSource(
    "h94/IP-Adapter-FaceID",
    "",
    "ip-adapter-faceid-plusv2_sdxl.safetensors",
    "h94/IP-Adapter",
    "models/image_encoder",
    released_name="ip-adapter-faceid-plusv2_sdxl.bin",
)
FLUX_XLABS = AdapterSource(
    "XLabs-AI/flux-ip-adapter", "", "ip_adapter.safetensors", "openai/clip-vit-large-patch14", ""
)
SOURCES = {
    PLUS_FACE_SDXL_METHOD: PLUS_FACE_SDXL,
    FACEID_PLUSV2_SDXL_METHOD: FACEID_PLUSV2_SDXL,
    FLUX_METHOD: FLUX_XLABS,
}


@dataclass(frozen=True)
class AdapterFiles:
    """A method's files on this machine: directories in the released layouts."""

    source: AdapterSource
    #: the adapter repository's directory (``weight_file`` is ``adapter_dir / subfolder / weight_name``)
    adapter_dir: Path
    #: the image encoder's folder (``config.json`` + ``model.safetensors``)
    encoder_dir: Path

    @property
    def weight_file(self) -> Path:
        return self.adapter_dir / self.source.subfolder / self.source.weight_name

    @property
    def encoder_file(self) -> Path:
        return self.encoder_dir / "model.safetensors"

    @property
    def sha256(self) -> str:
        """Identifies both checkpoints (part of the cache key of anything computed with them)."""
        parts = [file_sha256(self.weight_file), file_sha256(self.encoder_file)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


# released files ---------------------------------------------------------------------------------------------


def adapter_files(source: AdapterSource, weight_file: Path, encoder_dir: Path) -> AdapterFiles:
    """The method's files as the asset store resolved them (a converted FaceID file lives outside its repo)."""
    located = replace(source, subfolder="", weight_name=weight_file.name)
    return AdapterFiles(located, weight_file.parent, encoder_dir)


ENCODER_FILES = ("config.json", "model.safetensors")


def read_adapter_state_dict(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` of an h94-style safetensors file (prefixes removed).

    The same split diffusers' ``load_ip_adapter`` makes when it reads a safetensors IP-Adapter.
    """
    from safetensors import safe_open

    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                group, _, rest = key.partition(".")
                if group in out:
                    out[group][rest] = f.get_tensor(key)
    except Exception as exc:
        raise IPAdapterWeightsError(f"{path} is not a readable safetensors file ({exc})") from exc
    if not out["image_proj"] or not out["ip_adapter"]:
        raise IPAdapterWeightsError(f"{path} has no image_proj.* / ip_adapter.* weights: not an h94 IP-Adapter file")
    return out
