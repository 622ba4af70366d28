"""Write the full-size key manifests (key -> shape) of the released IP-Adapter files, derived from diffusers.

    python bench/make_ipadapter_manifests.py            # (re)writes tests/fixtures/ipadapter/*.keys.json
    python bench/make_ipadapter_manifests.py --check    # exit 1 when the committed manifests differ

The released files cannot be downloaded on the machines this project is built on, so their layouts are
*derived*, not read: nothing here looks at a released file. On the meta device (no memory is allocated) this
builds the full-size SDXL base UNet and FLUX.1-dev transformer (configs in
``tests/fixtures/ipadapter/full_size_configs.json``) and, from them and the published sizes below, the very
modules diffusers builds when it loads these files:

- the image projections of ``_convert_ip_adapter_image_proj_to_diffusers``: ``IPAdapterPlusImageProjection``
  (plus-face), ``IPAdapterFaceIDPlusImageProjection`` (FaceID-PlusV2), ``ImageProjection`` (XLabs FLUX);
- the attention processors of ``_convert_ip_adapter_attn_to_diffusers``: ``IPAdapterAttnProcessor2_0`` on every
  SDXL cross-attention, ``FluxIPAdapterAttnProcessor`` on every FLUX double block;
- FaceID's LoRA: diffusers' ``LoRALinearLayer`` (rank 128) on ``to_q``/``to_k``/``to_v``/``to_out.0`` of every
  attention processor, sized from the UNet's own ``Attention`` modules.

Their state dicts are then renamed back to the released names (the inverse of diffusers' key conversion, e.g.
``layers.{i}.ln0`` -> ``layers.{i}.0.norm1``, ``attn.to_k`` + ``attn.to_v`` -> ``0.to_kv`` concatenated, processor
``{name}`` -> ``ip_adapter.{index in attn_processors}``, ``to_k_ip.0`` -> ``to_k_ip``; XLabs:
``image_embeds`` -> ``ip_adapter_proj_model.proj``, ``{i}.to_k_ip`` ->
``double_blocks.{i}.processor.ip_adapter_double_stream_k_proj``). Every manifest is checked by running diffusers'
*forward* conversion on it (meta tensors) and loading the result with ``strict=True`` into the module it came from.

Published sizes: OpenCLIP ViT-H/14 hidden states 1280 wide (h94 ``models/image_encoder``), CLIP ViT-L/14 image
embedding 768 (``openai/clip-vit-large-patch14``), plus-face Resampler 1280 wide (20 heads of 64), 16 queries,
depth 4; FaceID-PlusV2: ArcFace 512, 4 tokens, resampler as wide as the UNet's cross-attention (2048, 32 heads of
64), LoRA rank 128; XLabs FLUX: 4 tokens.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "ipadapter"
CONFIGS = FIXTURES / "full_size_configs.json"
MANIFESTS = {
    "plus_face_sdxl": "plus_face_sdxl.keys.json",
    "faceid_plusv2_sdxl": "faceid_plusv2_sdxl.keys.json",
    "xlabs_flux": "xlabs_flux.keys.json",
}

# published sizes ---------------------------------------------------------------------------------------------
VIT_H_HIDDEN = 1280  # OpenCLIP ViT-H/14 width: IP-Adapter Plus / FaceID-Plus read its penultimate hidden states
VIT_L_PROJECTION = 768  # CLIP ViT-L/14 image embedding: what XLabs' flux-ip-adapter projects
RESAMPLER_DEPTH = 4
HEAD_DIM = 64  # diffusers reads the resampler's heads as to_q rows // 64
PLUS_FACE_WIDTH = 1280  # Resampler(dim=1280, heads=20) of the SDXL plus adapters
PLUS_FACE_QUERIES = 16
ARCFACE_DIM = 512
FACEID_TOKENS = 4
FACEID_LORA_RANK = 128
XLABS_TOKENS = 4
LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out")


def load_configs() -> dict:
    return json.loads(CONFIGS.read_text())


def meta_unet(config: Mapping | None = None):
    """The full-size SDXL base UNet on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config or load_configs()["sdxl_unet"]))


