"""Optimisation profiles on the tiny presets (CPU): each renders what eager renders, keeps batch invariance, and
refuses what it cannot run at load, in one line.

Tolerances (pixel levels of 255, stated in the README): compile alone reorders float sums only (max 2); int8
weight-only quantisation of the denoiser moves pixels a little more (max 6 on the tiny random weights); a
First-Block step cache decides per batch whether to skip, so a request inside a batch may differ from the same
request alone by the cache's error (max 12 here). Identity under profiles: tests/identity_*/test_profiles*.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._inductor.cudagraph_trees import MarkStepBox

from imagegen.pipelines.presets import get_preset
from imagegen.pipelines.profiles import Profile, ProfileError, check_profile, profile_for
from imagegen.pipelines.renderer import Renderer
from imagegen.pipelines.types import RenderRequest

PROFILES = ("quality", "fast", "fastest", "low-memory")
PRESETS = ("tiny-flux", "tiny-sdxl")
#: most a pixel of a profile's render may differ from eager (quality) on the tiny presets
EAGER_TOLERANCE = {"quality": 0, "fast": 2, "fastest": 12, "low-memory": 2}
#: most a request inside a batch may differ from the same request alone, per profile
BATCH_TOLERANCE = {"quality": 2, "fast": 2, "fastest": 12, "low-memory": 2}

TARGET = RenderRequest(prompt="a woman at a cafe", seed=42)
OTHERS = [RenderRequest(prompt="a man in a studio", seed=1), RenderRequest(prompt="watercolor knight", seed=2)]


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


@pytest.fixture(scope="module")
def renders():
    """Per (preset, profile): the target alone and inside a batch of three, rendered once."""
    out: dict[tuple[str, str], dict] = {}
    for preset in PRESETS:
        for name in PROFILES:
            renderer = Renderer(preset, device="cpu", profile=name)
            marks = MarkStepBox.mark_step_counter
            [alone] = renderer.render([TARGET])
            marks = marks - MarkStepBox.mark_step_counter  # torch counts user-marked iterations downwards
            batch = renderer.render([OTHERS[0], TARGET, OTHERS[1]])
            out[(preset, name)] = {
                "alone": alone,
                "batch": batch,
                "applied": renderer.applied_profile,
                "cuda_graph_steps": marks,
                "steps": renderer.preset.defaults.steps,
            }
            del renderer
    return out


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_renders_what_eager_renders(renders, preset, name):
    got = renders[(preset, name)]
    eager = renders[(preset, "quality")]
    assert got["alone"].ok and got["applied"].name == name
    assert got["alone"].metadata()["profile"] == name  # the recipe says which profile made the image
    diff = np.abs(pixels(got["alone"]) - pixels(eager["alone"]))
    assert diff.max() <= EAGER_TOLERANCE[name], (name, int(diff.max()))
    batch_diff = np.abs(pixels(got["batch"][1]) - pixels(got["alone"]))
    assert got["batch"][1].request.seed == 42 and batch_diff.max() <= BATCH_TOLERANCE[name], int(batch_diff.max())
    # the other rows are other images (the batch did not collapse)
    assert np.abs(pixels(got["batch"][0]) - pixels(got["batch"][1])).mean() > 5


def test_profiles_apply_what_they_say_on_this_device(renders):
    fastest_flux = renders[("tiny-flux", "fastest")]["applied"]
    assert fastest_flux.quantize == "int8-weight-only"  # fp8 falls back off Ada/Hopper
    assert {"compile", "step_cache:first-block", "quantize:int8-weight-only"} <= set(fastest_flux.applied)
    fast_sdxl = renders[("tiny-sdxl", "fast")]["applied"]
    assert {"compile", "channels_last", "fuse_qkv"} <= set(fast_sdxl.applied)
    low = renders[("tiny-sdxl", "low-memory")]["applied"]
    assert "offload" in low.skipped and {"vae_tiling", "vae_slicing"} <= set(low.applied)


def test_cuda_graph_profiles_begin_a_graph_step_at_every_denoiser_call(renders):
    """SDXL's ``fast`` and ``fastest`` replay their compiled blocks as CUDA graphs on a GPU (skipped on this CPU, and
    said so). Each denoiser call (one per step: CFG is one batched call) tells torch's graph trees that a new
    iteration begins, so one call's blocks replay as one path and never over each other's outputs; profiles without
    graphs mark nothing."""
    graphed = [("tiny-sdxl", "fast"), ("tiny-sdxl", "fastest")]
    for key in graphed:
        got = renders[key]
        assert "CUDA device" in got["applied"].skipped["cuda_graphs"], key
        assert got["cuda_graph_steps"] == got["steps"], key
    for key, got in renders.items():
        if key not in graphed:
            assert got["cuda_graph_steps"] == 0, key


def test_preset_default_profile_and_environment_override(monkeypatch):
    from imagegen.settings import get_settings

    preset = get_preset("tiny-flux")
    assert profile_for(preset).name == preset.profile == "quality"
    monkeypatch.setenv("IMAGEGEN_PROFILE", "fast")
    get_settings.cache_clear()
    try:
        assert profile_for(preset).name == "fast" and profile_for(preset, "fastest").name == "fastest"
    finally:
        monkeypatch.delenv("IMAGEGEN_PROFILE")
        get_settings.cache_clear()


CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "options,family,words",
    [
        ({"quantize": "fp8-dynamic"}, "flux", "compute capability 8.9"),
        ({"step_cache": {"kind": "first-block"}}, "sdxl", "UNet has none"),
        ({"fuse_qkv": True}, "flux", "fuse_qkv is for SDXL"),
        ({"attention_backend": "no-such-backend"}, "flux", "unknown attention_backend"),
        ({"attention_backend": "flash"}, "flux", "needs a GPU"),
        ({"compile": {}, "step_cache": {"kind": "first-block"}}, "flux", "compile.fullgraph: false"),
        ({"step_cache": {"kind": "first-block", "options": {"treshold": 0.1}}}, "flux", "options invalid"),
        ({"compile": {"fullgraph": False}, "offload": "sequential"}, "sdxl", "sequential offload"),
        (
            {"compile": {"fullgraph": False, "mode": "reduce-overhead"}, "step_cache": {"kind": "first-block"}},
            "flux",
            "drop step_cache or the CUDA graphs",
        ),
        ({"compile": {"options": {"triton.cudagraphs": True}}, "offload": "model"}, "sdxl", "offload: none with CUDA"),
    ],
)
def test_combinations_this_device_or_model_cannot_run_are_refused_in_one_line(options, family, words):
    with pytest.raises(ProfileError) as info:
        check_profile(Profile(name="custom", **options), family, CPU)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_unknown_profile_and_bad_options_are_refused_before_loading():
    with pytest.raises(ProfileError, match="unknown profile 'turbo'; known profiles: fast, fastest"):
        Renderer("tiny-flux", device="cpu", profile="turbo")
    preset = get_preset("tiny-flux").model_copy(update={"profile_overrides": {"fast": {"quantize": "int3"}}})
    with pytest.raises(ProfileError, match="profile 'fast' for preset 'tiny-flux' is invalid: quantize"):
        profile_for(preset, "fast")
    for compile_options, words in (
        ({"mode": "reduce-overhead", "options": {"cpp_wrapper": True}}, "set compile.mode or compile.options"),
        ({"options": {"cpp_wraper": True}}, "unknown inductor option(s) ['cpp_wraper']"),
        ({"options": {"cpp_wrapper": "yes"}}, "inductor option cpp_wrapper takes a bool, got 'yes'"),
    ):
        overrides = {"fast": {"compile": compile_options}}
        preset = get_preset("tiny-sdxl").model_copy(update={"profile_overrides": overrides})
        with pytest.raises(ProfileError) as info:
            profile_for(preset, "fast")
        assert words in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_inductor_options_reach_the_compiled_blocks(tmp_path):
    """A profile's ``compile.options`` go to torch.compile with the blocks (here: inductor's trace of what it
    generated, written to a folder, which only these options ask for)."""
    trace = {"trace.enabled": True, "trace.debug_dir": str(tmp_path), "fx_graph_cache": False}
    preset = get_preset("tiny-sdxl").model_copy(update={"profile_overrides": {"fast": {"compile": {"options": trace}}}})
    profile = profile_for(preset, "fast")
    assert profile.compile.options == trace and profile.compile.fullgraph
    renderer = Renderer(preset, device="cpu", profile=profile)
    blocks = [m for m in renderer.pipe.unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert blocks and "compile" in renderer.applied_profile.applied
    request = RenderRequest(prompt="options", seed=3, width=32, height=32, steps=2)
    eager = Renderer("tiny-sdxl", device="cpu", profile="quality").render([request])[0]
    [compiled] = renderer.render([request])
    assert np.abs(np.asarray(compiled.image, np.int16) - np.asarray(eager.image, np.int16)).max() <= 2
    assert list(tmp_path.rglob("output_code.py")), sorted(p.name for p in tmp_path.rglob("*"))[:20]


#: a First-Block cache that skips every step it can (eager, to stay quick): its residuals always win over computing
GREEDY_STEP_CACHE = {"kind": "first-block", "options": {"threshold": 1e9}}
GREEDY_CACHE = {"fastest": {"compile": None, "quantize": "none", "step_cache": GREEDY_STEP_CACHE}}


def test_a_step_cache_call_stopped_midway_leaves_nothing_to_the_next():
    """A cancelled call under the First-Block cache keeps its rows to the end of the step it is in, and the next
    call starts from an empty cache: it renders what a fresh renderer renders. With a threshold no difference
    reaches, a stale residual left by the stopped call would be reused from the next call's first step on (its
    image would be another prompt's), so only a cache emptied between calls passes."""
    import threading

    preset = get_preset("tiny-flux").model_copy(update={"profile_overrides": GREEDY_CACHE})
    [fresh] = Renderer(preset, device="cpu", profile="fastest").render([TARGET])
    renderer = Renderer(preset, device="cpu", profile="fastest")
    flag = threading.Event()
    results = renderer.render(
        [OTHERS[0], OTHERS[1]],
        cancelled=[flag.is_set, flag.is_set],
        progress=lambda done, total: flag.set() if done == 2 else None,
    )
    assert [r.problem for r in results] == ["cancelled", "cancelled"]
    [after] = renderer.render([TARGET])
    assert np.array_equal(pixels(after), pixels(fresh))
