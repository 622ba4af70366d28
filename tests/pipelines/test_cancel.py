"""A cancelled request leaves its pipeline call between denoising steps (real tiny pipelines).

What is observed is real: the steps the progress callback saw, and the rows the denoiser
(transformer / UNet) and the VAE decoder were actually called with, read by forward hooks on
diffusers' own modules.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import pytest

from imagegen.pipelines.renderer import CANCELLED
from imagegen.pipelines.types import RenderRequest


@contextmanager
def rows_seen(module):
    """The row count of every forward call of ``module`` inside the block."""
    seen: list[int] = []

    def hook(mod, args, kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        seen.append(int(first.shape[0]))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def denoiser(renderer):
    """The denoiser's first layer: it sees the rows that are really computed."""
    model = renderer.family.denoiser(renderer.pipe)
    return model.x_embedder if renderer.preset.family == "flux" else model.conv_in


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def test_a_render_cancelled_after_its_first_step_stops_there(renderer):
    flag = threading.Event()
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        if done == 1:
            flag.set()  # the client goes away while step 1 is reported

    stopped = renderer.stopped_calls
    with rows_seen(denoiser(renderer)) as calls, rows_seen(renderer.pipe.vae.decoder) as decodes:
        [result] = renderer.render(
            [RenderRequest(prompt="a long render", seed=7, steps=8)], progress=progress, cancelled=[flag.is_set]
        )
    assert seen == [(1, 8)]
    assert result.problem == CANCELLED and result.image is None and not result.ok
    assert result.batch["steps_run"] == 1
    assert len(calls) == 1 and decodes == []  # no further step, no VAE decode
    assert renderer.stopped_calls == stopped + 1


def test_a_render_cancelled_before_its_call_starts_never_runs(renderer):
    cancelled = threading.Event()
    cancelled.set()
    with rows_seen(denoiser(renderer)) as calls:
        [result] = renderer.render([RenderRequest(prompt="never", seed=1, steps=4)], cancelled=[cancelled.is_set])
    assert calls == [] and result.problem == CANCELLED and result.batch["steps_run"] == 0