def meta_flux(config: Mapping | None = None):
    """The full-size FLUX.1-dev transformer on the meta device."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(dict(config or load_configs()["flux_transformer"]))


def shapes_of(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# the inverse of diffusers' image-projection key conversion ----------------------------------------------------

_BLOCK_RULES: list[tuple[str, str]] = [
    (r"^layers\.(\d+)\.ln0\.", r"layers.\1.0.norm1."),
    (r"^layers\.(\d+)\.ln1\.", r"layers.\1.0.norm2."),
    (r"^layers\.(\d+)\.attn\.to_q\.", r"layers.\1.0.to_q."),
    (r"^layers\.(\d+)\.attn\.to_out\.0\.", r"layers.\1.0.to_out."),
    (r"^layers\.(\d+)\.ff\.0\.", r"layers.\1.1.0."),
    (r"^layers\.(\d+)\.ff\.1\.net\.0\.proj\.", r"layers.\1.1.1."),
    (r"^layers\.(\d+)\.ff\.1\.net\.2\.", r"layers.\1.1.3."),
    (r"^proj\.net\.0\.proj\.", "proj.0."),  # FaceID-Plus ArcFace MLP
    (r"^proj\.net\.2\.", "proj.2."),
    (r"^image_embeds\.", "proj."),  # ImageProjection (IP-Adapter / XLabs)
]


def released_projection(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Released key names of a diffusers image projection's state dict (``to_k`` + ``to_v`` fused into ``to_kv``)."""
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        fused = re.match(r"^layers\.(\d+)\.attn\.to_([kv])\.weight$", key)
        if fused:
            layer, kind = fused.groups()
            if kind == "k":
                v = shapes[f"layers.{layer}.attn.to_v.weight"]
                out[f"layers.{layer}.0.to_kv.weight"] = (shape[0] + v[0], *shape[1:])
            continue
        for pattern, replacement in _BLOCK_RULES:
            key, count = re.subn(pattern, replacement, key)
            if count:
                break
        out[key] = shape
    return out


# the manifests ----------------------------------------------------------------------------------------------


def _sdxl_ip_processors(unet, num_tokens: int) -> dict[str, tuple[int, ...]]:
    """``ip_adapter.{index}.to_k_ip|to_v_ip.weight`` of every cross-attention, index counting all processors.

    The processors are diffusers' ``IPAdapterAttnProcessor2_0`` built the way ``_convert_ip_adapter_attn_to_diffusers``
    builds them (hidden size from the block, cross-attention width from the config).
    """
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    out = {}
    for index, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name[: -len(".processor")])
        if not attn.is_cross_attention:
            continue
        with torch.device("meta"):
            processor = IPAdapterAttnProcessor2_0(
                hidden_size=attn.to_k.out_features,
                cross_attention_dim=unet.config.cross_attention_dim,
                num_tokens=[num_tokens],
            )
        for key, shape in shapes_of(processor).items():  # to_k_ip.0.weight, to_v_ip.0.weight
            out[f"ip_adapter.{index}.{key.replace('_ip.0.', '_ip.')}"] = shape
    return out


def _faceid_lora(unet, rank: int) -> dict[str, tuple[int, ...]]:
    """IP-Adapter FaceID's LoRA: ``ip_adapter.{index}.{to_q|to_k|to_v|to_out}_lora.down|up.weight``, every processor."""
    from diffusers.models.lora import LoRALinearLayer

    out = {}
    for index, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name[: -len(".processor")])
        for layer in LORA_LAYERS:
            linear = attn.to_out[0] if layer == "to_out" else getattr(attn, layer)
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of PEFT; its shapes are the point
                lora = LoRALinearLayer(linear.in_features, linear.out_features, rank=rank)
            for key, shape in shapes_of(lora).items():  # down.weight, up.weight
                out[f"ip_adapter.{index}.{layer}_lora.{key}"] = shape
    return out


