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
    keep = RenderRequest(prompt="a woman at a cafe", negative_prompt="blurry", seed=42, steps=4)
    drop = RenderRequest(prompt="a man in a studio", seed=1, steps=4)
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
    request = RenderRequest(prompt="portrait", seed=11, steps=3)
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
    keep = RenderRequest(prompt="a knight", negative_prompt="blurry", seed=5, steps=3, true_cfg_scale=2.0)
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


@pytest.mark.parametrize("preset", ["tiny-flux", "tiny-sdxl"])
def test_identity_batches_keep_every_row_and_drop_the_cancelled_after(preset, identity_registry):
    """Identity state is sized to the whole batch: rows stay to the end, cancelled ones get no image;
    a call stopped mid-way leaves the conditioner clean for the next render."""
    from imagegen.identity.provider import identity_renderer

    renderer = identity_renderer(preset, identity_registry)
    keep = RenderRequest(prompt="a cafe at night", seed=1, steps=4, character="mia")
    drop = keep.model_copy(update={"seed": 2})
    [alone] = renderer.render([keep])
    flag = threading.Event()
    with rows_seen(denoiser(renderer)) as calls:
        kept, dropped = renderer.render([keep, drop], progress=lambda d, t: flag.set(), cancelled=[None, flag.is_set])
    assert len(set(calls)) == 1 and len(calls) in (4, 8), calls  # every step on every row
    assert dropped.problem == CANCELLED and dropped.image is None and dropped.batch["steps_run"] == 1
    assert np.abs(pixels(alone) - pixels(kept)).max() <= 2

    stop = threading.Event()
    with rows_seen(denoiser(renderer)) as calls:
        [stopped] = renderer.render([keep], progress=lambda d, t: stop.set(), cancelled=[stop.is_set])
    assert stopped.problem == CANCELLED and len(calls) == 1
    [again] = renderer.render([keep])
    assert np.array_equal(pixels(alone), pixels(again))
