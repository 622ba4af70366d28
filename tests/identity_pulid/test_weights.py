"""Loading PuLID weights: hub (from a local cache) or a file, safetensors only, hashes, tiny seeded files."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from imagegen.errors import UnsafeCheckpointError
from imagegen.identity.pulid.encoder import IDFormer, IDFormerConfig
from imagegen.identity.pulid.flux_ca import CrossAttentionConfig, PerceiverAttentionCA
from imagegen.identity.pulid.weights import (
    FLUX_METHOD,
    PulidWeightsError,
    file_sha256,
    load_pulid_flux,
    load_pulid_sdxl,
    read_state_dict,
)
from imagegen.pipelines.assets import convert_pickle_to_safetensors
from imagegen.settings import get_settings
from imagegen.standins.identity import TINY_FLUX_CA, TINY_IDFORMER, seeded_state_dict
from tests.conftest import tiny_method_files
from tests.identity_pulid._parity import seeded


def test_seeding_recipe_is_the_fixtures():
    shapes = {"a.weight": (3,), "a.bias": (3,), "b.weight": (2, 4), "latents": (1, 2, 3)}
    ours, theirs = seeded_state_dict(shapes), seeded().seeded_state_dict(shapes)
    assert all(torch.equal(ours[k], theirs[k]) for k in shapes)


def test_tiny_flux_file_loads_through_the_same_loader(isolated_home):
    path = tiny_method_files("tiny-flux", FLUX_METHOD)["weights"]
    assert path.name == "pulid_flux_v0.9.1.safetensors"  # the released name, under the released repo id
    assert "models--guozinan--PuLID" in str(path) and path.is_relative_to(get_settings().model_cache)
    first_hash = file_sha256(path)
    assert first_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    weights = load_pulid_flux(path)
    assert weights.encoder.config == TINY_IDFORMER
    assert [ca.config for ca in weights.cross_attentions] == [TINY_FLUX_CA] * 4
    assert (weights.double_interval, weights.single_interval) == (2, 4)
    assert weights.sha256 == first_hash and weights.cache_key == f"{FLUX_METHOD}:{first_hash}"
    tensors, _ = read_state_dict(path)
    assert any(k.startswith("pulid_encoder.") for k in tensors) and "pulid_ca.3.to_q.weight" in tensors
    assert torch.equal(weights.encoder.latents, tensors["pulid_encoder.latents"])


def test_pickle_files_are_refused_and_convert_with_tensors_only(tmp_path, isolated_home):
    # released head widths (64 per IDFormer head, 128 per cross-attention head) at toy sizes: a pickle has no
    # size metadata, so the loader reads the sizes from the tensors with the released head widths
    encoder_config = IDFormerConfig(**{**TINY_IDFORMER.to_dict(), "dim": 64, "dim_head": 64, "heads": 1})
    ca_config = CrossAttentionConfig(dim=64, dim_head=128, heads=1, kv_dim=TINY_IDFORMER.output_dim)
    tensors = {"pulid_encoder." + k: v for k, v in IDFormer(encoder_config).state_dict().items()}
    for i in range(4):
        tensors.update({f"pulid_ca.{i}." + k: v for k, v in PerceiverAttentionCA(ca_config).state_dict().items()})
    for suffix in (".bin", ".pt", ".pth", ".ckpt"):
        path = tmp_path / f"pulid{suffix}"
        torch.save(tensors, path)
        with pytest.raises(UnsafeCheckpointError, match="pickle"):
            load_pulid_flux(path)
    # the asset store's conversion reads it with torch.load(weights_only=True)
    converted = convert_pickle_to_safetensors(tmp_path / "pulid.bin", tmp_path / "pulid.safetensors")
    weights = load_pulid_flux(converted)
    assert weights.encoder.config == encoder_config
    assert [ca.config for ca in weights.cross_attentions] == [ca_config] * 4
    assert torch.equal(weights.cross_attentions[2].to_q.weight, tensors["pulid_ca.2.to_q.weight"])


def test_missing_and_wrong_files(tmp_path, isolated_home):
    with pytest.raises(PulidWeightsError, match="does not exist"):
        load_pulid_flux(tmp_path / "nope.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PulidWeightsError, match="safetensors"):
        load_pulid_flux(tmp_path / "garbage.safetensors")
    flux_file = tiny_method_files("tiny-flux", FLUX_METHOD)["weights"]
    with pytest.raises(PulidWeightsError, match="id_adapter"):
        load_pulid_sdxl(flux_file)
    sdxl_file = tiny_method_files("tiny-sdxl", "pulid-sdxl-v1.1")["weights"]
    with pytest.raises(PulidWeightsError, match="pulid_encoder"):
        load_pulid_flux(sdxl_file)


def test_hash_is_remembered_per_file_version(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert file_sha256(path) == hashlib.sha256(b"abc").hexdigest()
    path.write_bytes(b"abcd")
    os.utime(path, ns=(1, 1))
    assert file_sha256(path) == hashlib.sha256(b"abcd").hexdigest()
