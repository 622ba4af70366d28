"""Rendering with real tiny diffusers pipelines: shapes, determinism, batch invariance, bad output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagegen.errors import BadOutputError, InvalidRequestError
from imagegen.pipelines.types import RenderRequest


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def test_renders_requested_size_and_records_everything(renderer):
    [result] = renderer.render([RenderRequest(prompt="a cafe at night", seed=3, width=48, height=32, steps=2)])
    assert result.ok and result.image.size == (48, 32) and result.image.mode == "RGB"
    meta = result.metadata()
    assert (meta["seed"], meta["steps"], meta["preset"]) == (3, 2, renderer.preset.name)
    assert meta["versions"]["diffusers"] and meta["versions"]["torch"]
    assert meta["timings"]["total_s"] > 0 and meta["timings"]["batch_size"] == 1


def test_same_seed_same_pixels_different_seed_different(renderer):
    [a] = renderer.render([RenderRequest(prompt="portrait", seed=11)])
    [b] = renderer.render([RenderRequest(prompt="portrait", seed=11)])
    [c] = renderer.render([RenderRequest(prompt="portrait", seed=12)])
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).mean() > 5


def test_request_alone_equals_request_inside_mixed_batch(renderer):
    target = RenderRequest(prompt="a woman at a cafe", negative_prompt="blurry", seed=42)
    others = [
        RenderRequest(prompt="a man in a studio", seed=1),
        RenderRequest(prompt="watercolor knight", seed=2),
        RenderRequest(prompt="a woman at a cafe", seed=3),
    ]
    [alone] = renderer.render([target])
    batch = renderer.render([others[0], target, *others[1:]])
    assert batch[1].request.seed == 42 and batch[1].timings["batch_size"] == 4
    diff = np.abs(pixels(alone) - pixels(batch[1]))
    assert diff.max() <= 2, diff.max()


def test_incompatible_requests_are_split_but_keep_order(renderer):
    requests = [
        RenderRequest(prompt="a", seed=1, steps=2),
        RenderRequest(prompt="b", seed=2, steps=3),
        RenderRequest(prompt="c", seed=3, steps=2, width=32, height=32),
    ]
    results = renderer.render(requests)
    assert [r.request.prompt for r in results] == ["a", "b", "c"]
    assert [r.timings["batch_size"] for r in results] == [1, 1, 1]
    assert results[2].image.size == (32, 32)


def test_prompt_embeddings_are_cached(renderer):
    request = RenderRequest(prompt="a unique prompt for the cache test", seed=5)
    renderer.render([request])
    misses = renderer.prompt_cache.misses
    renderer.render([request.model_copy(update={"seed": 6})])
    assert renderer.prompt_cache.misses == misses


def test_progress_reports_every_step(renderer):
    seen = []
    renderer.render(
        [RenderRequest(prompt="x", seed=1, steps=3)], progress=lambda done, total: seen.append((done, total))
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_seed_is_drawn_and_reported_when_missing(renderer):
    [result] = renderer.render([RenderRequest(prompt="x", steps=1)])
    assert isinstance(result.seed, int)
    [again] = renderer.render([RenderRequest(prompt="x", steps=1, seed=result.seed)])
    assert np.array_equal(pixels(result), pixels(again))


@pytest.mark.parametrize(
    "fields, field",
    [({"width": 63}, "width"), ({"height": 1024}, "height"), ({"steps": 51}, "steps")],
)
def test_requests_outside_the_preset_are_refused(renderer, fields, field):
    with pytest.raises(InvalidRequestError) as info:
        renderer.render([RenderRequest(prompt="x", **fields)])
    assert info.value.field == field


def test_sdxl_refuses_true_cfg(sdxl_renderer):
    with pytest.raises(InvalidRequestError, match="FLUX presets only"):
        sdxl_renderer.render([RenderRequest(prompt="x", true_cfg_scale=2.0)])


def test_flux_true_cfg_uses_the_negative_prompt(flux_renderer):
    base = RenderRequest(prompt="a cafe", seed=9, true_cfg_scale=3.0, negative_prompt="blurry")
    a, b = flux_renderer.render([base, base.model_copy(update={"negative_prompt": "neon city street"})])
    assert np.abs(pixels(a) - pixels(b)).mean() > 1


@pytest.fixture
def broken_vae(renderer):
    """Sabotage the decoder's last layer of the loaded pipeline, restoring it afterwards."""
    conv = renderer.pipe.vae.decoder.conv_out
    saved = (conv.weight.detach().clone(), conv.bias.detach().clone())
    yield conv
    with torch.no_grad():
        conv.weight.copy_(saved[0])
        conv.bias.copy_(saved[1])


def test_nan_output_is_detected(renderer, broken_vae):
    with torch.no_grad():
        broken_vae.weight.fill_(float("nan"))
    [result] = renderer.render([RenderRequest(prompt="x", seed=1, steps=1)])
    assert result.problem == "nan" and result.image is None and not result.ok
    with pytest.raises(BadOutputError, match="seed 1: nan"):
        renderer.render([RenderRequest(prompt="x", seed=1, steps=1)], strict=True)


def test_black_output_is_detected(renderer, broken_vae):
    with torch.no_grad():
        broken_vae.weight.zero_()
        broken_vae.bias.fill_(-10.0)
    [result] = renderer.render([RenderRequest(prompt="x", seed=1, steps=1)])
    assert result.problem == "black"
