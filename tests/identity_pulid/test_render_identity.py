"""PuLID end to end: registry → cached id tokens → batched renders on the tiny FLUX and SDXL presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagegen.identity.characters import approve_character, register_character
from imagegen.identity.conditioning import CharacterNotRenderableError, UnsupportedMethodError
from imagegen.identity.models import UnknownCharacterError
from imagegen.identity.provider import identity_renderer
from imagegen.identity.registry import Registry
from imagegen.pipelines.renderer import Renderer
from imagegen.pipelines.types import RenderRequest
from imagegen.settings import Settings
from tests.photos import astronaut_set, hopper_set

SYNTHETIC = {"kind": "synthetic", "creator": "tests"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    home = tmp_path_factory.mktemp("pulid-home")
    with Registry.open(Settings(home=home)) as registry:
        for character_id, files in (("mia", astronaut_set(4)), ("grace", hopper_set(3))):
            register_character(
                registry, character_id=character_id, name=character_id, provenance=SYNTHETIC, files=list(files)
            )
            approve_character(registry, character_id)
        register_character(
            registry, character_id="sketch", name="draft", provenance=SYNTHETIC, files=list(astronaut_set(2))
        )
        yield registry


@pytest.fixture(scope="module", params=["tiny-flux", "tiny-sdxl"])
def renderer(request, registry) -> Renderer:
    return identity_renderer(request.param, registry)


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def test_identity_changes_the_render_and_is_deterministic(renderer):
    [plain] = renderer.render([RenderRequest(prompt="a cafe", seed=5)])
    [with_id] = renderer.render([RenderRequest(prompt="a cafe", seed=5, character="mia")])
    [again] = renderer.render([RenderRequest(prompt="a cafe", seed=5, character="mia")])
    assert np.abs(pixels(plain) - pixels(with_id)).sum() > 0
    assert np.array_equal(pixels(with_id), pixels(again))
    meta = with_id.metadata()
    assert meta["character"] == "mia" and meta["method"] == renderer.preset.default_method


def test_weight_zero_is_exactly_the_plain_pipeline(renderer):
    [plain] = renderer.render([RenderRequest(prompt="portrait", seed=8)])
    [zero] = renderer.render([RenderRequest(prompt="portrait", seed=8, character="mia", identity_weight=0)])
    assert np.array_equal(pixels(plain), pixels(zero))


def test_start_step_beyond_the_last_step_is_no_identity(renderer):
    [plain] = renderer.render([RenderRequest(prompt="portrait", seed=9, steps=3)])
    [late] = renderer.render(
        [RenderRequest(prompt="portrait", seed=9, steps=3, character="mia", identity_start_step=4)]
    )
    assert np.array_equal(pixels(plain), pixels(late))


def test_mixed_batch_equals_each_sample_alone(renderer):
    requests = [
        RenderRequest(prompt="a cafe at night", seed=1, character="mia"),
        RenderRequest(prompt="a park", seed=2, character="grace", identity_weight=0.7),
        RenderRequest(prompt="a street", seed=3),
    ]
    batch = renderer.render(requests)
    assert [r.timings["batch_size"] for r in batch] == [3, 3, 3]  # one pipeline call
    for together, request in zip(batch, requests, strict=True):
        [alone] = renderer.render([request])
        assert np.abs(pixels(together) - pixels(alone)).max() <= 2


def test_tokens_are_cached_and_face_models_stay_off_the_hot_path(registry, renderer):
    renderer.render([RenderRequest(prompt="warm", seed=1, character="grace")])
    method = renderer.identity_method(renderer.preset.default_method)
    calls = method.calls
    renderer.render([RenderRequest(prompt="again", seed=2, character="grace")])
    assert method.calls == calls
    # a fresh renderer (a new replica) reads the registry's cache instead of recomputing
    fresh = identity_renderer(renderer.preset, registry)
    fresh.render([RenderRequest(prompt="again", seed=2, character="grace")])
    assert fresh.identity.conditioning_cache.computed == 0
    assert fresh.identity_method(renderer.preset.default_method).calls == 0


def test_changing_references_invalidates_the_cache(registry):
    register_character(registry, character_id="temp", name="temp", provenance=SYNTHETIC, files=list(astronaut_set(3)))
    approve_character(registry, "temp")
    renderer = identity_renderer("tiny-flux", registry)
    renderer.render([RenderRequest(prompt="x", seed=1, character="temp")])
    method = renderer.identity_method("pulid-flux-v0.9.1")
    key = ("temp", method.name, method.version, method.weights_hash)
    assert registry.conditioning.get(*key) is not None
    registry.characters.remove_references("temp", [registry.characters.get("temp").references[-1].digest])
    assert registry.conditioning.get(*key) is None
    registry.characters.delete("temp")


def test_a_deleted_character_never_renders_from_memory(registry):
    """Delete, then re-register the same id from other photos: the renderer's in-memory tensors are not reused."""
    register_character(registry, character_id="reused", name="r", provenance=SYNTHETIC, files=list(astronaut_set(3)))
    approve_character(registry, "reused")
    renderer = identity_renderer("tiny-flux", registry)
    renderer.render([RenderRequest(prompt="x", seed=3, character="reused")])
    first = renderer.identity.tensors_for("reused", renderer.conditioner("pulid-flux-v0.9.1"))
    registry.characters.delete("reused")
    with pytest.raises(UnknownCharacterError):
        renderer.render([RenderRequest(prompt="x", seed=3, character="reused")])
    register_character(registry, character_id="reused", name="r", provenance=SYNTHETIC, files=list(hopper_set(3)))
    approve_character(registry, "reused")  # the same id and the same version number as the first registration
    renderer.render([RenderRequest(prompt="x", seed=3, character="reused")])
    method = renderer.conditioner("pulid-flux-v0.9.1")
    stored = registry.conditioning.get("reused", method.name, method.version, method.weights_hash)
    in_memory = renderer.identity.tensors_for("reused", method)
    assert stored is not None and all(torch.equal(stored[k], in_memory[k]) for k in stored)
    assert not all(torch.equal(first[k], in_memory[k]) for k in first)
    registry.characters.delete("reused")


def test_detaching_leaves_no_residue(registry):
    renderer = identity_renderer("tiny-flux", registry)
    [before] = renderer.render([RenderRequest(prompt="x", seed=4)])
    renderer.render([RenderRequest(prompt="x", seed=4, character="mia")])
    renderer.detach_identity()
    [after] = renderer.render([RenderRequest(prompt="x", seed=4)])
    assert np.array_equal(pixels(before), pixels(after))


def test_refusals(renderer):
    with pytest.raises(UnknownCharacterError):
        renderer.render([RenderRequest(prompt="x", character="nobody")])
    with pytest.raises(CharacterNotRenderableError, match="draft"):
        renderer.render([RenderRequest(prompt="x", character="sketch")])
    with pytest.raises(UnsupportedMethodError, match="supported: "):
        renderer.render([RenderRequest(prompt="x", character="mia", method="ipadapter-nope")])
