"""IP-Adapter end to end: registry → cached embeddings → diffusers' loader → per-sample batches (tiny presets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imagegen.identity.characters import approve_character, register_character
from imagegen.identity.conditioning import UnsupportedMethodError
from imagegen.identity.ipadapter.adapter import LoadSpec, attach_ip_adapter, describe
from imagegen.identity.ipadapter.weights import FLUX_XLABS, IPAdapterWeightsError, adapter_files
from imagegen.identity.provider import identity_renderer
from imagegen.identity.registry import Registry
from imagegen.pipelines.renderer import Renderer
from imagegen.pipelines.types import RenderRequest
from imagegen.settings import Settings
from tests.conftest import tiny_method_files
from tests.photos import astronaut_set, hopper_set

SYNTHETIC = {"kind": "synthetic", "creator": "tests"}
#: (preset, method, what diffusers' loader builds from the released file: IP processor, image projection)
CASES = {
    "ipadapter-plus-face-sdxl": ("tiny-sdxl", "IPAdapterAttnProcessor2_0", "IPAdapterPlusImageProjection"),
    "ipadapter-faceid-plusv2-sdxl": ("tiny-sdxl", "IPAdapterAttnProcessor2_0", "IPAdapterFaceIDPlusImageProjection"),
    "ipadapter-flux": ("tiny-flux", "FluxIPAdapterAttnProcessor", "ImageProjection"),
}
SMALL = {"width": 32, "height": 32, "steps": 2}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    home = tmp_path_factory.mktemp("ipadapter-home")
    with Registry.open(Settings(home=home)) as registry:
        for character_id, files in (("mia", astronaut_set(2)), ("grace", hopper_set(2))):
            register_character(
                registry, character_id=character_id, name=character_id, provenance=SYNTHETIC, files=list(files)
            )
            approve_character(registry, character_id)
        yield registry


@pytest.fixture(scope="module")
def renderers(registry) -> dict[str, Renderer]:
    return {preset: identity_renderer(preset, registry) for preset in ("tiny-sdxl", "tiny-flux")}


@pytest.fixture(params=list(CASES))
def case(request, renderers) -> tuple[Renderer, str]:
    return renderers[CASES[request.param][0]], request.param


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def render(renderer: Renderer, **fields):
    [result] = renderer.render([RenderRequest(**{**SMALL, **fields})])
    return result


def test_loads_through_diffusers_from_the_released_layout(case):
    renderer, name = case
    _, ip_processor, projection = CASES[name]
    method = renderer.identity_method(name)
    info = describe(method.handle)
    assert info["ip_processors"] == [ip_processor] and info["projections"] == [projection]
    if renderer.preset.family == "sdxl":
        assert info["wrapped_layers"] == 8  # the tiny UNet's cross-attentions
    else:
        assert info["wrapped_layers"] == renderer.pipe.transformer.config.num_layers  # double blocks only
    assert info["lora_hooks"] == (64 if "faceid" in name else 0)  # 16 processors x q/k/v/out
    assert method.files.weight_file == tiny_method_files(renderer.preset.name, name)["weights"]
    # diffusers' converter filled the projection from the file (renamed keys, same numbers)
    released = load_file(str(method.files.weight_file))
    built = method.handle.projection.image_projection_layers[0].state_dict()
    if name == "ipadapter-plus-face-sdxl":
        assert torch.equal(built["latents"], released["image_proj.latents"])
    elif name == "ipadapter-faceid-plusv2-sdxl":
        assert torch.equal(built["proj_in.weight"], released["image_proj.perceiver_resampler.proj_in.weight"])
    else:
        assert torch.equal(built["image_embeds.weight"], released["ip_adapter_proj_model.proj.weight"])


def test_identity_changes_the_render_and_scale_zero_is_the_plain_pipeline(case):
    renderer, name = case
    plain = render(renderer, prompt="a cafe", seed=5)
    with_id = render(renderer, prompt="a cafe", seed=5, character="mia", method=name)
    again = render(renderer, prompt="a cafe", seed=5, character="mia", method=name)
    assert np.abs(pixels(plain) - pixels(with_id)).sum() > 0
    assert np.array_equal(pixels(with_id), pixels(again))
    assert with_id.metadata()["method"] == name
    zero = render(renderer, prompt="a cafe", seed=5, character="mia", method=name, identity_weight=0)
    # armed (weight 1) but no step is late enough: every wrapped layer must fall back to the plain one
    late = render(renderer, prompt="a cafe", seed=5, character="mia", method=name, identity_start_step=2)
    assert np.array_equal(pixels(plain), pixels(zero))
    assert np.array_equal(pixels(plain), pixels(late))


def test_mixed_batch_equals_each_sample_alone(case):
    renderer, name = case
    requests = [
        RenderRequest(prompt="a cafe at night", seed=1, character="mia", method=name, **SMALL),
        RenderRequest(prompt="a park", seed=2, character="grace", method=name, identity_weight=0.6, **SMALL),
        RenderRequest(prompt="a street", seed=3, **SMALL),
        RenderRequest(prompt="a beach", seed=4, character="mia", method=name, identity_start_step=1, **SMALL),
        RenderRequest(prompt="a forest", seed=5, character="grace", method=name, identity_weight=0, **SMALL),
    ]
    batch = renderer.render(requests)
    assert [r.timings["batch_size"] for r in batch] == [5] * 5  # one pipeline call
    for together, request in zip(batch, requests, strict=True):
        [alone] = renderer.render([request])
        assert np.abs(pixels(together) - pixels(alone)).max() <= 2


@pytest.mark.parametrize("name", ["ipadapter-plus-face-sdxl", "ipadapter-faceid-plusv2-sdxl"])
def test_sdxl_rows_at_any_weight_share_one_pass_of_each_cross_attention(renderers, name):
    """SDXL: rows at weight 1, at another weight and without identity go through one pass of diffusers' IP processor,
    each row's image-token values scaled by its weight (attention is linear in them): the text attention runs once
    per layer and step, not once for the IP output and again for a plain one to mix with."""
    renderer = renderers["tiny-sdxl"]
    render(renderer, prompt="a cafe", seed=5, character="mia", method=name)  # the method loaded
    cross = [module for path, module in renderer.pipe.unet.named_modules() if path.endswith("attn2")]
    calls = []
    hooks = [module.to_q.register_forward_hook(lambda *args: calls.append(1)) for module in cross]
    try:
        requests = [
            RenderRequest(prompt="a cafe", seed=1, character="mia", method=name, **SMALL),
            RenderRequest(prompt="a park", seed=2, character="grace", method=name, identity_weight=0.6, **SMALL),
            RenderRequest(prompt="a street", seed=3, **SMALL),
        ]
        renderer.render(requests)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == len(cross) * SMALL["steps"]  # CFG's two halves in one UNet call a step


def test_sdxl_without_cfg_batch_equals_each_sample_alone(renderers):
    renderer = renderers["tiny-sdxl"]
    common = {"guidance": 1.0, "method": "ipadapter-faceid-plusv2-sdxl", **SMALL}  # B rows, no negative half
    requests = [
        RenderRequest(prompt="a cafe", seed=1, character="grace", **common),
        RenderRequest(prompt="a park", seed=2, character="mia", identity_weight=0.5, **common),
        RenderRequest(prompt="a street", seed=3, guidance=1.0, **SMALL),
    ]
    batch = renderer.render(requests)
    for together, request in zip(batch, requests, strict=True):
        [alone] = renderer.render([request])
        assert np.abs(pixels(together) - pixels(alone)).max() <= 2


def test_flux_true_cfg_batch_equals_each_sample_alone(renderers):
    renderer = renderers["tiny-flux"]
    common = {"negative_prompt": "blurry", "true_cfg_scale": 2.0, "method": "ipadapter-flux", **SMALL}
    requests = [
        RenderRequest(prompt="a cafe", seed=1, character="grace", **common),
        RenderRequest(prompt="a park", seed=2, character="mia", identity_weight=0.5, **common),
    ]
    batch = renderer.render(requests)
    for together, request in zip(batch, requests, strict=True):
        [alone] = renderer.render([request])
        assert np.abs(pixels(together) - pixels(alone)).max() <= 2


def test_the_image_projection_runs_once_per_render_not_per_step(case):
    """The model calls its ``encoder_hid_proj`` at every step on the same embeddings; the projected tokens are kept
    for the batch (FaceID-Plus's projection is dozens of layers: paid per step, it was a third of SDXL's identity
    overhead on a GPU), and a new batch projects its own embeddings."""
    renderer, name = case
    render(renderer, prompt="warm", seed=1, character="mia", method=name)
    projection = renderer.identity_method(name).handle.projection
    calls = []
    hook = projection.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        first = render(renderer, prompt="a cafe", seed=5, character="mia", method=name, steps=3)
        assert len(calls) == 1
        other = render(renderer, prompt="a cafe", seed=5, character="grace", method=name, steps=3)
        assert len(calls) == 2
    finally:
        hook.remove()
    assert np.abs(pixels(first) - pixels(other)).sum() > 0  # the second batch did not reuse the first one's tokens


def test_image_token_keys_and_values_are_projected_once_per_render_not_per_step(case):
    """diffusers' IP processors project the image tokens to keys and values in every layer at every step; the
    tokens are the same all through a batch, so each projection is computed once per render whatever the steps, and
    the pixels are those of projecting at every step (the same arithmetic on the same tensors)."""
    renderer, name = case
    render(renderer, prompt="warm", seed=1, character="mia", method=name)
    kept = renderer.identity_method(name).handle.kept
    assert kept and len(kept) % 2 == 0  # to_k_ip and to_v_ip of every IP processor

    def computed(steps: int) -> tuple[int, object]:
        before = sum(k.computed for k in kept)
        result = render(renderer, prompt="a cafe", seed=5, character="mia", method=name, steps=steps)
        return sum(k.computed for k in kept) - before, result

    three, _ = computed(3)
    five, image = computed(5)
    assert three == five == len(kept), (three, five, len(kept))
    assert not any(k._kept for k in kept)  # forgotten when the batch ended: nothing of a render outlives it
    for k in kept:  # the Linears' own forward: projected at every step, as diffusers does
        k.remove()
    try:
        again = render(renderer, prompt="a cafe", seed=5, character="mia", method=name, steps=5)
    finally:
        for k in kept:
            k.linear.forward = k
    assert np.array_equal(pixels(image), pixels(again))


def test_faceid_lora_is_merged_for_whole_batch_calls_and_the_weights_come_back(renderers):
    """FaceID's LoRA on every attention projection is a hook per Linear per step, unless every row of a UNet call
    takes it: then the hooks are off and the weights merged for the batch. Rows that do not take it (a plain row, a
    start step not reached) get the hooks on the original weights; after the batch, and after a render that fails,
    the UNet holds its very own Parameter objects and every hook again."""
    renderer, name = renderers["tiny-sdxl"], "ipadapter-faceid-plusv2-sdxl"
    render(renderer, prompt="warm", seed=1, character="mia", method=name)
    lora = renderer.identity_method(name).handle.lora
    unet = renderer.pipe.unet
    weights = {key: param for key, param in unet.named_parameters()}
    seen: list[tuple[bool, int]] = []
    probe = unet.register_forward_pre_hook(lambda module, args: seen.append((lora.merged, lora.hooked)))
    try:
        alone = render(renderer, prompt="a cafe", seed=5, character="mia", method=name, steps=3)
        assert seen == [(True, 0)] * 3  # CFG in one call per step: negative and positive rows both take it
        seen.clear()
        late = render(renderer, prompt="a cafe", seed=5, character="mia", method=name, steps=3, identity_start_step=1)
        assert seen == [(False, len(lora.targets)), (True, 0), (True, 0)]
        seen.clear()
        mixed = renderer.render(
            [
                RenderRequest(prompt="a cafe", seed=5, character="mia", method=name, **{**SMALL, "steps": 3}),
                RenderRequest(prompt="a street", seed=3, **{**SMALL, "steps": 3}),
            ]
        )
        assert [r.timings["batch_size"] for r in mixed] == [2, 2]
        assert {state for state in seen} == {(False, len(lora.targets))}
    finally:
        probe.remove()
    assert lora.hooked == len(lora.targets) == 64 and not lora.merged
    assert all(param is weights[key] for key, param in unet.named_parameters())
    # the merged weights give what the hooks give (float32 here: rounding only)
    assert np.abs(pixels(alone) - pixels(mixed[0])).max() <= 2
    assert np.abs(pixels(alone) - pixels(late)).sum() > 0

    def fail(*args, **kwargs):
        raise RuntimeError("the VAE broke")

    decoder = renderer.pipe.vae.decode
    renderer.pipe.vae.decode = fail
    try:
        with pytest.raises(RuntimeError, match="the VAE broke"):
            render(renderer, prompt="a cafe", seed=5, character="mia", method=name)
    finally:
        renderer.pipe.vae.decode = decoder
    assert lora.hooked == 64 and not lora.merged
    assert all(param is weights[key] for key, param in unet.named_parameters())
    assert np.array_equal(
        pixels(render(renderer, prompt="a cafe", seed=5, character="mia", method=name, steps=3)), pixels(alone)
    )


def test_embeddings_are_cached_and_face_models_stay_off_the_hot_path(registry, case):
    renderer, name = case
    render(renderer, prompt="warm", seed=1, character="grace", method=name)
    method = renderer.identity_method(name)
    calls = method.calls
    render(renderer, prompt="again", seed=2, character="grace", method=name)
    assert method.calls == calls
    fresh = identity_renderer(renderer.preset, registry)  # a new replica reads the registry's cache
    render(fresh, prompt="again", seed=2, character="grace", method=name)
    assert fresh.identity.conditioning_cache.computed == 0
    assert fresh.identity_method(name).calls == 0


def test_unsupported_pairs_list_what_is_supported(renderers):
    with pytest.raises(
        UnsupportedMethodError,
        match="'ipadapter-flux' is not supported by preset 'tiny-sdxl'; supported: pulid-sdxl-v1.1, "
        "ipadapter-faceid-plusv2-sdxl, ipadapter-plus-face-sdxl",
    ):
        renderers["tiny-sdxl"].render([RenderRequest(prompt="x", character="mia", method="ipadapter-flux")])
    with pytest.raises(UnsupportedMethodError, match="supported: pulid-flux-v0.9.1, ipadapter-flux"):
        renderers["tiny-flux"].render([RenderRequest(prompt="x", character="mia", method="ipadapter-plus-face-sdxl")])


def test_a_checkpoint_for_another_model_is_refused_and_changes_nothing(renderers):
    renderer = renderers["tiny-sdxl"]
    renderer.detach_identity()
    pipe = renderer.pipe
    processors, config = dict(pipe.unet.attn_processors), dict(pipe.config)
    with pytest.raises(IPAdapterWeightsError, match="ip_adapter.safetensors could not be loaded into this sdxl"):
        xlabs = tiny_method_files("tiny-flux", "ipadapter-flux")
        spec = LoadSpec(adapter_files(FLUX_XLABS, xlabs["weights"], xlabs["image_encoder"]))
        attach_ip_adapter(pipe, "sdxl", spec)  # XLabs' FLUX file
    assert all(pipe.unet.attn_processors[n] is p for n, p in processors.items())
    assert dict(pipe.config) == config and getattr(pipe.unet, "encoder_hid_proj", None) is None


@pytest.mark.parametrize("change", ["extra", "missing_ip", "missing_projection"])
def test_a_file_with_extra_or_missing_keys_is_refused_and_changes_nothing(renderers, change):
    """diffusers alone skips unknown keys and leaves missing ones unfilled; imagegen refuses both."""
    from imagegen.identity.ipadapter.weights import PLUS_FACE_SDXL, read_adapter_state_dict

    renderer = renderers["tiny-sdxl"]
    renderer.detach_identity()
    pipe = renderer.pipe
    processors, config = dict(pipe.unet.attn_processors), dict(pipe.config)
    files = tiny_method_files("tiny-sdxl", "ipadapter-plus-face-sdxl")
    state = read_adapter_state_dict(files["weights"])
    if change == "extra":
        state["ip_adapter"]["999.to_k_ip.weight"] = state["ip_adapter"]["1.to_k_ip.weight"]
    elif change == "missing_ip":
        del state["ip_adapter"]["1.to_v_ip.weight"]
    else:
        del state["image_proj"]["proj_out.weight"]
    spec = LoadSpec(adapter_files(PLUS_FACE_SDXL, files["weights"], files["image_encoder"]), state_dict=state)
    with pytest.raises(IPAdapterWeightsError, match="could not be loaded"):
        attach_ip_adapter(pipe, "sdxl", spec)
    assert all(pipe.unet.attn_processors[n] is p for n, p in processors.items())
    assert dict(pipe.config) == config and getattr(pipe.unet, "encoder_hid_proj", None) is None


def test_a_merge_that_fails_half_way_leaves_the_weights_as_they_were(renderers):
    """FaceID's merge adds to the weights in place; one that fails part-way (out of memory on a delta) must not leave
    the projections it reached merged under the hooks: the render fails, and the UNet's weights are its own, bit for
    bit, for the next render."""
    renderer, name = renderers["tiny-sdxl"], "ipadapter-faceid-plusv2-sdxl"
    render(renderer, prompt="warm", seed=1, character="mia", method=name)
    lora = renderer.identity_method(name).handle.lora
    unet = renderer.pipe.unet
    before = {key: param.detach().clone() for key, param in unet.named_parameters()}
    hook = lora.targets[len(lora.targets) // 2][1]

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    hook.weight_delta = out_of_memory
    try:
        with pytest.raises(torch.OutOfMemoryError):
            render(renderer, prompt="a cafe", seed=5, character="mia", method=name, steps=2)
    finally:
        del hook.weight_delta
    assert not lora.merged and lora.hooked == len(lora.targets)
    assert all(torch.equal(param.detach(), before[key]) for key, param in unet.named_parameters())


def test_a_switch_back_onto_replaced_processors_builds_the_adapter_anew(renderers):
    """A detached adapter's layers wrap the processors the model had when it was built. If something replaced those
    processors meanwhile, putting the old layers back would call stale processors: the handle refuses, changes
    nothing, and the conditioner builds the adapter again around the processors the model has now."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    renderer, name = renderers["tiny-sdxl"], "ipadapter-plus-face-sdxl"
    before = pixels(render(renderer, prompt="a cafe", seed=3, character="mia", method=name))
    handle = renderer.identity_method(name).handle
    renderer.detach_identity()
    unet = renderer.pipe.unet
    originals = dict(unet.attn_processors)
    unet.set_attn_processor(AttnProcessor2_0())  # new objects of the same kind everywhere
    replaced = dict(unet.attn_processors)
    try:
        assert not handle.reattach() and not handle.attached
        assert all(unet.attn_processors[n] is p for n, p in replaced.items())
        again = pixels(render(renderer, prompt="a cafe", seed=3, character="mia", method=name))
        rebuilt = renderer.identity_method(name).handle
        assert rebuilt is not handle and np.array_equal(again, before)
        current = replaced.values()
        wrapped = [p for p in unet.attn_processors.values() if not any(p is r for r in current)]
        assert wrapped and all(any(p.plain is r for r in current) for p in wrapped)  # around today's processors
    finally:
        renderer.detach_identity()
        unet.set_attn_processor(originals)
