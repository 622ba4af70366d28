"""IP-Adapter checkpoints: the released files (hub, cached in the model cache) and tiny seeded ones in their layouts.

Every method loads from a *local directory in the released repository layout*, whatever the preset, so the code
that reads the files is the same for real and tiny presets (diffusers' ``load_ip_adapter`` for the adapters,
transformers' ``CLIPVisionModelWithProjection.from_pretrained`` for the image encoders):

- ``ipadapter-plus-face-sdxl``: ``h94/IP-Adapter`` ``sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors``;
  image encoder ``h94/IP-Adapter`` ``models/image_encoder`` (OpenCLIP ViT-H/14).
- ``ipadapter-faceid-plusv2-sdxl``: ``h94/IP-Adapter-FaceID`` ``ip-adapter-faceid-plusv2_sdxl.bin``, released as a
  pickle only: converted once to ``ip-adapter-faceid-plusv2_sdxl.safetensors`` (:func:`convert_faceid_checkpoint`,
  kept under ``<model cache>/ipadapter/h94/IP-Adapter-FaceID/``); image encoder as above (FaceID-Plus was trained
  with the same ViT-H); face embedding: insightface ``buffalo_l``.
- ``ipadapter-flux``: ``XLabs-AI/flux-ip-adapter`` ``ip_adapter.safetensors``; image encoder
  ``openai/clip-vit-large-patch14`` (its root folder).

Key layouts (what the tiny files reproduce, at toy sizes):

- h94 SDXL adapters: ``image_proj.*`` (plus-face: the Resampler, ``latents``, ``proj_in``, ``layers.{0..3}.0``
  (``norm1``, ``norm2``, ``to_q``, ``to_kv``, ``to_out``) and ``.1`` (``0`` LayerNorm, ``1``/``3`` Linear),
  ``proj_out``, ``norm_out``; FaceID-Plus: ``proj.0|2`` (the ArcFace MLP), ``norm`` and the same resampler under
  ``perceiver_resampler.``) and ``ip_adapter.{i}.to_k_ip|to_v_ip.weight`` for every cross-attention processor
  ``i`` (the index among *all* processors of the UNet, in diffusers' ``attn_processors`` order: 1, 3, 5 ...).
  FaceID files also hold the LoRA of every processor: ``ip_adapter.{i}.to_q|to_k|to_v|to_out_lora.down|up.weight``.
- XLabs FLUX adapter: ``ip_adapter_proj_model.proj|norm.*`` and
  ``double_blocks.{i}.processor.ip_adapter_double_stream_k_proj|v_proj.weight|bias`` for every double block.
- image encoders: a ``CLIPVisionModelWithProjection`` folder, ``config.json`` + ``model.safetensors``.

Tiny files (``<model cache>/tiny/ipadapter/<owner>/<repo>/...``) are generated from the tiny SDXL UNet and FLUX
transformer configs of :mod:`imagegen.pipelines.tiny`, so they always fit them; every tensor comes from a generator
seeded by its key (the PuLID recipe), so every build has the same weights:

=====================  ============================================================================================
tiny CLIP encoders     ViT 56 px, patch 14 (17 tokens), width 32, 2 layers of 2 heads, projection 32: "ViT-H" for
                       SDXL (a vision-only folder, as h94's) and "ViT-L/14" for FLUX (a full CLIPModel with a tiny
                       text tower, as openai's), seeded differently
tiny plus-face         Resampler width 64 (1 head of 64), 16 queries, depth 4, input 32, output 64 (the tiny UNet's
                       cross-attention width); ``to_k_ip``/``to_v_ip`` 64 → 64 on the 8 cross-attentions
tiny FaceID-PlusV2     ArcFace MLP 512 → 1024 → 4 x 64, resampler width 64 (1 head), depth 4, CLIP input 32; LoRA
                       rank 4 on ``to_q``/``to_k``/``to_v``/``to_out.0`` of all 16 attention processors
tiny XLabs FLUX        ``proj`` 32 → 4 x 32 (the tiny transformer's text width), k/v 32 → 64 on the 3 double blocks
tiny buffalo_l         a generated ``w600k_r50.onnx``-signature recognizer (``imagegen.faces.testing_models``)
=====================  ============================================================================================
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from imagegen.errors import ImagegenError, ModelNotAvailableError, UnsafeCheckpointError
from imagegen.identity.pulid.weights import file_sha256, seeded_state_dict
from imagegen.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: method names of configs/models.yaml
PLUS_FACE_SDXL_METHOD = "ipadapter-plus-face-sdxl"
FACEID_PLUSV2_SDXL_METHOD = "ipadapter-faceid-plusv2-sdxl"
FLUX_METHOD = "ipadapter-flux"

#: bump when the tiny sizes or their seeding change; older tiny files are rebuilt
TINY_IPADAPTER_VERSION = 2
TINY_DIR = Path("tiny") / "ipadapter"
MARKER = "imagegen_tiny.json"
#: where converted checkpoints (released as pickles) are kept, in their repository's layout
CONVERTED_DIR = Path("ipadapter")

TINY_CLIP_WIDTH = 32
TINY_CLIP_PROJECTION = 32
TINY_CLIP_IMAGE_SIZE = 56
TINY_RESAMPLER_WIDTH = 64  # one head of 64 (diffusers reads heads as to_q rows // 64)
TINY_FACEID_LORA_RANK = 4
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


def hub_cache_dir(settings: Settings) -> Path:
    return settings.model_cache / "hub"


def _snapshot(repo: str, paths: list[str], settings: Settings) -> Path:
    """The local snapshot directory of ``repo`` holding ``paths`` (downloaded unless downloads are disabled)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(
                repo,
                allow_patterns=paths,
                cache_dir=str(hub_cache_dir(settings)),
                local_files_only=not settings.allow_downloads,
            )
        )
    except Exception as exc:  # huggingface_hub raises several unrelated types for "not there"
        raise _not_available(repo, paths, settings, exc) from exc
    missing = [p for p in paths if not (folder / p).is_file()]
    if missing:
        raise _not_available(repo, missing, settings, None)
    return folder


