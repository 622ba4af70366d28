"""PuLID-SDXL's per-step work: keys and values projected once per batch, ortho v2 without an attention map on GPUs,
and the processors inside ``torch.compile``'d UNet blocks: no graph break, one graph whatever the batch mixes."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers.models.attention_processor import Attention

from imagegen.identity.pulid.sdxl_processor import (
    PulidSDXLAttnProcessor,
    PulidSDXLHandle,
    PulidSDXLState,
    _leading_attention,
    _leading_attention_fused,
)
from imagegen.identity.pulid.weights import load_pulid_sdxl
from tests.conftest import tiny_method_files


@pytest.fixture
def tiny_unet(isolated_home):
    """A fresh tiny SDXL UNet (compiling changes it) with PuLID attached, and inputs of a CFG batch of 2 samples."""
    from imagegen.pipelines.loading import load_pipeline
    from imagegen.pipelines.presets import get_preset

    unet = load_pipeline(get_preset("tiny-sdxl"), torch.device("cpu"), torch.float32).unet
    handle = load_pulid_sdxl(tiny_method_files("tiny-sdxl", "pulid-sdxl-v1.1")["weights"]).attach(unet)
    generator = torch.Generator().manual_seed(0)
    width = unet.config.cross_attention_dim
    extra = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    inputs = {
        "sample": torch.randn(4, 4, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(4, 7, width, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(4, extra, generator=generator),
            "time_ids": torch.randn(4, 6, generator=generator),
        },
    }
    tokens = [5 * torch.randn(2, 32, width, generator=generator) for _ in range(2)]
    yield unet, handle, inputs, tokens
    handle.detach()


def denoise(unet, handle, inputs, state, steps=3) -> list[torch.Tensor]:
    """The UNet's outputs over ``steps`` steps under ``state``, the step advanced as the pipeline's callback does."""
    outputs = []
    with torch.inference_mode(), handle.use(state):
        for step in range(steps):
            outputs.append(unet(timestep=torch.tensor(100.0 * step + 1), return_dict=False, **inputs)[0])
            if state is not None:
                state.callback(None, step, None, {})
    return outputs


def test_keys_and_values_are_projected_once_per_batch(tiny_unet):
    unet, handle, inputs, (tokens, uncond) = tiny_unet
    projections = []
    hooks = [p.id_to_k.register_forward_hook(lambda *a: projections.append(1)) for p in handle.processors.values()]
    try:
        state = PulidSDXLState(tokens, [0.8, 0.5], uncond_id_tokens=uncond, start_step=[1, 2])
        denoise(unet, handle, inputs, state, steps=4)
        assert len(projections) == len(handle.processors)  # not once per step (nor at step 0, where none is on)
        state = PulidSDXLState(tokens, [0.8, 0.5], uncond_id_tokens=uncond)
        with torch.inference_mode(), handle.use(state):
            unet(timestep=1.0, return_dict=False, **inputs)
            state.select_rows([1])  # a sample left: the other's keys and values are projected again
            kept = {k: v[1::2] for k, v in inputs.items() if k != "added_cond_kwargs"}  # rows 1, 3 of [neg, pos]
            added = {k: v[1::2] for k, v in inputs["added_cond_kwargs"].items()}
            unet(timestep=1.0, return_dict=False, added_cond_kwargs=added, **kept)
        assert len(projections) == 3 * len(handle.processors)
    finally:
        for hook in hooks:
            hook.remove()
    assert all(p._id_key is None for p in handle.processors.values())  # nothing kept once the batch is done


def test_ortho_v2_weight_without_an_attention_map_matches_the_explicit_one():
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(3, 2, 40, 32, generator=generator)
    key = torch.cat([torch.randn(3, 2, 12, 32, generator=generator), torch.zeros(3, 2, 20, 32)], dim=2)
    indicator = (torch.arange(32) < 5).float()[None, None, :, None].expand(1, 1, 32, 8)
    explicit = _leading_attention(query, key, indicator)  # on the CPU: the map, as PuLID computes it
    reference = (query @ key.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)[:, :, :5].sum(dim=-1, keepdim=True)
    assert torch.allclose(explicit, reference, atol=1e-6)
    assert torch.allclose(_leading_attention_fused(query, key, indicator), reference, atol=1e-6)


def test_projection_kept_by_a_processor_is_not_reused_for_per_call_embeddings():
    attn = Attention(query_dim=64, cross_attention_dim=48, heads=2, dim_head=32, bias=False, out_bias=True)
    processor = PulidSDXLAttnProcessor(64, 48)
    attn.set_processor(processor)
    handle = PulidSDXLHandle(None, {}, {})
    processor.__dict__["handle"] = handle
    hidden, text = torch.randn(2, 16, 64), torch.randn(2, 7, 48)
    ids = [torch.randn(2, 32, 48) for _ in range(2)]
    with torch.inference_mode():
        with handle.use(PulidSDXLState(ids[0], 0.8)):
            first = attn(hidden, text)
            other = attn(hidden, text, id_embedding=ids[1], id_scale=0.8, num_zero=20, ortho="v2")
            again = attn(hidden, text)
        alone = attn(hidden, text, id_embedding=ids[1], id_scale=0.8, num_zero=20, ortho="v2")
    assert torch.equal(first, again) and torch.equal(other, alone)


def test_fused_projections_keep_scale_zero_rows_exactly_plain():
    """Under a profile's fuse_qkv the plain processor computes the text keys / values with one fused projection: so
    does PuLID's, so a row without identity is still exactly the plain output."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    generator = torch.Generator().manual_seed(2)
    attn = Attention(query_dim=64, cross_attention_dim=48, heads=2, dim_head=32, bias=False, out_bias=True)
    attn.fuse_projections()
    hidden, text = torch.randn(2, 16, 64, generator=generator), torch.randn(2, 7, 48, generator=generator)
    processor = PulidSDXLAttnProcessor(64, 48)
    with torch.inference_mode():
        attn.set_processor(FusedAttnProcessor2_0())
        plain = attn(hidden, text)
        attn.set_processor(processor)
        mixed = attn(hidden, text, id_embedding=torch.randn(2, 32, 48, generator=generator), id_scale=[0.8, 0.0])
    assert torch.equal(mixed[1], plain[1]) and not torch.allclose(mixed[0], plain[0])


