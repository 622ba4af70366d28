"""Loading PuLID weights: hub (from a local cache) or a file, safetensors only, hashes, tiny seeded files."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from imagegen.errors import ModelNotAvailableError, UnsafeCheckpointError
from imagegen.identity.pulid.encoder import IDFormer, IDFormerConfig
from imagegen.identity.pulid.flux_ca import CrossAttentionConfig, PerceiverAttentionCA
from imagegen.identity.pulid.weights import (
    FLUX_METHOD,
    PULID_FLUX_FILE,
    PULID_REPO,
    TINY_FLUX_CA,
    TINY_IDFORMER,
    PulidWeightsError,
    ensure_tiny_weights,
    file_sha256,
    load_pulid_flux,
    load_pulid_sdxl,
    load_tiny_pulid_flux,
    read_state_dict,
    save_safetensors,
    seeded_state_dict,
    tiny_flux_state_dict,
    tiny_weights_path,
)
from imagegen.settings import get_settings
from tests.identity_pulid._parity import seeded


def test_seeding_recipe_is_the_fixtures():
    shapes = {"a.weight": (3,), "a.bias": (3,), "b.weight": (2, 4), "latents": (1, 2, 3)}
    ours, theirs = seeded_state_dict(shapes), seeded().seeded_state_dict(shapes)
    assert all(torch.equal(ours[k], theirs[k]) for k in shapes)


def test_tiny_flux_file_is_deterministic_and_loads_through_the_same_loader(isolated_home):
    path = ensure_tiny_weights("flux")
    assert path == tiny_weights_path("flux") and path.is_relative_to(get_settings().model_cache)
    first_hash = file_sha256(path)
    assert first_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    mtime = path.stat().st_mtime_ns
    assert ensure_tiny_weights("flux") == path and path.stat().st_mtime_ns == mtime  # current: not rewritten
    ensure_tiny_weights("flux", force=True)
    assert file_sha256(path) == first_hash  # rebuilt byte for byte
    weights = load_tiny_pulid_flux()
    assert weights.encoder.config == TINY_IDFORMER
    assert [ca.config for ca in weights.cross_attentions] == [TINY_FLUX_CA] * 4
    assert (weights.double_interval, weights.single_interval) == (2, 4)
    assert weights.sha256 == first_hash and weights.cache_key == f"{FLUX_METHOD}:{first_hash}"
    tensors, metadata = read_state_dict(path)
    assert any(k.startswith("pulid_encoder.") for k in tensors) and "pulid_ca.3.to_q.weight" in tensors
    assert torch.equal(weights.encoder.latents, tensors["pulid_encoder.latents"])


def test_hub_download_uses_the_model_cache(isolated_home, monkeypatch):
    monkeypatch.setenv("IMAGEGEN_ALLOW_DOWNLOADS", "false")
    get_settings.cache_clear()
    with pytest.raises(ModelNotAvailableError, match=PULID_FLUX_FILE):
        load_pulid_flux()
    # a hub cache entry, laid out the way huggingface_hub writes it, is found offline by the real hub code
    tensors, metadata = tiny_flux_state_dict()
    commit = "0" * 40
    repo_dir = get_settings().model_cache / "hub" / ("models--" + PULID_REPO.replace("/", "--"))
    save_safetensors(tensors, repo_dir / "snapshots" / commit / PULID_FLUX_FILE, metadata)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    weights = load_pulid_flux()
    assert weights.path.name == PULID_FLUX_FILE and weights.encoder.config == TINY_IDFORMER


def test_pickle_files_are_refused_unless_allowed(tmp_path, isolated_home):
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
    weights = load_pulid_flux(tmp_path / "pulid.bin", allow_pickle=True)  # read with torch.load(weights_only=True)
    assert weights.encoder.config == encoder_config
    assert [ca.config for ca in weights.cross_attentions] == [ca_config] * 4
    assert torch.equal(weights.cross_attentions[2].to_q.weight, tensors["pulid_ca.2.to_q.weight"])


def test_missing_and_wrong_files(tmp_path, isolated_home):
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        load_pulid_flux(tmp_path / "nope.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PulidWeightsError, match="safetensors"):
        load_pulid_flux(tmp_path / "garbage.safetensors")
    flux_file = ensure_tiny_weights("flux")
    with pytest.raises(PulidWeightsError, match="id_adapter"):
        load_pulid_sdxl(flux_file)
    sdxl_file = ensure_tiny_weights("sdxl")
    with pytest.raises(PulidWeightsError, match="pulid_encoder"):
        load_pulid_flux(sdxl_file)


def test_hash_is_remembered_per_file_version(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert file_sha256(path) == hashlib.sha256(b"abc").hexdigest()
    path.write_bytes(b"abcd")
    os.utime(path, ns=(1, 1))
    assert file_sha256(path) == hashlib.sha256(b"abcd").hexdigest()
