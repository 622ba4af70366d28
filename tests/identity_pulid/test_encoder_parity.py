"""IDFormer and PerceiverAttentionCA against the reference figures, and strict loading of the released layouts.

The full-size modules are built from the key manifests of the released checkpoints with the fixtures' seeded
weights; matching the recorded outputs proves both the key layout and the math.
"""

from __future__ import annotations

import gc

import pytest
import torch

from imagegen.identity.pulid.encoder import IDFormer, IDFormerConfig
from imagegen.identity.pulid.flux_ca import CrossAttentionConfig, PerceiverAttentionCA, num_cross_attentions
from imagegen.identity.pulid.sdxl_processor import PulidSDXLAttnProcessor, attach_pulid_sdxl, cross_attention_layers
from imagegen.identity.pulid.weights import (
    PulidFluxWeights,
    PulidSDXLWeights,
    PulidWeightsError,
    build_idformer,
)
from tests.identity_pulid._parity import assert_matches, fixture, seeded

FLUX_KEYS = "pulid_flux_v0.9.1.keys.json"
SDXL_KEYS = "pulid_sdxl_v1.1.keys.json"

#: diffusers config of SDXL base 1.0's UNet (architecture only; built on the meta device)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


@pytest.fixture(scope="module")
def idformer():
    """The full-size IDFormer with the fixture's seeded weights (keys without the checkpoint prefix)."""
    shapes = {k.removeprefix("pulid_encoder."): v for k, v in fixture(FLUX_KEYS).items() if k.startswith("pulid_")}
    shapes = {k: v for k, v in shapes.items() if not k.startswith("pulid_ca.")}
    model = build_idformer(seeded().seeded_state_dict(shapes))
    yield model
    del model
    gc.collect()


def test_idformer_sizes_are_read_from_the_released_layout(idformer):
    config = fixture("pulid_flux_parity.json")["idformer"]["config"]
    assert {k: getattr(idformer.config, k) for k in config} == config
    assert idformer.config == IDFormerConfig()


@torch.inference_mode()
def test_idformer_batch_of_two(idformer):
    s = seeded()
    x = s.seeded_tensor("idformer.x", (2, 1280))
    y = [s.seeded_tensor(f"idformer.y.{i}", (2, 577, 1024)) for i in range(5)]
    assert_matches(idformer(x, y), fixture("pulid_flux_parity.json")["idformer"]["output"])


@torch.inference_mode()
def test_idformer_unconditional_is_the_encoding_of_zeros(idformer):
    expected = fixture("pulid_flux_parity.json")["idformer"]["uncond_output_zeros_inputs"]
    zeros = idformer(torch.zeros(2, 1280), [torch.zeros(2, 577, 1024) for _ in range(5)])
    assert_matches(zeros, expected)
    # the helper zeroes one image's worth of inputs, whatever the number of reference images
    s = seeded()
    x3 = s.seeded_tensor("idformer.x3", (2, 3, 1280))
    y3 = [torch.randn(2, 3 * 577, 1024) for _ in range(5)]
    assert torch.equal(idformer.unconditional(x3, y3), zeros)


@torch.inference_mode()
def test_idformer_several_reference_images(idformer):
    s = seeded()
    x = s.seeded_tensor("idformer.x3", (1, 3, 1280))
    y = [s.seeded_tensor(f"idformer.y3.{i}", (1, 3 * 577, 1024)) for i in range(5)]
    assert_matches(idformer(x, y), fixture("pulid_flux_parity.json")["idformer"]["multi_image"]["output"])


@torch.inference_mode()
def test_perceiver_attention_ca():
    case = fixture("pulid_flux_parity.json")["perceiver_attention_ca"]
    shapes = {k.removeprefix("pulid_ca.0."): v for k, v in fixture(FLUX_KEYS).items() if k.startswith("pulid_ca.0.")}
    ca = PerceiverAttentionCA(**case["config"])
    ca.load_state_dict(seeded().seeded_state_dict(shapes), strict=True)
    assert CrossAttentionConfig.from_state_dict(ca.state_dict()) == ca.config
    s = seeded()
    out = ca(s.seeded_tensor("ca.id", (2, 32, 2048)), s.seeded_tensor("ca.img", (2, 256, 3072)))
    assert_matches(out, case["output"])


