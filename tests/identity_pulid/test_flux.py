"""PuLID-FLUX on diffusers' FluxTransformer2DModel: BFL conversion, the tiny reference transformer, per-sample
weights, the start-step gate, true CFG, detach, and a tiny FluxPipeline render."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagegen.identity.pulid.convert import (
    bfl_flux_config,
    convert_bfl_flux_to_diffusers,
    flux_transformer_from_bfl,
    split_pulid,
)
from imagegen.identity.pulid.embed import eva_pixels, id_tokens, stack_batch
from imagegen.identity.pulid.flux_ca import CrossAttentionConfig, PulidFluxState, attach_pulid_flux, ca_positions
from imagegen.identity.pulid.weights import (
    build_cross_attentions,
    load_eva_clip,
    load_pulid_flux,
)
from imagegen.standins.identity import TINY_FLUX_INTERVALS
from tests.conftest import tiny_method_files
from tests.identity_pulid._parity import assert_matches, fixture, seeded

TINY = fixture("pulid_flux_tiny_transformer_parity.json")


@pytest.fixture(scope="module")
def reference():
    """The fixture's tiny BFL transformer converted to diffusers, its 4 cross-attentions and its inputs."""
    state_dict = seeded().seeded_state_dict(TINY["state_dict_keys"])
    transformer_sd, pulid_sd = split_pulid(state_dict)
    transformer = flux_transformer_from_bfl(transformer_sd, axes_dims_rope=TINY["flux_params"]["axes_dim"])
    cas = build_cross_attentions(pulid_sd, CrossAttentionConfig(**TINY["pulid_ca"]))
    s = seeded()
    ids = torch.zeros(4, 4, 3)
    ids[..., 1] = torch.arange(4)[:, None]
    ids[..., 2] = torch.arange(4)[None, :]
    inputs = dict(
        hidden_states=s.seeded_tensor("flux.img", (2, 16, 16)),
        encoder_hidden_states=s.seeded_tensor("flux.txt", (2, 6, 32)),
        pooled_projections=s.seeded_tensor("flux.y", (2, 32)),
        img_ids=ids.reshape(16, 3),
        txt_ids=torch.zeros(6, 3),
        # BFL passes t in [0, 1] and scales by 1000 inside; diffusers' model scales by 1000 too, so the
        # transformer is called with t itself (FluxPipeline passes scheduler timesteps / 1000)
        timestep=torch.tensor(TINY["inputs"]["timesteps"]),
        guidance=torch.tensor(TINY["inputs"]["guidance"]),
    )
    return transformer, cas, inputs, s.seeded_tensor("flux.id", (2, 32, 48))


def call(transformer, inputs, **overrides):
    with torch.inference_mode():
        return transformer(**{**inputs, **overrides}, return_dict=False)[0]


def test_config_is_read_from_the_checkpoint():
    transformer_sd, pulid_sd = split_pulid(seeded().seeded_state_dict(TINY["state_dict_keys"]))
    assert len(pulid_sd) == 4 * 7
    config = bfl_flux_config(transformer_sd, axes_dims_rope=(8, 12, 12))
    p = TINY["flux_params"]
    assert config == {
        "patch_size": 1,
        "in_channels": p["in_channels"],
        "out_channels": None,
        "num_layers": p["depth"],
        "num_single_layers": p["depth_single_blocks"],
        "attention_head_dim": p["hidden_size"] // p["num_heads"],
        "num_attention_heads": p["num_heads"],
        "joint_attention_dim": p["context_in_dim"],
        "pooled_projection_dim": p["vec_in_dim"],
        "guidance_embeds": True,
        "axes_dims_rope": (8, 12, 12),
    }
    with pytest.raises(ValueError, match="axes_dims_rope"):
        bfl_flux_config(transformer_sd)
    prefixed = {"model.diffusion_model." + k: v for k, v in transformer_sd.items()}
    assert convert_bfl_flux_to_diffusers(prefixed).keys() == convert_bfl_flux_to_diffusers(transformer_sd).keys()
    with pytest.raises(ValueError, match="not converted"):
        convert_bfl_flux_to_diffusers({**transformer_sd, "double_blocks.0.extra.weight": torch.zeros(1)})


