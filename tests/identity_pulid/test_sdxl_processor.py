"""PuLID v1.1's SDXL attention processor: the reference figures, per-sample scales, CFG, attach / detach."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from imagegen.identity.pulid.sdxl_processor import (
    PulidSDXLAttnProcessor,
    PulidSDXLHandle,
    PulidSDXLState,
    attach_pulid_sdxl,
    cross_attention_layers,
)
from imagegen.identity.pulid.weights import load_pulid_sdxl
from tests.conftest import tiny_method_files
from tests.identity_pulid._parity import assert_matches, fixture, seeded

CASES = fixture("pulid_sdxl_attn_processor_parity.json")


def ortho_of(case: dict) -> str | None:
    return "v2" if case["ortho_v2"] else "v1" if case["ortho"] else None


@pytest.fixture
def tiny_attention():
    """The fixture's tiny diffusers Attention with a PuLID processor (seeded weights) and its inputs."""
    attn = Attention(query_dim=64, cross_attention_dim=48, heads=2, dim_head=32, bias=False, out_bias=True)
    processor = PulidSDXLAttnProcessor(64, 48)
    attn.set_processor(processor)
    attn.load_state_dict(seeded().seeded_state_dict(CASES["state_dict_keys"]), strict=True)
    s = seeded()
    inputs = {
        "hidden": s.seeded_tensor("sdxl.hidden", (2, 16, 64)),
        "text": s.seeded_tensor("sdxl.text", (2, 7, 48)),
        "id": 20.0 * s.seeded_tensor("sdxl.id", (2, 32, 48)),
    }
    return attn, processor, inputs


@torch.inference_mode()
def test_reference_cases(tiny_attention):
    attn, _, x = tiny_attention
    assert_matches(attn(x["hidden"], x["text"]), CASES["no_id"], "no id")
    for case in CASES["cases"]:
        out = attn(
            x["hidden"],
            x["text"],
            id_embedding=x["id"],
            id_scale=case["id_scale"],
            num_zero=case["num_zero"],
            ortho=ortho_of(case),
        )
        assert_matches(out, case["output"], f"num_zero={case['num_zero']} ortho={ortho_of(case)}")


@torch.inference_mode()
def test_state_gives_the_same_results_and_scale_zero_is_exactly_plain(tiny_attention):
    attn, processor, x = tiny_attention
    plain_attention = Attention(query_dim=64, cross_attention_dim=48, heads=2, dim_head=32, bias=False, out_bias=True)
    plain_attention.load_state_dict({k: v for k, v in attn.state_dict().items() if "processor" not in k})
    plain_attention.set_processor(AttnProcessor2_0())
    plain = plain_attention(x["hidden"], x["text"])
    handle = PulidSDXLHandle(None, {}, {})
    processor.__dict__["handle"] = handle
    for case in CASES["cases"]:
        ortho, scale = ortho_of(case), case["id_scale"]
        state = PulidSDXLState(x["id"], scale, num_zero=case["num_zero"], ortho=ortho)
        with handle.use(state):
            assert_matches(attn(x["hidden"], x["text"]), case["output"])
        # a batch mixing a character (row 0) and a sample without one (row 1)
        with handle.use(PulidSDXLState(x["id"], [scale, 0.0], num_zero=case["num_zero"], ortho=ortho)):
            mixed = attn(x["hidden"], x["text"])
        assert torch.equal(mixed[1], plain[1])
        full = attn(
            x["hidden"], x["text"], id_embedding=x["id"], id_scale=scale, num_zero=case["num_zero"], ortho=ortho
        )
        assert torch.allclose(mixed[0], full[0], atol=1e-6)
    with handle.use(PulidSDXLState(x["id"], 0.0)):
        assert torch.equal(attn(x["hidden"], x["text"]), plain)
    assert torch.equal(attn(x["hidden"], x["text"]), plain)  # no state: plain


@torch.inference_mode()
def test_cfg_batch_and_start_step(tiny_attention):
    attn, processor, x = tiny_attention
    handle = PulidSDXLHandle(None, {}, {})
    processor.__dict__["handle"] = handle
    uncond = torch.randn(2, 32, 48)
    hidden = torch.cat([x["hidden"], x["hidden"].flip(0)])
    text = torch.cat([x["text"], x["text"]])
    state = PulidSDXLState(x["id"], [0.8, 0.5], uncond_id_tokens=uncond, num_zero=8, ortho="v2", start_step=[0, 1])
    with handle.use(state):
        step0 = attn(hidden, text)
        state.callback(None, 0, None, {})
        step1 = attn(hidden, text)
    expected0 = attn(
        hidden, text, id_embedding=torch.cat([uncond, x["id"]]), id_scale=[0.8, 0.0, 0.8, 0.0], num_zero=8, ortho="v2"
    )
    expected1 = attn(
        hidden, text, id_embedding=torch.cat([uncond, x["id"]]), id_scale=[0.8, 0.5, 0.8, 0.5], num_zero=8, ortho="v2"
    )
    assert torch.allclose(step0, expected0, atol=1e-6) and torch.allclose(step1, expected1, atol=1e-6)
    # without negative id tokens the negative half gets no identity
    no_uncond = PulidSDXLState(x["id"], 0.8, num_zero=8, ortho="v2")
    with handle.use(no_uncond):
        out = attn(hidden, text)
    plain = attn(hidden, text)
    assert torch.equal(out[:2], plain[:2]) and not torch.equal(out[2:], plain[2:])
    with handle.use(no_uncond), pytest.raises(ValueError, match="3 rows"):
        attn(hidden[:3], text[:3])