def _not_available(repo: str, paths: list[str], settings: Settings, exc: Exception | None) -> ModelNotAvailableError:
    hint = (
        "downloads are disabled (IMAGEGEN_ALLOW_DOWNLOADS=false)"
        if not settings.allow_downloads
        else "the download failed (no network access to the hub?)"
    )
    detail = f" ({str(exc).splitlines()[0][:200]})" if exc is not None and str(exc) else ""
    return ModelNotAvailableError(
        f"{', '.join(paths)} of {repo} is not in the model cache {hub_cache_dir(settings)} and {hint}. "
        f"Run once on a machine with hub access.{detail}"
    )


def converted_dir(source: AdapterSource, settings: Settings) -> Path:
    """Where the safetensors conversion of a pickle-only release lives (the release's repository layout)."""
    return settings.model_cache / CONVERTED_DIR / source.repo


def resolve_files(source: AdapterSource, settings: Settings | None = None, tiny: bool = False) -> AdapterFiles:
    """The local directories of ``source`` (tiny: written on first use; else from the hub cache)."""
    settings = settings or get_settings()
    if tiny:
        root = ensure_tiny_ipadapter(settings)
        return AdapterFiles(source, root / source.repo, root / source.encoder_repo / source.encoder_subfolder)
    if source.released_name is not None:
        adapter_dir = converted_dir(source, settings)
        if not (adapter_dir / source.subfolder / source.weight_name).is_file():
            raise UnsafeCheckpointError(
                f"{source.repo} publishes {source.released_name} only as a pickle, which can run arbitrary code when "
                f"loaded and is refused. Convert it once to {adapter_dir / source.subfolder / source.weight_name} "
                "with `python -c 'from imagegen.identity.ipadapter import convert_faceid_checkpoint; "
                "convert_faceid_checkpoint()'` (downloads it and reads it with torch.load(weights_only=True))"
            )
    else:
        weight_path = "/".join(p for p in (source.subfolder, source.weight_name) if p)
        adapter_dir = _snapshot(source.repo, [weight_path], settings)
    encoder_paths = ["/".join(p for p in (source.encoder_subfolder, name) if p) for name in ENCODER_FILES]
    encoder_root = _snapshot(source.encoder_repo, encoder_paths, settings)
    return AdapterFiles(source, adapter_dir, encoder_root / source.encoder_subfolder)


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