def plus_face_sdxl(
    unet, clip_width: int = VIT_H_HIDDEN, width: int = PLUS_FACE_WIDTH, queries: int = PLUS_FACE_QUERIES
) -> dict[str, tuple[int, ...]]:
    """``h94/IP-Adapter`` ``sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors`` (other sizes: toy versions)."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    with torch.device("meta"):
        projection = IPAdapterPlusImageProjection(
            embed_dims=clip_width,
            output_dims=unet.config.cross_attention_dim,
            hidden_dims=width,
            depth=RESAMPLER_DEPTH,
            dim_head=HEAD_DIM,
            heads=width // HEAD_DIM,
            num_queries=queries,
        )
    keys = {f"image_proj.{k}": v for k, v in released_projection(shapes_of(projection)).items()}
    keys.update(_sdxl_ip_processors(unet, queries))
    return keys


def faceid_plusv2_sdxl(
    unet, clip_width: int = VIT_H_HIDDEN, rank: int = FACEID_LORA_RANK
) -> dict[str, tuple[int, ...]]:
    """``h94/IP-Adapter-FaceID`` ``ip-adapter-faceid-plusv2_sdxl.bin`` (as flattened into safetensors)."""
    from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

    width = unet.config.cross_attention_dim
    with torch.device("meta"):
        projection = IPAdapterFaceIDPlusImageProjection(
            embed_dims=width,
            output_dims=width,
            hidden_dims=clip_width,
            id_embeddings_dim=ARCFACE_DIM,
            depth=RESAMPLER_DEPTH,
            dim_head=HEAD_DIM,
            heads=width // HEAD_DIM,
            num_tokens=FACEID_TOKENS,
        )
    keys = {}
    for key, shape in released_projection(shapes_of(projection)).items():
        top = key.split(".")[0]
        keys["image_proj." + (key if top in ("proj", "norm") else "perceiver_resampler." + key)] = shape
    keys.update(_sdxl_ip_processors(unet, FACEID_TOKENS))
    keys.update(_faceid_lora(unet, rank))
    return keys


def xlabs_flux(transformer, image_embed_dim: int = VIT_L_PROJECTION) -> dict[str, tuple[int, ...]]:
    """``XLabs-AI/flux-ip-adapter`` ``ip_adapter.safetensors``."""
    from diffusers.models.embeddings import ImageProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    config = transformer.config
    with torch.device("meta"):
        projection = ImageProjection(
            image_embed_dim=image_embed_dim,
            cross_attention_dim=config.joint_attention_dim,
            num_image_text_embeds=XLABS_TOKENS,
        )
    keys = {f"ip_adapter_proj_model.{k}": v for k, v in released_projection(shapes_of(projection)).items()}
    double = 0
    for name in transformer.attn_processors:
        if name.startswith("single_transformer_blocks"):
            continue
        with torch.device("meta"):
            processor = FluxIPAdapterAttnProcessor(
                hidden_size=config.num_attention_heads * config.attention_head_dim,
                cross_attention_dim=config.joint_attention_dim,
                num_tokens=[XLABS_TOKENS],
                device=torch.device("meta"),
            )
        for key, shape in shapes_of(processor).items():  # to_k_ip.0.weight / .bias, to_v_ip.0.*
            kind, _, param = key.partition(".0.")
            proj = {"to_k_ip": "k_proj", "to_v_ip": "v_proj"}[kind]
            keys[f"double_blocks.{double}.processor.ip_adapter_double_stream_{proj}.{param}"] = shape
        double += 1
    return keys


# forward check: diffusers' own conversion accepts the manifest ------------------------------------------------


def meta_tensors(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(tuple(v), device="meta") for k, v in shapes.items()}


def check_with_diffusers(kind: str, keys: Mapping[str, tuple[int, ...]], model) -> None:
    """Run diffusers' forward conversion on the manifest (meta tensors) and load it ``strict=True``."""
    tensors = meta_tensors(keys)
    if kind == "xlabs_flux":  # the renaming of FluxIPAdapterMixin.load_ip_adapter for XLabs files
        image_proj = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("ip_adapter_proj_model.")}
        ip = {
            k.split(".", 1)[1]
            .replace("ip_adapter_double_stream_k_proj", "to_k_ip")
            .replace("ip_adapter_double_stream_v_proj", "to_v_ip")
            .replace("processor.", ""): v
            for k, v in tensors.items()
            if k.startswith("double_blocks.")
        }
    else:
        image_proj = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("image_proj.")}
        ip = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("ip_adapter.") and "_lora." not in k}
    with torch.device("meta"):
        # low_cpu_mem_usage=False: plain load_state_dict(strict=True) into modules built on the meta device
        projection = model._convert_ip_adapter_image_proj_to_diffusers(image_proj, low_cpu_mem_usage=False)
        processors = model._convert_ip_adapter_attn_to_diffusers(
            [{"image_proj": image_proj, "ip_adapter": ip}], low_cpu_mem_usage=False
        )
    used = sum(
        p.numel() for proc in processors.values() if isinstance(proc, torch.nn.Module) for p in proc.parameters()
    )
    if used != sum(t.numel() for t in ip.values()):
        raise AssertionError(f"{kind}: diffusers' IP processors do not take every ip_adapter weight")
    if sum(p.numel() for p in projection.parameters()) != sum(t.numel() for t in image_proj.values()):
        raise AssertionError(f"{kind}: diffusers' image projection does not take every image_proj weight")
    if kind == "faceid_plusv2_sdxl":
        every_ip = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("ip_adapter.")}
        loras = model._load_ip_adapter_loras([{"image_proj": image_proj, "ip_adapter": every_ip}])
        lora_keys = {k for k in keys if "_lora." in k}
        if len(loras[0]) != len(lora_keys):
            raise AssertionError(
                f"{kind}: diffusers maps {len(loras[0])} LoRA weights, the manifest has {len(lora_keys)}"
            )