def test_tiny_reference_transformer_outputs(reference):
    transformer, cas, inputs, tokens = reference
    plain = call(transformer, inputs)
    assert_matches(plain, TINY["output_no_id"], "no id")
    handle = attach_pulid_flux(transformer, cas, TINY["pulid_double_interval"], TINY["pulid_single_interval"])
    try:
        for weight, key in ((1.0, "output_id_weight_1"), (0.5, "output_id_weight_0.5")):
            with handle.use(PulidFluxState(tokens, weight)):
                assert_matches(call(transformer, inputs), TINY[key], key)
        # per-sample weights: a sample with weight 0 is exactly the plain output
        with handle.use(PulidFluxState(tokens, torch.tensor([1.0, 0.0]))):
            mixed = call(transformer, inputs)
        with handle.use(PulidFluxState(tokens, 1.0)):
            full = call(transformer, inputs)
        assert torch.equal(mixed[1], plain[1]) and torch.allclose(mixed[0], full[0], atol=1e-6)
        with handle.use(PulidFluxState(tokens, 0.0)):
            assert torch.equal(call(transformer, inputs), plain)
        assert torch.equal(call(transformer, inputs), plain)  # attached without a state: plain
        with handle.use(PulidFluxState(tokens[:1], 1.0)), pytest.raises(ValueError, match="1 samples"):
            call(transformer, inputs)
    finally:
        handle.detach()
    assert torch.equal(call(transformer, inputs), plain)


def test_start_step_and_true_cfg_alternation(reference):
    transformer, cas, inputs, tokens = reference
    plain = call(transformer, inputs)
    handle = attach_pulid_flux(transformer, cas, 2, 4)
    try:
        with handle.use(PulidFluxState(tokens, 1.0)):
            with_id = call(transformer, inputs)
        state = PulidFluxState(tokens, 1.0, start_step=[1, 2])
        with handle.use(state):
            step0 = call(transformer, inputs)
            state.callback(None, 0, None, {})
            step1 = call(transformer, inputs)
            state.chain(None)(None, 1, None, {})
            step2 = call(transformer, inputs)
        assert torch.equal(step0, plain)
        assert torch.equal(step1[1], plain[1]) and torch.allclose(step1[0], with_id[0], atol=1e-6)
        assert torch.equal(step2, with_id)
        # with negative id tokens, calls alternate cond / uncond (FluxPipeline's order under true CFG)
        negative = torch.randn_like(tokens)
        with handle.use(PulidFluxState(negative, 1.0)):
            with_negative = call(transformer, inputs)
        cfg = PulidFluxState(tokens, 1.0, uncond_id_tokens=negative)
        with handle.use(cfg):
            outputs = [call(transformer, inputs) for _ in range(4)]
        assert torch.equal(outputs[0], with_id) and torch.equal(outputs[2], with_id)
        assert torch.equal(outputs[1], with_negative) and torch.equal(outputs[3], with_negative)
    finally:
        handle.detach()


def test_attach_checks(reference):
    transformer, cas, _, _ = reference
    with pytest.raises(ValueError, match="which needs 5"):
        attach_pulid_flux(transformer, cas, 2, 2)
    handle = attach_pulid_flux(transformer, cas)
    with pytest.raises(RuntimeError, match="already attached"):
        attach_pulid_flux(transformer, cas)
    handle.detach()
    handle.detach()  # idempotent
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert not transformer._forward_hooks and not transformer._forward_pre_hooks
    assert not any(b._forward_hooks for b in blocks)
    with pytest.raises(RuntimeError, match="detached"), handle.use(PulidFluxState(torch.zeros(1, 32, 8), 1.0)):
        pass  # a detached handle refuses a batch rather than render it without identity
    # a switch back hooks the same cross-attentions in at the same blocks; another PuLID attached meanwhile wins
    assert handle.reattach() and handle.attached
    hooked = [hook for b in blocks for hook in b._forward_hooks.values()]
    assert len(hooked) == len(cas) and all(hook.handle is handle for hook in hooked)
    handle.detach()
    other = attach_pulid_flux(transformer, cas)
    assert not handle.reattach() and not handle.attached
    other.detach()


# the tiny FluxPipeline ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_pipe():
    from imagegen.pipelines.loading import load_pipeline
    from imagegen.pipelines.presets import get_preset

    return load_pipeline(get_preset("tiny-flux"), torch.device("cpu"), torch.float32)


