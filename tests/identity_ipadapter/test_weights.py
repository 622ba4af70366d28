"""IP-Adapter files: the tiny ones in the released layouts, the FaceID pickle conversion, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from imagegen.errors import ModelNotAvailableError, UnsafeCheckpointError
from imagegen.identity.ipadapter.adapter import split_faceid_lora
from imagegen.identity.ipadapter.method import load_image_encoder
from imagegen.identity.ipadapter.weights import (
    FACEID_PLUSV2_SDXL,
    FLUX_XLABS,
    PLUS_FACE_SDXL,
    TINY_ENCODERS,
    convert_faceid_checkpoint,
    ensure_tiny_ipadapter,
    read_adapter_state_dict,
    resolve_files,
    tiny_recognizer,
)
from imagegen.settings import Settings, get_settings

#: the tiny SDXL UNet's processors: 8 self- (even) and 8 cross-attentions (odd), in attn_processors order
TINY_UNET_PROCESSORS = 16


def keys(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def test_tiny_adapters_have_the_released_key_layouts():
    root = ensure_tiny_ipadapter()
    plus = keys(root / "h94/IP-Adapter/sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors")
    assert {"image_proj.latents", "image_proj.proj_in.weight", "image_proj.norm_out.bias"} <= plus
    assert {"image_proj.layers.3.0.to_kv.weight", "image_proj.layers.3.1.3.weight"} <= plus
    cross = {f"ip_adapter.{i}.to_k_ip.weight" for i in range(1, TINY_UNET_PROCESSORS, 2)}
    assert {k for k in plus if k.startswith("ip_adapter.") and k.endswith("to_k_ip.weight")} == cross

    faceid = keys(root / "h94/IP-Adapter-FaceID/ip-adapter-faceid-plusv2_sdxl.safetensors")
    assert {"image_proj.proj.0.weight", "image_proj.proj.2.bias", "image_proj.norm.weight"} <= faceid
    assert "image_proj.perceiver_resampler.layers.0.0.to_q.weight" in faceid
    assert cross <= faceid
    lora = {k for k in faceid if "_lora." in k}
    assert len(lora) == TINY_UNET_PROCESSORS * 4 * 2  # to_q/to_k/to_v/to_out x down/up, every processor
    assert "ip_adapter.0.to_out_lora.up.weight" in lora

    flux = keys(root / "XLabs-AI/flux-ip-adapter/ip_adapter.safetensors")
    assert {"ip_adapter_proj_model.proj.weight", "ip_adapter_proj_model.norm.bias"} <= flux
    assert {f"double_blocks.{i}.processor.ip_adapter_double_stream_v_proj.bias" for i in range(3)} <= flux
    assert not any(k.startswith("single_blocks") for k in flux)


def test_tiny_image_encoders_are_clip_folders_and_deterministic():
    from transformers import CLIPVisionModelWithProjection

    root = ensure_tiny_ipadapter()
    for folder, (build, seed) in TINY_ENCODERS.items():
        assert sorted(p.name for p in (root / folder).iterdir()) == ["config.json", "model.safetensors"]
        model = load_image_encoder(root / folder, torch.device("cpu"), torch.float32)
        assert isinstance(model, CLIPVisionModelWithProjection)
        rebuilt = build(seed).state_dict()  # the same seed draws the same weights
        assert all(torch.equal(v, rebuilt[k]) for k, v in model.state_dict().items())
    openai = json.loads((root / "openai/clip-vit-large-patch14/config.json").read_text())
    assert openai["architectures"] == ["CLIPModel"] and "text_config" in openai  # the full model, as released
    assert tiny_recognizer().is_file()


def test_tiny_files_resolve_like_released_ones():
    for source in (PLUS_FACE_SDXL, FACEID_PLUSV2_SDXL, FLUX_XLABS):
        files = resolve_files(source, tiny=True)
        relative = files.weight_file.relative_to(ensure_tiny_ipadapter())
        assert relative.as_posix() == "/".join(p for p in (source.repo, source.subfolder, source.weight_name) if p)
        assert files.encoder_file.is_file() and len(files.sha256) == 64


def offline(tmp_path) -> Settings:
    """An empty home and model cache, downloads disabled."""
    return Settings(home=tmp_path, model_cache_dir=tmp_path / "models", allow_downloads=False)


def test_released_files_missing_offline_is_a_clear_error(tmp_path):
    settings = offline(tmp_path)
    with pytest.raises(ModelNotAvailableError, match="h94/IP-Adapter.*IMAGEGEN_ALLOW_DOWNLOADS=false"):
        resolve_files(PLUS_FACE_SDXL, settings)
    with pytest.raises(ModelNotAvailableError, match="XLabs-AI/flux-ip-adapter"):
        resolve_files(FLUX_XLABS, settings)


def test_faceid_pickle_is_refused_until_converted(tmp_path):
    settings = offline(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="convert_faceid_checkpoint"):
        resolve_files(FACEID_PLUSV2_SDXL, settings)
    # the release's own format: one pickle of {"image_proj": {...}, "ip_adapter": {...}}
    tiny = read_adapter_state_dict(resolve_files(FACEID_PLUSV2_SDXL, get_settings(), tiny=True).weight_file)
    released = tmp_path / FACEID_PLUSV2_SDXL.released_name
    torch.save(tiny, released)
    converted = convert_faceid_checkpoint(released, settings=settings)
    assert converted == tmp_path / "models/ipadapter/h94/IP-Adapter-FaceID/ip-adapter-faceid-plusv2_sdxl.safetensors"
    flat = load_file(str(converted))
    assert set(flat) == {f"{g}.{k}" for g in tiny for k in tiny[g]}
    assert all(torch.equal(flat[f"{g}.{k}"], v) for g in tiny for k, v in tiny[g].items())
    # now the adapter is found; what is still missing offline is the image encoder
    with pytest.raises(ModelNotAvailableError, match="models/image_encoder/config.json"):
        resolve_files(FACEID_PLUSV2_SDXL, settings)


def test_faceid_lora_is_split_by_processor():
    weights = read_adapter_state_dict(resolve_files(FACEID_PLUSV2_SDXL, tiny=True).weight_file)
    ip, lora = split_faceid_lora(weights["ip_adapter"])
    assert set(ip) == {f"{i}.to_{kv}_ip.weight" for i in range(1, TINY_UNET_PROCESSORS, 2) for kv in "kv"}
    assert set(lora) == set(range(TINY_UNET_PROCESSORS))
    down, up = lora[1]["to_k"]
    assert down.shape[0] == up.shape[1] == 4  # rank