# writing ----------------------------------------------------------------------------------------------------


def processor_index(model) -> list[list]:
    return [[i, name] for i, name in enumerate(model.attn_processors)]


def build_manifests() -> dict[str, dict]:
    import diffusers

    configs = load_configs()
    unet, transformer = meta_unet(configs["sdxl_unet"]), meta_flux(configs["flux_transformer"])
    source = (
        f"generated by bench/make_ipadapter_manifests.py from diffusers {diffusers.__version__} modules "
        f"(torch {torch.__version__.split('+')[0]}) on the meta device, NOT read from the released file: "
    )
    builders: dict[str, tuple[Callable, object, str, str]] = {
        "plus_face_sdxl": (
            plus_face_sdxl,
            unet,
            "h94/IP-Adapter sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors",
            "IPAdapterPlusImageProjection(embed_dims=1280 (ViT-H), hidden_dims=1280, heads=20, num_queries=16, "
            "depth=4, output_dims=2048) + IPAdapterAttnProcessor2_0 on every cross-attention of the SDXL base UNet",
        ),
        "faceid_plusv2_sdxl": (
            faceid_plusv2_sdxl,
            unet,
            "h94/IP-Adapter-FaceID ip-adapter-faceid-plusv2_sdxl.bin, flattened to safetensors "
            "(image_proj.* / ip_adapter.*) as imagegen's asset store converts it",
            "IPAdapterFaceIDPlusImageProjection(embed_dims=2048, hidden_dims=1280 (ViT-H), id_embeddings_dim=512, "
            "num_tokens=4, heads=32, depth=4) + IPAdapterAttnProcessor2_0 on every cross-attention + "
            "LoRALinearLayer(rank=128) on to_q/to_k/to_v/to_out.0 of every attention processor",
        ),
        "xlabs_flux": (
            xlabs_flux,
            transformer,
            "XLabs-AI/flux-ip-adapter ip_adapter.safetensors",
            "ImageProjection(image_embed_dim=768 (CLIP ViT-L/14), cross_attention_dim=4096, num_image_text_embeds=4) "
            "+ FluxIPAdapterAttnProcessor on every double block of the FLUX.1-dev transformer",
        ),
    }
    out = {}
    for kind, (build, model, released, modules) in builders.items():
        keys = build(model)
        check_with_diffusers(kind, keys, model)
        manifest = {
            "file": released,
            "source": source + modules + ", renamed to the released keys by the inverse of diffusers' conversion.",
            "diffusers_version": diffusers.__version__,
            "tensors": len(keys),
            "parameters": sum(_numel(s) for s in keys.values()),
            "keys": {k: list(keys[k]) for k in sorted(keys)},
        }
        if kind == "xlabs_flux":
            manifest["note"] = "double_blocks.{i} is the i-th double block (transformer_blocks.{i} in diffusers)"
        else:
            manifest["note"] = (
                "ip_adapter.{i}: i counts every attention processor of the SDXL UNet in diffusers' attn_processors "
                "order (self-attention processors have only FaceID's LoRA; cross-attentions are the odd indices)"
            )
            manifest["attn_processor_index_to_name"] = processor_index(model)
        out[kind] = manifest
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def dumps(manifest: Mapping) -> str:
    return json.dumps(manifest, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed manifests, write nothing")
    parser.add_argument("--out", type=Path, default=FIXTURES, help=f"folder to write into (default {FIXTURES})")
    args = parser.parse_args(argv)
    manifests = build_manifests()
    status = 0
    for kind, manifest in manifests.items():
        path = args.out / MANIFESTS[kind]
        if args.check:
            committed = json.loads(path.read_text()) if path.is_file() else {}
            same = committed.get("keys") == manifest["keys"]
            print(f"{path}: {'same keys and shapes' if same else 'DIFFERS'}")
            status |= 0 if same else 1
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dumps(manifest))
            print(f"wrote {path}: {manifest['tensors']} tensors, {manifest['parameters']:,} parameters")
    return status


if __name__ == "__main__":
    sys.exit(main())