def convert_faceid_checkpoint(
    source: str | os.PathLike | None = None,
    target: str | os.PathLike | None = None,
    settings: Settings | None = None,
) -> Path:
    """Convert the released FaceID-PlusV2 SDXL pickle to the safetensors file imagegen loads; its path.

    ``source``: the ``.bin`` (default: downloaded from ``h94/IP-Adapter-FaceID`` into the model cache). It is read
    with ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only. The result keeps
    the released key names, flattened as h94's safetensors adapters are (``image_proj.*``, ``ip_adapter.*``).
    """
    settings = settings or get_settings()
    spec = FACEID_PLUSV2_SDXL
    if source is None:
        from huggingface_hub import hf_hub_download

        try:
            source = hf_hub_download(
                spec.repo,
                spec.released_name,
                cache_dir=str(hub_cache_dir(settings)),
                local_files_only=not settings.allow_downloads,
            )
        except Exception as exc:
            raise _not_available(spec.repo, [spec.released_name], settings, exc) from exc
    loaded = torch.load(Path(source), map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping) or not {"image_proj", "ip_adapter"} <= set(loaded):
        raise IPAdapterWeightsError(f"{source} has no 'image_proj' and 'ip_adapter' parts: not an IP-Adapter file")
    flat = {f"{group}.{key}": value for group in ("image_proj", "ip_adapter") for key, value in loaded[group].items()}
    path = Path(target) if target is not None else converted_dir(spec, settings) / spec.weight_name
    return _save(flat, path)


def _save(tensors: Mapping[str, torch.Tensor], path: Path) -> Path:
    """Write safetensors atomically (temporary file renamed into place)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# tiny files ----------------------------------------------------------------------------------------------------


def _resampler_shapes(prefix: str, width: int, input_width: int, output_width: int) -> dict[str, tuple[int, ...]]:
    """IP-Adapter's (Face)PerceiverResampler in the released layout (``to_kv`` fused, FeedForward as Sequential)."""
    heads_width = width  # heads x 64, with 64-wide heads
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}proj_in.weight": (width, input_width),
        f"{prefix}proj_in.bias": (width,),
        f"{prefix}proj_out.weight": (output_width, width),
        f"{prefix}proj_out.bias": (output_width,),
        f"{prefix}norm_out.weight": (output_width,),
        f"{prefix}norm_out.bias": (output_width,),
    }
    for i in range(RESAMPLER_DEPTH):
        layer = f"{prefix}layers.{i}."
        shapes.update(
            {
                f"{layer}0.norm1.weight": (width,),
                f"{layer}0.norm1.bias": (width,),
                f"{layer}0.norm2.weight": (width,),
                f"{layer}0.norm2.bias": (width,),
                f"{layer}0.to_q.weight": (heads_width, width),
                f"{layer}0.to_kv.weight": (2 * heads_width, width),
                f"{layer}0.to_out.weight": (width, heads_width),
                f"{layer}1.0.weight": (width,),
                f"{layer}1.0.bias": (width,),
                f"{layer}1.1.weight": (4 * width, width),
                f"{layer}1.3.weight": (width, 4 * width),
            }
        )
    return shapes


