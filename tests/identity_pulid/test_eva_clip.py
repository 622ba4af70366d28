"""The EVA02-CLIP-L-14-336 visual tower (timm) against the reference figures, and its tiny version."""

from __future__ import annotations

import gc

import pytest
import torch

from imagegen.errors import UnsafeCheckpointError
from imagegen.identity.pulid.eva_clip import (
    EVA02_CLIP_L_336,
    TINY_EVA_CLIP,
    EvaClipConfig,
    EvaClipVision,
    to_official_state_dict,
)
from imagegen.identity.pulid.weights import (
    PulidWeightsError,
    load_eva_clip,
)
from imagegen.pipelines.assets import convert_pickle_to_safetensors
from imagegen.standins.identity import tiny_eva_clip_state_dict
from tests.conftest import tiny_method_files
from tests.identity_pulid._parity import assert_matches, fixture, seeded

EVA = "eva02_clip_l_336_parity.json"


def test_hidden_state_blocks():
    assert EVA02_CLIP_L_336.hidden_blocks == (4, 8, 12, 16, 20)
    assert EVA02_CLIP_L_336.num_tokens == 577
    assert TINY_EVA_CLIP.hidden_blocks == (1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match="multiple of 6"):
        _ = EvaClipConfig(depth=8).hidden_blocks


@torch.inference_mode()
def test_full_size_tower_matches_the_reference():
    case = fixture(EVA)
    weights = seeded().seeded_state_dict(case["keys"])
    model = EvaClipVision()
    # the official checkpoint holds the whole CLIP model: visual.* plus the text tower, which is ignored
    official = {"visual." + k: v for k, v in weights.items()}
    official["text.token_embedding.weight"] = torch.zeros(4, 8)
    model.load_checkpoint(official)
    assert {k.removeprefix("visual.") for k in to_official_state_dict(model)} == set(case["keys"])
    embedding, hidden = model(seeded().seeded_tensor("eva.pixels", (1, 3, 336, 336)))
    assert_matches(embedding, case["embedding_768"], "embedding")
    assert len(hidden) == 5
    for index, (state, expected) in enumerate(zip(hidden, case["hidden_states"], strict=True)):
        assert_matches(state, expected, f"hidden state {index}")
    del model, weights, official
    gc.collect()


@torch.inference_mode()
def test_tiny_tower_shapes_and_layouts():
    state_dict = tiny_eva_clip_state_dict()
    assert EvaClipConfig.from_state_dict(state_dict) == TINY_EVA_CLIP  # sizes read back from the weights
    assert all(k.startswith("visual.") for k in state_dict) and "visual.blocks.0.mlp.w1.weight" in state_dict
    model = EvaClipVision(TINY_EVA_CLIP)
    model.load_checkpoint(state_dict)
    pixels = torch.randn(3, 3, 112, 112)
    embedding, hidden = model(pixels)
    assert embedding.shape == (3, 32)
    assert [h.shape for h in hidden] == [(3, 65, 64)] * 5
    # the hidden states are the tokens entering blocks 1..5, CLS first
    x = model.model.patch_embed(pixels)
    x, rope = model.model._pos_embed(x)
    x = model.model.norm_pre(x)
    entering = []
    for index, block in enumerate(model.model.blocks):
        if index in TINY_EVA_CLIP.hidden_blocks:
            entering.append(x)
        x = block(x, rope=rope)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(hidden, entering, strict=True))
    assert torch.allclose(embedding, model.model.head(model.model.norm(x)[:, 0]), atol=1e-6)
    # timm's own key layout loads too
    other = EvaClipVision(TINY_EVA_CLIP)
    other.load_checkpoint(model.model.state_dict())
    assert torch.equal(other(pixels)[0], embedding)


@torch.inference_mode()
def test_tiny_weights_file_round_trip(isolated_home):
    """The stand-in .pt went through the store's conversion; the loader reads its sizes from the weights."""
    path = tiny_method_files("tiny-flux", "pulid-flux-v0.9.1")["eva_clip"]
    assert path.suffix == ".safetensors" and "converted" in path.parts
    loaded = load_eva_clip(path)
    assert loaded.config == TINY_EVA_CLIP and len(loaded.sha256) == 64
    direct = EvaClipVision(TINY_EVA_CLIP)
    direct.load_checkpoint(tiny_eva_clip_state_dict())
    pixels = torch.randn(2, 3, 112, 112)
    assert torch.equal(loaded.model(pixels)[0], direct(pixels)[0])


def test_pickle_checkpoint_is_refused_and_converts(tmp_path):
    state_dict = tiny_eva_clip_state_dict()
    pickle_path = tmp_path / "EVA02_tiny.pt"
    torch.save({"state_dict": state_dict}, pickle_path)
    with pytest.raises(UnsafeCheckpointError, match="models pull"):
        load_eva_clip(pickle_path, config=TINY_EVA_CLIP)
    converted = convert_pickle_to_safetensors(pickle_path, tmp_path / "eva.safetensors")
    from_safetensors = load_eva_clip(converted)
    direct = EvaClipVision(TINY_EVA_CLIP)
    direct.load_checkpoint(state_dict)
    pixels = torch.randn(1, 3, 112, 112)
    with torch.inference_mode():
        assert torch.equal(direct(pixels)[0], from_safetensors.model(pixels)[0])
    # sizes that do not fit the tensors are reported as a layout problem
    with pytest.raises(PulidWeightsError, match="EVA02-CLIP"):
        load_eva_clip(converted, config=EvaClipConfig(img_size=112, embed_dim=64, depth=12, num_heads=2))
