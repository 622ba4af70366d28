"""The tiny repos are complete diffusers repos, deterministic, and load through from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from imagegen.pipelines.loading import load_pipeline
from imagegen.pipelines.presets import get_preset
from imagegen.pipelines.tiny import ensure_tiny_repo, is_current

COMPONENTS = {
    "flux": {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"},
    "sdxl": {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"},
}


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_tiny_repo_has_the_hub_layout(family, tmp_path):
    repo = ensure_tiny_repo(family, tmp_path)
    index = json.loads((repo / "model_index.json").read_text())
    assert COMPONENTS[family] <= set(index)
    weights = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.suffix in {".safetensors", ".bin"})
    assert weights and all(w.endswith(".safetensors") for w in weights), weights
    assert (repo / "tokenizer" / "tokenizer.json").exists() and (repo / "tokenizer_2" / "tokenizer.json").exists()
    assert is_current(repo)


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_tiny_weights_are_the_same_on_every_build(family, tmp_path):
    first = ensure_tiny_repo(family, tmp_path / "a")
    second = ensure_tiny_repo(family, tmp_path / "b")
    for path in first.rglob("*.safetensors"):
        a = load_file(path)
        b = load_file(second / path.relative_to(first))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), path
    for tok in ("tokenizer", "tokenizer_2"):
        assert (first / tok / "tokenizer.json").read_text() == (second / tok / "tokenizer.json").read_text()


def test_tokenizers_are_real_and_reload(flux_renderer):
    pipe = flux_renderer.pipe
    clip = pipe.tokenizer("A photo of a woman at a cafe", padding="max_length", max_length=77)
    assert len(clip.input_ids) == 77 and clip.input_ids[0] == pipe.tokenizer.bos_token_id
    assert pipe.tokenizer.decode(clip.input_ids, skip_special_tokens=True).strip() == "a photo of a woman at a cafe"
    t5 = pipe.tokenizer_2("portrait of a man").input_ids
    assert t5[-1] == pipe.tokenizer_2.eos_token_id and pipe.tokenizer_2.unk_token_id not in t5


def test_rebuilds_a_stale_repo(tmp_path):
    repo = ensure_tiny_repo("sdxl", tmp_path)
    (repo / "imagegen_tiny.json").write_text(json.dumps({"version": -1}))
    assert not is_current(repo)
    assert is_current(ensure_tiny_repo("sdxl", tmp_path))


def test_load_pipeline_goes_through_from_pretrained(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEGEN_MODEL_CACHE_DIR", str(tmp_path))
    from imagegen.settings import get_settings

    get_settings.cache_clear()
    pipe = load_pipeline(get_preset("tiny-sdxl"), torch.device("cpu"), torch.float32)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    # from_pretrained records where the weights came from: the repo written in this cache
    assert pipe.config._name_or_path == str(tmp_path / "tiny" / "sdxl")
    get_settings.cache_clear()
