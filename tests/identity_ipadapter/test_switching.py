"""Switching identity methods on a loaded pipeline: no reload of the base model nor of a method's layers, no residue
after detaching."""

from __future__ import annotations

import numpy as np
import pytest

from imagegen.identity.characters import approve_character, register_character
from imagegen.identity.provider import identity_renderer
from imagegen.identity.registry import Registry
from imagegen.pipelines.renderer import Renderer
from imagegen.pipelines.types import RenderRequest
from imagegen.settings import Settings
from tests.photos import astronaut_set

SYNTHETIC = {"kind": "synthetic", "creator": "tests"}
SMALL = {"width": 32, "height": 32, "steps": 2}
#: preset -> methods visited in turn (PuLID, IP-Adapter(s), then each of them again)
ROUNDS = {
    "tiny-sdxl": [
        "pulid-sdxl-v1.1",
        "ipadapter-faceid-plusv2-sdxl",
        "ipadapter-plus-face-sdxl",
        "pulid-sdxl-v1.1",
        "ipadapter-faceid-plusv2-sdxl",
        "ipadapter-plus-face-sdxl",
    ],
    "tiny-flux": ["pulid-flux-v0.9.1", "ipadapter-flux", "pulid-flux-v0.9.1", "ipadapter-flux"],
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    home = tmp_path_factory.mktemp("switch-home")
    with Registry.open(Settings(home=home)) as registry:
        register_character(registry, character_id="mia", name="Mia", provenance=SYNTHETIC, files=list(astronaut_set(2)))
        approve_character(registry, "mia")
        yield registry


def plain(renderer: Renderer) -> np.ndarray:
    [result] = renderer.render([RenderRequest(prompt="a portrait", seed=11, **SMALL)])
    return np.asarray(result.image)


def hooks(module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize("preset", list(ROUNDS))
def test_switching_methods_keeps_the_model_and_leaves_no_residue(registry, preset):
    renderer = identity_renderer(preset, registry)
    pipe = renderer.pipe
    model = pipe.unet if renderer.preset.family == "sdxl" else pipe.transformer
    processors = dict(model.attn_processors)
    keys = list(model.state_dict())
    config, pipe_config = dict(model.config), dict(pipe.config)
    before = plain(renderer)

    rendered, installed = {}, {}
    for name in ROUNDS[preset]:
        [result] = renderer.render([RenderRequest(prompt="a cafe", seed=3, character="mia", method=name, **SMALL)])
        assert renderer.pipe is pipe and (pipe.unet if renderer.preset.family == "sdxl" else pipe.transformer) is model
        assert renderer._attached == name
        image = np.asarray(result.image)
        assert name not in rendered or np.array_equal(rendered[name], image)  # switching back renders the same
        rendered[name] = image
        # switching back installs the very layers of the first attach: nothing is loaded or built again, and their
        # weights and identity slots keep their addresses (what compiled blocks and CUDA graphs were made with)
        layers = {n: p for n, p in model.attn_processors.items() if p is not processors[n]}
        on = [h for m in model.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
        layers["hooks"] = sorted(id(getattr(h, "__self__", h)) for h in on)  # a bound method: its object
        assert installed.setdefault(name, layers) == layers
    assert len({img.tobytes() for img in rendered.values()}) == len(rendered)  # every method did something

    renderer.detach_identity()
    assert renderer.pipe is pipe
    current = model.attn_processors
    assert all(current[n] is processors[n] for n in processors)  # the very same processor objects
    assert list(model.state_dict()) == keys and hooks(model) == 0
    assert dict(model.config) == config and dict(pipe.config) == pipe_config
    assert getattr(model, "encoder_hid_proj", None) is None and getattr(pipe, "feature_extractor", None) is None
    after = plain(renderer)
    fresh = plain(identity_renderer(preset, registry))
    assert np.array_equal(after, before)
    assert np.array_equal(after, fresh)


def test_a_list_mixing_methods_renders_the_attached_one_first(registry):
    """One switch, not two: with method B attached, a list asking for A then B renders B's call first."""
    renderer = identity_renderer("tiny-flux", registry)
    first, second = ROUNDS["tiny-flux"][:2]
    ask = [RenderRequest(prompt="a cafe", seed=3, character="mia", method=m, **SMALL) for m in (first, second)]
    renderer.render([ask[1]])
    assert renderer._attached == second
    results = renderer.render(ask)
    assert renderer._attached == first  # the second method's call ran first, while attached; then one switch
    assert [r.seed for r in results] == [3, 3] and all(r.ok for r in results)
    alone = [renderer.render([request])[0] for request in ask]
    for result, single in zip(results, alone, strict=True):  # each result is its own request's, in the list's order
        assert np.array_equal(np.asarray(result.image), np.asarray(single.image))
    renderer.detach_identity()