def test_a_cancelled_row_leaves_the_batch_and_the_other_renders_as_alone(renderer):
    keep = RenderRequest(prompt="a woman at a cafe", negative_prompt="blurry", seed=42, steps=4, width=32, height=32)
    drop = RenderRequest(prompt="a man in a studio", seed=1, steps=4, width=32, height=32)
    [alone] = renderer.render([keep])
    flag = threading.Event()

    def progress(done: int, total: int) -> None:
        if done == 1:
            flag.set()

    with rows_seen(denoiser(renderer)) as calls, rows_seen(renderer.pipe.vae.decoder) as decodes:
        kept, dropped = renderer.render([keep, drop], progress=progress, cancelled=[None, flag.is_set])
    # step 1 ran on both rows (x2 with SDXL's CFG), every later step on the remaining one only
    full = calls[0]
    assert full in (2, 4) and calls == [full] + [full // 2] * 3, calls
    assert dropped.problem == CANCELLED and dropped.image is None and dropped.batch["steps_run"] == 1
    assert kept.ok and kept.batch["size"] == 2 and decodes
    diff = np.abs(pixels(alone) - pixels(kept))
    assert diff.max() <= 2, diff.max()


def test_no_flag_set_changes_nothing(renderer):
    request = RenderRequest(prompt="portrait", seed=11, steps=3, width=32, height=32)
    [plain] = renderer.render([request])
    flags = [threading.Event(), threading.Event()]
    with rows_seen(denoiser(renderer)) as calls:
        watched = renderer.render(
            [request, request.model_copy(update={"seed": 12})], cancelled=[f.is_set for f in flags]
        )
    assert len(set(calls)) == 1 and all(r.ok for r in watched)
    assert np.abs(pixels(plain) - pixels(watched[0])).max() <= 2


def test_flags_must_match_the_requests(renderer):
    with pytest.raises(ValueError, match="cancellation flags"):
        renderer.render([RenderRequest(prompt="x", seed=1, steps=1)], cancelled=[None, None])


def test_flux_true_cfg_rows_leave_both_passes(flux_renderer):
    keep = RenderRequest(
        prompt="a knight", negative_prompt="blurry", seed=5, steps=3, true_cfg_scale=2.0, width=32, height=32
    )
    drop = keep.model_copy(update={"seed": 6})
    [alone] = flux_renderer.render([keep])
    flag = threading.Event()
    with rows_seen(denoiser(flux_renderer)) as calls:
        kept, dropped = flux_renderer.render(
            [keep, drop], progress=lambda done, total: flag.set(), cancelled=[None, flag.is_set]
        )
    assert calls == [2, 2, 1, 1, 1, 1], calls  # the positive and the negative pass of each step
    assert dropped.problem == CANCELLED and kept.ok
    assert np.abs(pixels(alone) - pixels(kept)).max() <= 2


@pytest.fixture(scope="module")
def identity_registry(tmp_path_factory):
    from imagegen.identity.characters import approve_character, register_character
    from imagegen.identity.registry import Registry
    from imagegen.settings import Settings
    from tests.photos import astronaut_set

    with Registry.open(Settings(home=tmp_path_factory.mktemp("cancel-home"))) as registry:
        provenance = {"kind": "synthetic", "creator": "tests"}
        register_character(
            registry, character_id="mia", name="mia", provenance=provenance, files=list(astronaut_set(2))
        )
        approve_character(registry, "mia")
        yield registry


@pytest.fixture(scope="module")
def identity_renderer(identity_registry):
    """One identity renderer per preset, loaded on first use and shared by the module's tests."""
    from imagegen.identity.provider import identity_renderer as load

    loaded = {}

    def get(preset: str):
        if preset not in loaded:
            loaded[preset] = load(preset, identity_registry)
        return loaded[preset]

    return get


#: (preset, identity method): PuLID on both families, the IP-Adapter's embeddings in FLUX's joint attention
#: kwargs and in SDXL's CFG batch (FaceID-PlusV2 also has per-row CLIP inputs and a per-row LoRA)
IDENTITY_CASES = [
    ("tiny-flux", "pulid-flux-v0.9.1"),
    ("tiny-flux", "ipadapter-flux"),
    ("tiny-sdxl", "pulid-sdxl-v1.1"),
    ("tiny-sdxl", "ipadapter-faceid-plusv2-sdxl"),
]
SMALL = {"width": 32, "height": 32, "steps": 3}
#: a kept row's denoiser output vs its solo render's (float32 rounding of batched matmuls is ~1e-6 here); the
#: identity moves it by more than 5x this (tiny PuLID-SDXL the least: ~2e-4 at weight 3)
OUTPUT_TOLERANCE = 1e-5


@contextmanager
def outputs_of(module):
    """A copy of every output of ``module`` inside the block."""
    seen = []
    handle = module.register_forward_hook(lambda mod, args, output: seen.append(output.detach().clone()))
    try:
        yield seen
    finally:
        handle.remove()


def denoiser_output(renderer):
    """The denoiser's last layer: its rows are those really computed, before anything is scattered back."""
    model = renderer.family.denoiser(renderer.pipe)
    return model.proj_out if renderer.preset.family == "flux" else model.conv_out


@pytest.mark.parametrize(("preset", "method"), IDENTITY_CASES)
def test_a_cancelled_row_leaves_an_identity_batch_and_the_other_renders_as_alone(preset, method, identity_renderer):
    """The identity conditioning leaves with the rows: from the next step the denoiser and the identity layers run
    on the kept row only, with its own tokens, weight and start step (not those of row 0, which left), and it
    computes what it computes alone; a call stopped mid-way leaves the conditioner clean for the next render."""
    renderer = identity_renderer(preset)
    # kept: row 1, identity from step 1 at weight 3; the row 0 that leaves has none (zero tokens, weight 0), so
    # a kept row reading row 0's tokens, weight or start step would compute something else
    keep = RenderRequest(
        prompt="a cafe at night",
        seed=2,
        character="mia",
        method=method,
        identity_weight=3.0,
        identity_start_step=1,
        **SMALL,
    )
    drop = RenderRequest(prompt="a street", seed=1, **SMALL)
    with outputs_of(denoiser_output(renderer)) as solo:
        [alone] = renderer.render([keep])
    with outputs_of(denoiser_output(renderer)) as plain:
        renderer.render([keep.model_copy(update={"character": None, "method": None})])
    moved = max(float((a - b).abs().max()) for a, b in zip(solo, plain, strict=True))
    assert moved > 5 * OUTPUT_TOLERANCE, moved  # the identity shows: the comparison below can fail

    flag = threading.Event()
    with outputs_of(denoiser_output(renderer)) as batch, rows_seen(renderer.pipe.vae.decoder) as decodes:
        dropped, kept = renderer.render(
            [drop, keep], progress=lambda done, total: flag.set(), cancelled=[flag.is_set, None]
        )
    # both rows (x2 with SDXL's CFG) at step 1, the kept one only at steps 2 and 3
    rows = [int(t.shape[0]) for t in batch]
    assert rows[0] in (2, 4) and rows == [rows[0], rows[0] // 2, rows[0] // 2], rows
    assert dropped.problem == CANCELLED and dropped.image is None and dropped.batch["steps_run"] == 1
    assert kept.ok and kept.batch["size"] == 2 and kept.batch["characters"] == 1 and decodes
    kept_rows = [batch[0][1::2], *batch[1:]]  # row 1 of [drop, keep]; rows 1 and 3 of SDXL's [negatives, positives]
    diffs = [float((a - b).abs().max()) for a, b in zip(solo, kept_rows, strict=True)]
    assert max(diffs) <= OUTPUT_TOLERANCE, diffs
    assert np.abs(pixels(alone) - pixels(kept)).max() <= 2

    stop = threading.Event()
    with rows_seen(denoiser(renderer)) as calls:
        [stopped] = renderer.render([keep], progress=lambda d, t: stop.set(), cancelled=[stop.is_set])
    assert stopped.problem == CANCELLED and len(calls) == 1
    [again] = renderer.render([keep])
    assert np.array_equal(pixels(alone), pixels(again))


def test_identity_states_narrow_to_the_rows_still_in():
    """A state narrowed to some samples holds what a state built for those samples holds, step by step."""
    import torch

    from imagegen.identity.ipadapter.adapter import IPAdapterState
    from imagegen.identity.pulid.sdxl_processor import PulidSDXLState

    tokens, uncond = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    scales, starts = [0.5, 0.0, 1.0, 0.8], [0, 0, 2, 1]
    state = PulidSDXLState(tokens, scale=scales, uncond_id_tokens=uncond, start_step=starts)
    state.step = 1
    state.for_batch(8)  # caches the CFG tokens of the four samples
    state.select_rows([0, 2, 3])
    state.select_rows([2, 3])  # indices stay those of the batch as built
    built = PulidSDXLState(tokens[2:], scale=scales[2:], uncond_id_tokens=uncond[2:], start_step=starts[2:])
    assert state.batch_size == 2 and state.step == 1
    for rows in (2, 4):
        (mine, gate), (theirs, expected) = state.for_batch(rows), built.for_batch(rows)
        assert torch.equal(mine, theirs)
        for step in range(4):
            assert gate.at(step).values == expected.at(step).values
    with pytest.raises(ValueError, match="1 samples|2 samples"):
        state.check_rows(8)
    with pytest.raises(ValueError, match="cannot narrow"):
        state.select_rows([0, 2])  # sample 0 already left

    clip = torch.randn(3, 1, 2, 4)
    ip = IPAdapterState([1.0, 0.5, 0.2], 3, [0, 1, 0], layer_inputs={"clip_embeds": (clip, -clip)})
    ip.select_rows([1])
    assert torch.equal(ip.layer_input("clip_embeds", 2), torch.cat([-clip[1:2], clip[1:2]]))
    assert ip.batch_size == 1 and ip.phase(1).values == (0.0,)
    ip.step = 1
    assert ip.phase(2).values == (0.5, 0.5)