def _unet_attention(unet) -> list[tuple[int, str, torch.nn.Module]]:
    """``(index, processor name, Attention)`` of every processor of a UNet, in ``attn_processors`` order."""
    return [
        (index, name, unet.get_submodule(name[: -len(".processor")])) for index, name in enumerate(unet.attn_processors)
    ]


def _ip_shapes(unet) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for index, _, attn in _unet_attention(unet):
        if getattr(attn, "is_cross_attention", False):
            shape = (attn.to_k.out_features, attn.to_k.in_features)
            shapes[f"ip_adapter.{index}.to_k_ip.weight"] = shape
            shapes[f"ip_adapter.{index}.to_v_ip.weight"] = shape
    return shapes


def tiny_plus_face_state_dict(unet, clip_width: int = TINY_CLIP_WIDTH) -> dict[str, torch.Tensor]:
    """Seeded ``ip-adapter-plus-face_sdxl_vit-h`` weights for ``unet`` (a meta-device UNet is fine)."""
    cross = int(unet.config.cross_attention_dim)
    width = TINY_RESAMPLER_WIDTH
    shapes = {"image_proj.latents": (1, PLUS_NUM_QUERIES, width)}
    shapes.update(_resampler_shapes("image_proj.", width, clip_width, cross))
    shapes.update(_ip_shapes(unet))
    return seeded_state_dict(shapes)


def tiny_faceid_state_dict(
    unet, clip_width: int = TINY_CLIP_WIDTH, rank: int = TINY_FACEID_LORA_RANK
) -> dict[str, torch.Tensor]:
    """Seeded ``ip-adapter-faceid-plusv2_sdxl`` weights (its LoRA included) for ``unet``."""
    cross = int(unet.config.cross_attention_dim)
    shapes: dict[str, tuple[int, ...]] = {
        "image_proj.proj.0.weight": (2 * ARCFACE_DIM, ARCFACE_DIM),
        "image_proj.proj.0.bias": (2 * ARCFACE_DIM,),
        "image_proj.proj.2.weight": (cross * FACEID_NUM_TOKENS, 2 * ARCFACE_DIM),
        "image_proj.proj.2.bias": (cross * FACEID_NUM_TOKENS,),
        "image_proj.norm.weight": (cross,),
        "image_proj.norm.bias": (cross,),
    }
    shapes.update(_resampler_shapes("image_proj.perceiver_resampler.", cross, clip_width, cross))
    shapes.update(_ip_shapes(unet))
    for index, _, attn in _unet_attention(unet):
        for name, linear in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out", attn.to_out[0])):
            shapes[f"ip_adapter.{index}.{name}_lora.down.weight"] = (rank, linear.in_features)
            shapes[f"ip_adapter.{index}.{name}_lora.up.weight"] = (linear.out_features, rank)
    return seeded_state_dict(shapes)


def tiny_flux_state_dict(transformer_config: Mapping, clip_projection: int = TINY_CLIP_PROJECTION):
    """Seeded XLabs ``flux-ip-adapter`` weights for a FLUX transformer with ``transformer_config``."""
    text = int(transformer_config["joint_attention_dim"])
    inner = int(transformer_config["num_attention_heads"]) * int(transformer_config["attention_head_dim"])
    shapes: dict[str, tuple[int, ...]] = {
        "ip_adapter_proj_model.proj.weight": (FLUX_NUM_TOKENS * text, clip_projection),
        "ip_adapter_proj_model.proj.bias": (FLUX_NUM_TOKENS * text,),
        "ip_adapter_proj_model.norm.weight": (text,),
        "ip_adapter_proj_model.norm.bias": (text,),
    }
    for i in range(int(transformer_config["num_layers"])):
        for kind in ("k", "v"):
            key = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kind}_proj"
            shapes[f"{key}.weight"] = (inner, text)
            shapes[f"{key}.bias"] = (inner,)
    return seeded_state_dict(shapes)


