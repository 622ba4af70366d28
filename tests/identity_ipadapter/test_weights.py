"""IP-Adapter files: the tiny stand-ins in the released names and layouts, the FaceID pickle conversion."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from imagegen.identity.ipadapter.adapter import split_faceid_lora
from imagegen.identity.ipadapter.method import load_image_encoder
from imagegen.identity.ipadapter.weights import read_adapter_state_dict
from imagegen.pipelines.assets import load_manifest, read_tensor_pickle, store_for
from imagegen.pipelines.presets import get_preset
from imagegen.standins import identity as tiny
from imagegen.standins.build import ENCODER_SEEDS
from tests.conftest import tiny_method_files

#: the tiny SDXL UNet's processors: 8 self- (even) and 8 cross-attentions (odd), in attn_processors order
TINY_UNET_PROCESSORS = 16


def keys(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def test_tiny_adapters_have_the_released_names_and_key_layouts():
    plus_file = tiny_method_files("tiny-sdxl", "ipadapter-plus-face-sdxl")["weights"]
    assert plus_file.as_posix().endswith("sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors")
    assert "models--h94--IP-Adapter" in plus_file.as_posix()
    plus = keys(plus_file)
    assert {"image_proj.latents", "image_proj.proj_in.weight", "image_proj.norm_out.bias"} <= plus
    assert {"image_proj.layers.3.0.to_kv.weight", "image_proj.layers.3.1.3.weight"} <= plus
    cross = {f"ip_adapter.{i}.to_k_ip.weight" for i in range(1, TINY_UNET_PROCESSORS, 2)}
    assert {k for k in plus if k.startswith("ip_adapter.") and k.endswith("to_k_ip.weight")} == cross

    faceid = keys(tiny_method_files("tiny-sdxl", "ipadapter-faceid-plusv2-sdxl")["weights"])
    assert {"image_proj.proj.0.weight", "image_proj.proj.2.bias", "image_proj.norm.weight"} <= faceid
    assert "image_proj.perceiver_resampler.layers.0.0.to_q.weight" in faceid
    assert cross <= faceid
    lora = {k for k in faceid if "_lora." in k}
    assert len(lora) == TINY_UNET_PROCESSORS * 4 * 2  # to_q/to_k/to_v/to_out x down/up, every processor
    assert "ip_adapter.0.to_out_lora.up.weight" in lora

    flux_file = tiny_method_files("tiny-flux", "ipadapter-flux")["weights"]
    assert flux_file.name == "ip_adapter.safetensors" and "models--XLabs-AI--flux-ip-adapter" in flux_file.as_posix()
    flux = keys(flux_file)
    assert {"ip_adapter_proj_model.proj.weight", "ip_adapter_proj_model.norm.bias"} <= flux
    assert {f"double_blocks.{i}.processor.ip_adapter_double_stream_v_proj.bias" for i in range(3)} <= flux
    assert not any(k.startswith("single_blocks") for k in flux)


def test_faceid_is_released_as_a_pickle_and_converted_with_tensors_only():
    """The stand-in, like h94's file, is one pickle of {"image_proj": {...}, "ip_adapter": {...}}; the store
    converts it once (torch.load(weights_only=True)), flattening the groups as h94's safetensors files are."""
    preset = get_preset("tiny-sdxl")
    converted = tiny_method_files("tiny-sdxl", "ipadapter-faceid-plusv2-sdxl")["weights"]
    asset = load_manifest().assets["ipadapter-faceid-plusv2-sdxl"]
    (released,) = store_for(preset).fetched_files(asset)
    assert released.name == "ip-adapter-faceid-plusv2_sdxl.bin" and converted.suffix == ".safetensors"
    nested = read_tensor_pickle(released)
    flat = load_file(str(converted))
    assert set(flat) == {f"{g}.{k}" for g in nested for k in nested[g]}
    assert all(torch.equal(flat[f"{g}.{k}"], v) for g in nested for k, v in nested[g].items())


def test_tiny_image_encoders_are_clip_folders_and_deterministic():
    from transformers import CLIPVisionModelWithProjection

    folders = {
        "clip-vit-h-14-image-encoder": (
            tiny_method_files("tiny-sdxl", "ipadapter-plus-face-sdxl"),
            tiny.tiny_clip_vision,
        ),
        "clip-vit-large-patch14": (tiny_method_files("tiny-flux", "ipadapter-flux"), tiny.tiny_clip_model),
    }
    for asset_id, (files, build) in folders.items():
        folder = files["image_encoder"]
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        model = load_image_encoder(folder, torch.device("cpu"), torch.float32)
        assert isinstance(model, CLIPVisionModelWithProjection)
        rebuilt = build(ENCODER_SEEDS[asset_id]).state_dict()  # the same seed draws the same weights
        assert all(torch.equal(v, rebuilt[k]) for k, v in model.state_dict().items())
    openai = json.loads((folders["clip-vit-large-patch14"][0]["image_encoder"] / "config.json").read_text())
    assert openai["architectures"] == ["CLIPModel"] and "text_config" in openai  # the full model, as released


def test_faceid_lora_is_split_by_processor():
    weights = read_adapter_state_dict(tiny_method_files("tiny-sdxl", "ipadapter-faceid-plusv2-sdxl")["weights"])
    ip, lora = split_faceid_lora(weights["ip_adapter"])
    assert set(ip) == {f"{i}.to_{kv}_ip.weight" for i in range(1, TINY_UNET_PROCESSORS, 2) for kv in "kv"}
    assert set(lora) == set(range(TINY_UNET_PROCESSORS))
    down, up = lora[1]["to_k"]
    assert down.shape[0] == up.shape[1] == 4  # rank