def test_tiny_sizes_build_and_run():
    config = IDFormerConfig(
        dim=16,
        depth=5,
        dim_head=8,
        heads=2,
        num_id_token=2,
        num_queries=4,
        output_dim=12,
        ff_mult=2,
        id_dim=40,
        id_hidden=24,
        vit_dim=20,
        vit_hidden=24,
    )
    model = IDFormer(config)
    assert IDFormerConfig.from_state_dict(model.state_dict(), dim_head=8) == config
    out = model(torch.randn(3, 40), [torch.randn(3, 9, 20) for _ in range(5)])
    assert out.shape == (3, 4, 12)
    with pytest.raises(ValueError, match="5 hidden-state scales"):
        model(torch.randn(3, 40), [torch.randn(3, 9, 20)])


def test_released_flux_layout_loads_strictly():
    shapes = fixture(FLUX_KEYS)
    state_dict = seeded().seeded_state_dict(shapes)
    weights = PulidFluxWeights.from_state_dict(state_dict)
    assert len(weights.cross_attentions) == 20 == num_cross_attentions(19, 38, 2, 4)
    assert weights.cross_attentions[0].config == CrossAttentionConfig()
    assert weights.encoder.config == IDFormerConfig()
    # loaded, not just shaped: the modules hold the checkpoint's tensors
    assert torch.equal(weights.encoder.proj_out, state_dict["pulid_encoder.proj_out"])
    assert torch.equal(weights.cross_attentions[19].to_kv.weight, state_dict["pulid_ca.19.to_kv.weight"])
    assert (
        sum(p.numel() for p in weights.encoder.parameters())
        + sum(p.numel() for p in weights.cross_attentions.parameters())
        == 571_033_600
    )
    broken = dict(state_dict)
    del broken["pulid_encoder.layers.3.0.to_q.weight"]
    with pytest.raises(PulidWeightsError, match="to_q"):
        PulidFluxWeights.from_state_dict(broken)
    del weights, state_dict, broken
    gc.collect()


def test_released_sdxl_layout_loads_strictly_and_maps_onto_the_sdxl_unet():
    from diffusers import UNet2DConditionModel

    manifest = fixture(SDXL_KEYS)
    state_dict = seeded().seeded_state_dict(manifest["keys"])
    weights = PulidSDXLWeights.from_state_dict(state_dict)
    assert weights.encoder.config == IDFormerConfig()
    assert torch.equal(weights.encoder.latents, state_dict["id_adapter.latents"])
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    layers = [[index, name] for index, name, _ in cross_attention_layers(unet)]
    assert layers == manifest["attn_processor_index_to_name"]
    originals = unet.attn_processors
    handle = attach_pulid_sdxl(unet, weights.layer_weights, move=False)
    processors = unet.attn_processors
    assert len(handle.processors) == 70
    for index, name in layers:
        processor = processors[name]
        assert isinstance(processor, PulidSDXLAttnProcessor)
        assert torch.equal(processor.id_to_k.weight, state_dict[f"id_adapter_attn_layers.{index}.id_to_k.weight"])
        assert torch.equal(processor.id_to_v.weight, state_dict[f"id_adapter_attn_layers.{index}.id_to_v.weight"])
    self_attention = [n for n in originals if n.endswith("attn1.processor")]
    assert all(processors[n] is originals[n] for n in self_attention)
    encoder_size = sum(p.numel() for p in weights.encoder.parameters())
    assert encoder_size + sum(v.numel() for v in weights.layer_weights.values()) == 492_185_600
    handle.detach()
    assert all(unet.attn_processors[n] is originals[n] for n in originals)
    del weights, state_dict, handle, unet
    gc.collect()