def test_compiled_blocks_do_not_break_or_recompile_per_batch(tiny_unet):
    """Regional compilation (fullgraph) of the UNet's blocks: after one plain and one PuLID batch of a layout, batches
    mixing other scales, start steps, samples without identity and no negatives run the same graphs."""
    from torch._dynamo.utils import counters

    unet, handle, inputs, (tokens, uncond) = tiny_unet

    def states():
        return [
            PulidSDXLState(tokens, [0.8, 0.5], uncond_id_tokens=uncond),
            PulidSDXLState(tokens, [0.3, 0.0], uncond_id_tokens=uncond),
            PulidSDXLState(tokens, [1.0, 0.6], uncond_id_tokens=uncond, start_step=[0, 2]),
            PulidSDXLState(tokens, [0.5, 0.9], uncond_id_tokens=uncond, start_step=[1, 1]),
            PulidSDXLState(tokens, 0.7),  # no negative id tokens: the negative half without identity
        ]

    eager = [denoise(unet, handle, inputs, state) for state in [None, *states()]]
    torch._dynamo.reset()
    counters.clear()  # process-wide: earlier tests' step caches count graph breaks of their own
    unet.compile_repeated_blocks(fullgraph=True, backend="eager")
    try:
        denoise(unet, handle, inputs, None)
        denoise(unet, handle, inputs, PulidSDXLState(uncond, 0.2, uncond_id_tokens=tokens))
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        compiled = [denoise(unet, handle, inputs, state) for state in [None, *states()]]
        assert counters["stats"]["unique_graphs"] == graphs, "a batch composition or a step recompiled the blocks"
        assert sum(counters["graph_break"].values()) == breaks == 0
    finally:
        torch._dynamo.reset()
    for expected, got in zip(eager, compiled, strict=True):
        for a, b in zip(expected, got, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


#: the device of the profile check below: the CPU here and in CI; ``IMAGEGEN_DEVICE=cuda`` (``bench/gpu_session.sh``)
#: runs it where SDXL's ``fast`` replays its compiled blocks as CUDA graphs
DEVICE = torch.device(os.environ.get("IMAGEGEN_DEVICE", "cpu"))


def test_cuda_graphs_of_the_fast_profile_replay_every_batch_composition_as_eager(isolated_home):
    """SDXL's ``fast`` (inductor-compiled blocks; on a CUDA device replayed as CUDA graphs): the identity state of
    each batch (scales, start steps, samples without identity, no negatives) reaches the compiled blocks, whose outputs
    match eager's. On CUDA nothing makes inductor fall back from the graphs, and a stale replay (an earlier batch's
    identity, or a block output overwritten by the next block's replay) would differ from eager by the identity's
    whole effect; elsewhere the profile says the graphs were skipped."""
    from torch._dynamo.utils import counters

    from imagegen.pipelines.loading import load_pipeline
    from imagegen.pipelines.presets import get_preset
    from imagegen.pipelines.profiles import apply_profile, cuda_graphs_recorded, profile_for

    preset = get_preset("tiny-sdxl")
    weights = tiny_method_files("tiny-sdxl", "pulid-sdxl-v1.1")["weights"]
    generator = torch.Generator().manual_seed(0)

    def attached(profile: str):
        pipe = load_pipeline(preset, DEVICE, torch.float32)
        applied = apply_profile(pipe, profile_for(preset, profile), "sdxl", DEVICE)
        return pipe.unet, load_pulid_sdxl(weights).attach(pipe.unet), applied

    unet, handle, _ = attached("quality")
    width = unet.config.cross_attention_dim
    extra = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    inputs = {
        "sample": torch.randn(4, 4, 8, 8, generator=generator).to(DEVICE),
        "encoder_hidden_states": torch.randn(4, 7, width, generator=generator).to(DEVICE),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(4, extra, generator=generator).to(DEVICE),
            "time_ids": torch.randn(4, 6, generator=generator).to(DEVICE),
        },
    }
    tokens, uncond = (5 * torch.randn(2, 32, width, generator=generator).to(DEVICE) for _ in range(2))

    def states():
        return [
            None,
            PulidSDXLState(tokens, [0.8, 0.5], uncond_id_tokens=uncond),
            PulidSDXLState(tokens, [0.3, 0.0], uncond_id_tokens=uncond),
            PulidSDXLState(tokens, [1.0, 0.6], uncond_id_tokens=uncond, start_step=[0, 2]),
            None,
            PulidSDXLState(uncond, 0.7),  # no negative id tokens: the negative half without identity
        ]

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # full float32 convolutions: eager and graphs differ by summation order
    try:
        eager = [denoise(unet, handle, inputs, state) for state in states()]
        effect = max((a - b).abs().max().item() for a, b in zip(eager[1], eager[0], strict=True))
        assert effect > 0.02  # the identity's effect, far above the tolerance below
        handle.detach()
        del unet, handle

        unet, handle, applied = attached("fast")
        skips = counters["inductor"]["cudagraph_skips"]
        recorded = []
        for _ in range(2):  # the first pass warms up and records the graphs, the second replays them
            replayed = [denoise(unet, handle, inputs, state) for state in states()]
            recorded.append(cuda_graphs_recorded(DEVICE))
        handle.detach()
        if DEVICE.type == "cuda":
            assert "cuda_graphs" in applied.applied
            assert counters["inductor"]["cudagraph_skips"] == skips, "inductor ran the blocks without CUDA graphs"
            # new batches (new id keys, values and scales) replay the graphs: none is recorded again
            assert recorded[1] == recorded[0] > 0, recorded
        else:
            assert "cuda_graphs" in applied.skipped
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    for expected, got in zip(eager, replayed, strict=True):
        for a, b in zip(expected, got, strict=True):
            torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)