def _tiny_vision_config() -> dict:
    return {
        "hidden_size": TINY_CLIP_WIDTH,
        "intermediate_size": 2 * TINY_CLIP_WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": TINY_CLIP_IMAGE_SIZE,
        "patch_size": 14,
        "projection_dim": TINY_CLIP_PROJECTION,
        "hidden_act": "gelu",
    }


def tiny_clip_vision(seed: int):
    """A tiny ``CLIPVisionModelWithProjection`` (seeded): h94's ``models/image_encoder`` layout at toy sizes."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**_tiny_vision_config())).eval()


def tiny_clip_model(seed: int):
    """A tiny full ``CLIPModel`` (text and vision towers, seeded): ``openai/clip-vit-large-patch14``'s layout, from
    which diffusers' FLUX loader (and imagegen) read only the vision tower with its projection."""
    from transformers import CLIPConfig, CLIPModel

    text = {
        "hidden_size": TINY_CLIP_WIDTH,
        "intermediate_size": 2 * TINY_CLIP_WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "vocab_size": 64,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "projection_dim": TINY_CLIP_PROJECTION,
    }
    config = CLIPConfig(text_config=text, vision_config=_tiny_vision_config(), projection_dim=TINY_CLIP_PROJECTION)
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


#: tiny image encoder folders: (builder, seed)
TINY_ENCODERS = {
    "h94/IP-Adapter/models/image_encoder": (tiny_clip_vision, 9101),
    "openai/clip-vit-large-patch14": (tiny_clip_model, 9102),
}
TINY_RECOGNIZER = Path("buffalo_l") / "w600k_r50.onnx"
TINY_RECOGNIZER_SEED = 600


def tiny_root(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).model_cache / TINY_DIR


def _tiny_is_current(root: Path) -> bool:
    try:
        return json.loads((root / MARKER).read_text()).get("version") == TINY_IPADAPTER_VERSION
    except (OSError, json.JSONDecodeError):
        return False


def _write_tiny(staging: Path, settings: Settings) -> None:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from imagegen.faces.testing_models import write_arcface_recognizer
    from imagegen.pipelines.tiny import ensure_tiny_repo

    for folder, (build, seed) in TINY_ENCODERS.items():
        build(seed).save_pretrained(staging / folder, safe_serialization=True)
    unet_config = UNet2DConditionModel.load_config(str(ensure_tiny_repo("sdxl", settings.model_cache) / "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    flux_config = FluxTransformer2DModel.load_config(
        str(ensure_tiny_repo("flux", settings.model_cache) / "transformer")
    )
    for source, tensors in (
        (PLUS_FACE_SDXL, tiny_plus_face_state_dict(unet)),
        (FACEID_PLUSV2_SDXL, tiny_faceid_state_dict(unet)),
        (FLUX_XLABS, tiny_flux_state_dict(flux_config)),
    ):
        _save(tensors, staging / source.repo / source.subfolder / source.weight_name)
    write_arcface_recognizer(staging / TINY_RECOGNIZER, seed=TINY_RECOGNIZER_SEED)


def ensure_tiny_ipadapter(settings: Settings | None = None, force: bool = False) -> Path:
    """Write every tiny IP-Adapter repository into the model cache unless current; their root directory.

    Written into a temporary sibling directory and renamed into place, so a killed build never leaves
    half-written files behind.
    """
    settings = settings or get_settings()
    root = tiny_root(settings)
    if _tiny_is_current(root) and not force:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    log.info("writing tiny IP-Adapter repositories to %s", root)
    staging = Path(tempfile.mkdtemp(prefix=".ipadapter-", dir=root.parent))
    try:
        _write_tiny(staging, settings)
        (staging / MARKER).write_text(json.dumps({"version": TINY_IPADAPTER_VERSION}))
        if _tiny_is_current(root) and not force:  # another process finished first
            return root
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root


def tiny_recognizer(settings: Settings | None = None) -> Path:
    return ensure_tiny_ipadapter(settings) / TINY_RECOGNIZER