def render(pipe, seeds, state=None, handle=None, steps=3, **extra):
    kwargs = dict(
        prompt=["a portrait of a woman", "a knight in armour"][: len(seeds)],
        height=32,
        width=32,
        num_inference_steps=steps,
        guidance_scale=3.5,
        output_type="np",
        max_sequence_length=32,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        **extra,
    )
    with torch.inference_mode():
        if state is None:
            return pipe(**kwargs).images
        with handle.use(state):
            return pipe(**kwargs, callback_on_step_end=state.chain(None)).images


def test_tiny_pipeline_with_tiny_weights(flux_pipe, isolated_home):
    files = tiny_method_files("tiny-flux", "pulid-flux-v0.9.1")
    weights = load_pulid_flux(files["weights"])
    eva = load_eva_clip(files["eva_clip"])
    transformer = flux_pipe.transformer
    assert (
        len(weights.cross_attentions)
        == len(
            ca_positions(
                len(transformer.transformer_blocks), len(transformer.single_transformer_blocks), *TINY_FLUX_INTERVALS
            )
        )
        == 4
    )
    # one character's id tokens from two "reference faces" (ArcFace vectors + aligned crops)
    faces = torch.rand(2, 3, 128, 128)
    background = torch.zeros(2, 1, 128, 128, dtype=torch.bool)
    background[..., :16, :] = True
    pixels = eva_pixels(faces, eva.config.img_size, background)
    cond, uncond = id_tokens(weights.encoder, eva.model, torch.randn(2, 512) * 20, pixels)
    assert cond.shape == uncond.shape == (1, 8, 48)
    tokens, present = stack_batch([cond * 30, None], cond[0])
    assert present.tolist() == [True, False]

    fresh_plain = render(flux_pipe, [1, 2])
    handle = weights.attach(transformer)
    try:
        mixed = render(flux_pipe, [1, 2], PulidFluxState(tokens, present.float()), handle)
        assert np.array_equal(mixed[1], fresh_plain[1])
        assert np.abs(mixed[0] - fresh_plain[0]).max() > 1e-4
        gated = PulidFluxState(tokens, 1.0, start_step=3)
        assert np.array_equal(render(flux_pipe, [1, 2], gated, handle), fresh_plain)
        assert gated.step == 3 and gated.calls == 3
        later = render(flux_pipe, [1, 2], PulidFluxState(tokens, present.float(), start_step=1), handle)
        assert np.abs(later[0] - mixed[0]).max() > 0 and np.array_equal(later[1], fresh_plain[1])
        # true CFG: two transformer calls per step, the second with the negative id tokens
        uncond_tokens, _ = stack_batch([uncond * 30, None], cond[0])
        cfg = PulidFluxState(tokens, present.float(), uncond_id_tokens=uncond_tokens)
        out = render(flux_pipe, [1, 2], cfg, handle, true_cfg_scale=2.0, negative_prompt=["blurry", "blurry"])
        assert cfg.calls == 6 and np.isfinite(out).all()
    finally:
        handle.detach()
    assert np.array_equal(render(flux_pipe, [1, 2]), fresh_plain)


def test_bfloat16_transformer(reference):
    transformer, cas, inputs, tokens = reference
    half = flux_transformer_from_bfl(
        split_pulid(seeded().seeded_state_dict(TINY["state_dict_keys"]))[0],
        axes_dims_rope=(8, 12, 12),
        dtype=torch.bfloat16,
    )
    assert next(half.parameters()).dtype == torch.bfloat16
    half_inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    plain = call(half, half_inputs)
    cas_copy = build_cross_attentions(
        split_pulid(seeded().seeded_state_dict(TINY["state_dict_keys"]))[1], CrossAttentionConfig(**TINY["pulid_ca"])
    )
    handle = attach_pulid_flux(half, cas_copy)
    try:
        assert next(cas_copy.parameters()).dtype == torch.bfloat16  # moved to the transformer's dtype
        with handle.use(PulidFluxState(tokens, [0.0, 1.0])):  # float32 tokens are cast
            out = call(half, half_inputs)
        assert out.dtype == torch.bfloat16 and torch.equal(out[0], plain[0]) and not torch.equal(out[1], plain[1])
        reference_out = call(transformer, inputs)
        with handle.use(None):
            assert torch.equal(call(half, half_inputs), plain)
        assert (plain.float() - reference_out).abs().max() < 0.1
    finally:
        handle.detach()