def test_state_validation():
    with pytest.raises(ValueError, match="ortho"):
        PulidSDXLState(torch.zeros(1, 4, 8), ortho="v3")
    with pytest.raises(ValueError, match="one value per sample"):
        PulidSDXLState(torch.zeros(2, 4, 8), scale=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="must match"):
        PulidSDXLState(torch.zeros(2, 4, 8), uncond_id_tokens=torch.zeros(1, 4, 8))


# the tiny SDXL pipeline --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_pipe():
    from imagegen.pipelines.loading import load_pipeline
    from imagegen.pipelines.presets import get_preset

    return load_pipeline(get_preset("tiny-sdxl"), torch.device("cpu"), torch.float32)


def render(pipe, seeds, state=None, handle=None, guidance=5.0, steps=3):
    kwargs = dict(
        prompt=["a portrait of a woman", "a knight in armour"][: len(seeds)],
        height=32,
        width=32,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    )
    with torch.inference_mode():
        if state is None:
            return pipe(**kwargs).images
        with handle.use(state):
            return pipe(**kwargs, callback_on_step_end=state.chain(None)).images


def test_tiny_pipeline_mixed_batch_start_step_and_detach(sdxl_pipe, isolated_home):
    weights = load_pulid_sdxl(tiny_method_files("tiny-sdxl", "pulid-sdxl-v1.1")["weights"])
    unet = sdxl_pipe.unet
    layers = cross_attention_layers(unet)
    assert {f"id_adapter_attn_layers.{i}.id_to_k.weight" for i, _, _ in layers} <= set(weights.layer_weights)
    plain = render(sdxl_pipe, [1, 2])
    originals = unet.attn_processors
    handle = weights.attach(unet)
    try:
        with pytest.raises(RuntimeError, match="already attached"):
            weights.attach(unet)
        id_dim = weights.encoder.config.id_dim
        x = torch.randn(2, id_dim)
        y = [torch.randn(2, 65, weights.encoder.config.vit_dim) for _ in range(5)]
        with torch.inference_mode():
            tokens, uncond = weights.encoder(x, y), weights.encoder.unconditional(x, y)
        state = PulidSDXLState(tokens * 50, [2.0, 0.0], uncond_id_tokens=uncond * 50, num_zero=0, ortho=None)
        mixed = render(sdxl_pipe, [1, 2], state, handle)
        assert np.array_equal(mixed[1], plain[1])
        assert np.abs(mixed[0] - plain[0]).max() > 1e-4
        late = PulidSDXLState(tokens * 50, 2.0, uncond_id_tokens=uncond * 50, num_zero=0, ortho=None, start_step=3)
        assert np.array_equal(render(sdxl_pipe, [1, 2], late, handle), plain)
        assert late.step == 3
        # PuLID v1.1 defaults (num_zero 20, ortho v2, scale 0.8) run through the pipeline too
        default = render(sdxl_pipe, [1], PulidSDXLState(tokens[:1] * 50, uncond_id_tokens=uncond[:1] * 50), handle)
        assert np.isfinite(default).all()
    finally:
        handle.detach()
    assert all(unet.attn_processors[name] is proc for name, proc in originals.items())
    assert not any("processor" in key for key in unet.state_dict())
    assert np.array_equal(render(sdxl_pipe, [1, 2]), plain)
    again = PulidSDXLState(tokens * 50, [2.0, 0.0], uncond_id_tokens=uncond * 50, num_zero=0, ortho=None)
    with pytest.raises(RuntimeError, match="detached"), handle.use(again):
        pass  # a detached handle refuses a batch rather than render it without identity
    # a switch back: the same processors installed again render what they rendered before
    installed = dict(handle.processors)
    assert handle.reattach()
    try:
        assert all(unet.attn_processors[name] is proc for name, proc in installed.items())
        assert np.array_equal(render(sdxl_pipe, [1, 2], again, handle), mixed)
    finally:
        handle.detach()
    assert np.array_equal(render(sdxl_pipe, [1, 2]), plain)


def test_weights_that_do_not_fit_the_unet_are_refused(sdxl_pipe, isolated_home):
    weights = load_pulid_sdxl(tiny_method_files("tiny-sdxl", "pulid-sdxl-v1.1")["weights"])
    broken = dict(weights.layer_weights)
    first = next(iter(sorted(broken)))
    broken[first.replace(first.split(".")[1], "0", 1)] = broken.pop(first)
    with pytest.raises(ValueError, match="do not fit this UNet"):
        attach_pulid_sdxl(sdxl_pipe.unet, broken)
    assert not hasattr(sdxl_pipe.unet, "_imagegen_pulid_sdxl")
