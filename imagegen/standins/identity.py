"""The tiny presets' identity stand-ins: state dicts in the released key layouts, at toy sizes.

Every tensor is drawn from a generator seeded by the CRC32 of its key (:func:`seeded_state_dict`, the recipe of
the parity fixtures), so every build has the same weights. Sizes fit :mod:`imagegen.pipelines.tiny`'s models:

==================  =================================================================================
tiny EVA-CLIP       112 px, patch 14 (65 tokens), width 64, 6 blocks of one 64-wide head, embedding 32;
                    hidden states entering blocks 1..5
tiny IDFormer       dim 32, depth 5 (one layer per scale), 2 heads of 16, 2 id tokens, 8 queries, ff x2,
                    id vector 512 (ArcFace) + 32 (tiny EVA) = 544, mapping MLPs 64 wide, ViT width 64;
                    output 48 for FLUX, 64 (the tiny UNet's cross-attention width) for SDXL
tiny FLUX CAs       width 64 (the tiny transformer's), 2 heads of 32, id width 48; intervals 2 / 4 over the
                    tiny transformer's 3 double / 5 single blocks: after double 0, 2 and single 0, 4 (4 CAs)
tiny SDXL layers    one ``id_to_k``/``id_to_v`` pair per cross-attention of the tiny UNet (64 -> its width)
tiny CLIP encoders  ViT 56 px, patch 14 (17 tokens), width 32, 2 layers of 2 heads, projection 32: "ViT-H" for
                    SDXL (a vision-only folder, as h94's) and "ViT-L/14" for FLUX (a full CLIPModel with a tiny
                    text tower, as openai's), seeded differently
tiny plus-face      Resampler width 64 (1 head of 64), 16 queries, depth 4, input 32, output 64 (the tiny UNet's
                    cross-attention width); ``to_k_ip``/``to_v_ip`` 64 -> 64 on the 8 cross-attentions
tiny FaceID-PlusV2  ArcFace MLP 512 -> 1024 -> 4 x 64, resampler width 64 (1 head), depth 4, CLIP input 32; LoRA
                    rank 4 on ``to_q``/``to_k``/``to_v``/``to_out.0`` of all 16 attention processors
tiny XLabs FLUX     ``proj`` 32 -> 4 x 32 (the tiny transformer's text width), k/v 32 -> 64 on the 3 double blocks
==================  =================================================================================

PuLID files carry their sizes in the ``imagegen.pulid`` safetensors metadata (the IDFormer's head split is not
visible in the weights); the loaders read sizes from there when present, from the weights otherwise.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch
from torch import nn

from imagegen.identity.pulid.encoder import IDFormer, IDFormerConfig
from imagegen.identity.pulid.eva_clip import TINY_EVA_CLIP, EvaClipConfig, EvaClipVision, to_official_state_dict
from imagegen.identity.pulid.flux_ca import CrossAttentionConfig, PerceiverAttentionCA, ca_positions
from imagegen.identity.pulid.sdxl_processor import PREFIX as SDXL_LAYER_PREFIX
from imagegen.identity.pulid.sdxl_processor import cross_attention_layers

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


def tiny_pulid_flux_state_dict(
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
        "idformer": idformer.to_dict(),
        "ca": ca.to_dict(),
        "double_interval": intervals[0],
        "single_interval": intervals[1],
    }
    return seeded_state_dict(shapes), metadata


def tiny_pulid_sdxl_state_dict(unet: nn.Module, idformer: IDFormerConfig | None = None) -> tuple[dict, dict]:
    """Seeded PuLID v1.1 weights for ``unet`` (any diffusers ``UNet2DConditionModel``, meta device is fine)."""
    cross_dim = int(unet.config.cross_attention_dim)
    idformer = idformer or IDFormerConfig(**{**TINY_IDFORMER.to_dict(), "output_dim": cross_dim})
    with torch.device("meta"):
        shapes = _shapes(IDFormer(idformer), "id_adapter.")
    for index, _, module in cross_attention_layers(unet):
        shape = (module.to_k.out_features, module.to_k.in_features)
        shapes[f"{SDXL_LAYER_PREFIX}{index}.id_to_k.weight"] = shape
        shapes[f"{SDXL_LAYER_PREFIX}{index}.id_to_v.weight"] = shape
    metadata = {"kind": "sdxl", "idformer": idformer.to_dict()}
    return seeded_state_dict(shapes), metadata


def tiny_eva_clip_state_dict(config: EvaClipConfig = TINY_EVA_CLIP) -> dict[str, torch.Tensor]:
    """Seeded EVA-CLIP weights in the official checkpoint's layout (``visual.*``)."""
    with torch.device("meta"):
        model = EvaClipVision(config)
    shapes = {k: tuple(v.shape) for k, v in to_official_state_dict(model).items()}
    return seeded_state_dict(shapes)


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


def tiny_xlabs_flux_state_dict(transformer_config: Mapping, clip_projection: int = TINY_CLIP_PROJECTION):
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
