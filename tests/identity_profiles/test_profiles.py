"""Identity under every optimisation profile, on the tiny presets (CPU): PuLID (FLUX, SDXL) and IP-Adapter (FLUX,
SDXL plus-face, SDXL FaceID-PlusV2) render the demo-like character under quality, fast, fastest and low-memory.

Each profile's renderer is warmed up as a serving replica is (plain renders, then each method once with its
``example_tensors``), then renders per method the character alone (weight 1), the same request at weight 0, the plain
request, a batch of three mixing characters, weights and a sample without one, and a batch of three with another
composition (other characters, weights, start steps). Tolerances, in pixel levels of 255 (measured here: 0-1):

- against eager (the ``quality`` renderer, same request): ``fast`` (regional compile; SDXL also channels_last and
  fused QKV) max 2; ``fastest`` (+ int8 weight-only quantisation of the denoiser on the CPU, fp8 on Ada / Hopper GPUs;
  + the First-Block cache on FLUX, threshold 0.05) max 12; ``low-memory`` (VAE tiling / slicing; offload has nothing
  to do on the CPU) max 2; ``quality`` 0;
- weight 0 equals the plain render of the same renderer exactly (0) under every profile;
- batch invariance, a request inside a batch against the same request alone: max 2 (``quality``, ``fast``,
  ``low-memory``), 12 (``fastest``: a step cache decides per batch whether to skip, so a batch's decision may differ
  from a lone request's);
- compiled profiles: after the warm-up the character at batch 1 compiles nothing, and a batch of three with another
  composition than the first batch of three compiles nothing (no recompile, no graph break); no frame reaches dynamo's
  recompile limit.

Step caches (FLUX, eager, so the cache alone is measured; a skipped step reuses the residual of the last computed
one): the First-Block cache and MagCache configured never to skip render exactly what eager renders; configured to
skip every step after the first, the identity still shows as much as under eager (its effect on the image,
mean |identity - weight 0|, within 0.6x-1.4x of eager's: measured 1.00-1.01x; PuLID's hooks adding their term again
on skipped steps, what torch forward hooks do by themselves under the cache, measures 1.87x), weight 0 still equals
plain exactly, and a sample whose identity starts after the last computed step gets it (the cache computes the step
where it starts). TaylorSeer is refused by both FLUX methods.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from imagegen.identity.characters import approve_character, register_character
from imagegen.identity.provider import RegistryIdentity
from imagegen.identity.registry import Registry
from imagegen.pipelines.presets import get_preset
from imagegen.pipelines.profiles import Profile, ProfileError, StepCacheOptions, compile_counters
from imagegen.pipelines.renderer import Renderer
from imagegen.pipelines.types import RenderRequest
from imagegen.pipelines.warmup import warm_up
from imagegen.settings import Settings
from tests.photos import astronaut_set, hopper_set

SYNTHETIC = {"kind": "synthetic", "creator": "tests"}
PROFILES = ("quality", "fast", "fastest", "low-memory")
METHODS = {
    "tiny-flux": ("pulid-flux-v0.9.1", "ipadapter-flux"),
    "tiny-sdxl": ("pulid-sdxl-v1.1", "ipadapter-plus-face-sdxl", "ipadapter-faceid-plusv2-sdxl"),
}
CASES = [(preset, method) for preset, methods in METHODS.items() for method in methods]
COMPILED = ("fast", "fastest")
#: most a pixel of a profile's identity render may differ from the eager (quality) one
EAGER_TOLERANCE = {"quality": 0, "fast": 2, "fastest": 12, "low-memory": 2}
#: most a request inside a batch may differ from the same request alone
BATCH_TOLERANCE = {"quality": 2, "fast": 2, "fastest": 12, "low-memory": 2}
#: the identity's effect under a step cache that skips, as a fraction of its effect under eager
EFFECT_RATIO = (0.6, 1.4)

SMALL = {"width": 32, "height": 32, "steps": 3}


def requests(method: str) -> dict[str, list[RenderRequest]]:
    mia = RenderRequest(prompt="a woman at a cafe", seed=42, character="mia", method=method, **SMALL)
    return {
        "alone": [mia],
        "zero": [mia.model_copy(update={"identity_weight": 0.0})],
        "plain": [RenderRequest(prompt="a woman at a cafe", seed=42, **SMALL)],
        "batch": [
            RenderRequest(prompt="a man in a studio", seed=1, **SMALL),
            mia,
            RenderRequest(
                prompt="a watercolor", seed=2, character="grace", method=method, identity_weight=0.7, **SMALL
            ),
        ],
        # same size, another composition: only characters, weights and start steps change
        "other": [
            RenderRequest(prompt="a man in a studio", seed=1, character="grace", method=method, **SMALL),
            RenderRequest(
                prompt="a woman at a cafe", seed=42, character="mia", method=method, identity_weight=1.5, **SMALL
            ),
            RenderRequest(
                prompt="a watercolor", seed=2, character="mia", method=method, identity_start_step=1, **SMALL
            ),
        ],
    }


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    home = tmp_path_factory.mktemp("identity-profiles-home")
    with Registry.open(Settings(home=home)) as registry:
        for character_id, files in (("mia", astronaut_set(2)), ("grace", hopper_set(2))):
            register_character(
                registry, character_id=character_id, name=character_id, provenance=SYNTHETIC, files=list(files)
            )
            approve_character(registry, character_id)
        yield registry


#: CPU here and in CI; ``IMAGEGEN_DEVICE=cuda`` runs the same checks on a GPU (``bench/gpu_check.py --tests``), where
#: ``fast`` on SDXL replays its compiled blocks as CUDA graphs
DEVICE = os.environ.get("IMAGEGEN_DEVICE", "cpu")


def renderer_for(registry, preset: str, profile: str | Profile) -> Renderer:
    return Renderer(preset, device=DEVICE, identity=RegistryIdentity(registry), profile=profile)


def moved(before: dict[str, int]) -> dict[str, int]:
    after = compile_counters()
    return {k: after[k] - before[k] for k in after}


class Renders:
    """Per (preset, profile, method): every render of :func:`requests` and what each compiled, rendered when a test
    first asks for that preset and profile (so ``-k`` selects work, not only assertions).

    Each renderer is first warmed up as a serving replica is (``warm_up``: plain renders, then one identity render
    per method with the method's ``example_tensors``, at 32 px, batch 1).
    """

    def __init__(self, registry):
        self.registry = registry
        self.done: dict[tuple[str, str, str], dict] = {}

    def __getitem__(self, key: tuple[str, str, str]) -> dict:
        preset, profile, _ = key
        if key not in self.done:
            renderer = renderer_for(self.registry, preset, profile)
            warm_up(renderer, sizes=[(SMALL["width"], SMALL["height"])], batch_sizes=(1,), steps=SMALL["steps"])
            for method in METHODS[preset]:
                got: dict = {"compiled": {}}
                for name, batch in requests(method).items():
                    before = compile_counters()
                    got[name] = renderer.render(batch)
                    got["compiled"][name] = moved(before)
                got["applied"] = renderer.applied_profile
                self.done[(preset, profile, method)] = got
            del renderer
        return self.done[key]


@pytest.fixture(scope="module")
def renders(registry) -> Renders:
    return Renders(registry)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("preset,method", CASES)
def test_identity_renders_as_under_eager(renders, preset, method, profile):
    got, eager = renders[(preset, profile, method)], renders[(preset, "quality", method)]
    [alone] = got["alone"]
    assert alone.ok and got["applied"].name == profile
    diff = np.abs(pixels(alone) - pixels(eager["alone"][0]))
    assert diff.max() <= EAGER_TOLERANCE[profile], (profile, int(diff.max()))
    # the identity shows: the render is not the weight-0 one
    assert np.abs(pixels(alone) - pixels(got["zero"][0])).sum() > 0


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("preset,method", CASES)
def test_weight_zero_is_the_plain_render_and_batches_keep_each_sample(renders, preset, method, profile):
    got = renders[(preset, profile, method)]
    assert np.array_equal(pixels(got["zero"][0]), pixels(got["plain"][0]))
    batch = got["batch"]
    assert [r.timings["batch_size"] for r in batch] == [3, 3, 3]
    diff = np.abs(pixels(batch[1]) - pixels(got["alone"][0]))
    assert diff.max() <= BATCH_TOLERANCE[profile], (profile, int(diff.max()))
    assert np.abs(pixels(batch[0]) - pixels(batch[1])).mean() > 5  # the batch did not collapse


@pytest.mark.parametrize("profile", COMPILED)
@pytest.mark.parametrize("preset,method", CASES)
def test_compiled_identity_compiles_once_per_shape(renders, preset, method, profile):
    """Characters, weights and start steps reach the compiled blocks as tensors: after the warm-up (which rendered
    each method once with made-up tensors at batch 1), the character at batch 1 compiles nothing; a batch of three
    with another composition than the first batch of three compiles nothing either; nothing breaks a graph and no
    frame reaches dynamo's recompile limit."""
    got = renders[(preset, profile, method)]
    compiled = got["compiled"]
    assert "compile" in got["applied"].applied
    assert compiled["alone"]["frames_compiled"] == 0, compiled
    assert compiled["other"]["frames_compiled"] == 0, compiled
    for name, counts in compiled.items():
        assert counts["graph_breaks"] == 0 or profile == "fastest" and preset == "tiny-flux", (name, counts)
        assert counts["recompile_limit_hits"] == 0, (name, counts)


def test_fast_identity_adds_no_graph_break(renders):
    """``fast`` compiles with fullgraph=True (a break would raise); no identity render traces one either."""
    for preset, method in CASES:
        for name, counts in renders[(preset, "fast", method)]["compiled"].items():
            assert counts["graph_breaks"] == 0, (preset, method, name)


# step caches -------------------------------------------------------------------------------------------------

CACHE_METHODS = METHODS["tiny-flux"]
#: options of each cache: one that never skips, one that skips every step after the first
CACHES = {
    "first-block": ({"threshold": 0.0}, {"threshold": 1e6}),
    "magcache": (
        {"max_skip_steps": 0, "num_inference_steps": 4, "mag_ratios": [1.0] * 4, "retention_ratio": 0.0},
        {"threshold": 1e6, "num_inference_steps": 4, "mag_ratios": [1.0] * 4, "retention_ratio": 0.0},
    ),
}
CACHE_STEPS = {**SMALL, "steps": 4}


def cache_profile(kind: str, options: dict) -> Profile:
    return Profile(name=f"{kind}-test", step_cache=StepCacheOptions(kind=kind, options=options))


def cache_requests(method: str) -> dict[str, list[RenderRequest]]:
    mia = RenderRequest(prompt="a woman at a cafe", seed=5, character="mia", method=method, **CACHE_STEPS)
    return {
        "alone": [mia],
        "zero": [mia.model_copy(update={"identity_weight": 0.0})],
        "plain": [RenderRequest(prompt="a woman at a cafe", seed=5, **CACHE_STEPS)],
        "late": [mia.model_copy(update={"identity_start_step": 2})],
    }


def render_all(renderer: Renderer, method: str) -> dict[str, np.ndarray]:
    return {name: pixels(renderer.render(batch)[0]) for name, batch in cache_requests(method).items()}


@pytest.fixture(scope="module")
def cache_renders(registry):
    out = {}
    eager = renderer_for(registry, "tiny-flux", "quality")
    for method in CACHE_METHODS:
        out[("eager", method)] = render_all(eager, method)
    del eager
    for kind, (never, always) in CACHES.items():
        for label, options in (("never", never), ("always", always)):
            renderer = renderer_for(registry, "tiny-flux", cache_profile(kind, options))
            for method in CACHE_METHODS:
                out[(kind, label, method)] = render_all(renderer, method)
    return out


def effect(images: dict[str, np.ndarray], name: str = "alone") -> float:
    return float(np.abs(images[name] - images["zero"]).mean())


@pytest.mark.parametrize("method", CACHE_METHODS)
@pytest.mark.parametrize("kind", CACHES)
def test_a_step_cache_that_never_skips_renders_what_eager_renders(cache_renders, kind, method):
    got, eager = cache_renders[(kind, "never", method)], cache_renders[("eager", method)]
    for name in ("alone", "zero", "late"):
        assert np.array_equal(got[name], eager[name]), name


@pytest.mark.parametrize("method", CACHE_METHODS)
@pytest.mark.parametrize("kind", CACHES)
def test_skipped_steps_keep_the_identity_once(cache_renders, kind, method):
    got, eager = cache_renders[(kind, "always", method)], cache_renders[("eager", method)]
    assert np.array_equal(got["zero"], got["plain"])
    ratio = effect(got) / effect(eager)
    assert EFFECT_RATIO[0] <= ratio <= EFFECT_RATIO[1], ratio
    # identity from step 2: the cache computes step 2 (its last computed step, 0, had no identity) -> it shows
    assert effect(got, "late") > 0.5 * effect(eager, "late")


def test_counting_pulid_twice_on_skipped_steps_would_be_caught(registry, cache_renders, monkeypatch):
    """The negative control: PuLID's hooks adding their term on skipped steps too (what torch forward hooks do under
    the First-Block cache by themselves) nearly doubles the identity's effect, outside :data:`EFFECT_RATIO`."""
    import imagegen.identity.pulid.flux_ca as flux_ca

    method = "pulid-flux-v0.9.1"
    monkeypatch.setattr(flux_ca, "step_skipped", lambda block: False)
    renderer = renderer_for(registry, "tiny-flux", cache_profile("first-block", CACHES["first-block"][1]))
    got = {name: pixels(renderer.render(batch)[0]) for name, batch in cache_requests(method).items() if name != "late"}
    ratio = effect(got) / effect(cache_renders[("eager", method)])
    assert ratio > EFFECT_RATIO[1], ratio


@pytest.mark.parametrize("method", ["pulid-flux-v0.9.1", "ipadapter-flux"])
def test_a_cache_a_method_does_not_honour_is_refused_in_one_line(registry, method):
    renderer = renderer_for(registry, "tiny-flux", cache_profile("taylorseer", {"cache_interval": 2}))
    with pytest.raises(ProfileError) as info:
        renderer.render([RenderRequest(prompt="x", seed=1, character="mia", method=method, **SMALL)])
    assert "taylorseer" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("preset,method", CASES)
def test_example_tensors_have_the_shapes_of_a_character(registry, preset, method):
    """What the serve warm-up renders with: a character's tensors' keys, shapes and dtypes, without any face."""
    provider = RegistryIdentity(registry)
    conditioner = provider.load(method, get_preset(preset), torch.device("cpu"), torch.float32)
    real = provider.tensors_for("mia", conditioner)
    examples = conditioner.example_tensors()
    assert {k: (v.shape, v.dtype) for k, v in examples.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}


def identity_parameters(conditioner) -> dict[str, torch.Tensor]:
    """The parameters an attached method brings (not the denoiser's own)."""
    handle = conditioner.handle
    if hasattr(handle, "cross_attentions"):  # PuLID-FLUX
        return dict(handle.cross_attentions.named_parameters())
    if hasattr(handle, "processors"):  # PuLID-SDXL
        return {f"{n}.{k}": v for n, p in handle.processors.items() for k, v in p.named_parameters()}
    params = {f"proj.{k}": v for k, v in handle.projection.named_parameters()}  # IP-Adapter
    for name, processor in handle.model.attn_processors.items():
        if hasattr(processor, "ip"):
            params.update({f"{name}.{k}": v for k, v in processor.ip.named_parameters()})
    return params


@pytest.mark.parametrize("preset", list(METHODS))
def test_identity_modules_keep_their_precision_on_a_quantised_denoiser(registry, preset):
    """``fastest`` quantises the denoiser at load (int8 weight-only on the CPU); every identity method still attaches
    to it (diffusers' IP-Adapter loader included), and what the method brings stays in the preset's precision."""
    renderer = renderer_for(registry, preset, "fastest")
    denoiser = renderer.pipe.transformer if preset == "tiny-flux" else renderer.pipe.unet
    quantised = [n for n, p in denoiser.named_parameters() if type(p) not in (torch.Tensor, torch.nn.Parameter)]
    assert quantised  # the profile did quantise the denoiser's Linear weights
    for method in METHODS[preset]:
        conditioner = renderer.identity_method(method)
        params = identity_parameters(conditioner)
        assert params, method
        odd = {n: type(p).__name__ for n, p in params.items() if type(p) is not torch.nn.Parameter}
        assert not odd, (method, list(odd.items())[:3])
        assert {p.dtype for p in params.values()} == {renderer.dtype}, method
        lora = getattr(conditioner.handle, "lora", None)
        assert (lora is not None and lora.hooked > 0) == ("faceid" in method)
    renderer.detach_identity()


def test_faceid_lora_merges_into_compiled_blocks_in_place_and_the_weights_come_back(registry):
    """Under ``fast`` (regional compile) FaceID's LoRA is merged for calls whose every row takes it, as in eager mode:
    no hooks in those calls, the weights changed in place (the same Parameter objects, which a CUDA graph reads at
    fixed addresses) and put back bit for bit after the batch; a batch where some rows do not take it runs the
    hooks. Renders match eager within ``fast``'s tolerance either way."""
    method = "ipadapter-faceid-plusv2-sdxl"
    renderer = renderer_for(registry, "tiny-sdxl", "fast")
    mia = RenderRequest(prompt="a woman at a cafe", seed=42, character="mia", method=method, **SMALL)
    renderer.render([mia])  # loads the method; compiles
    lora = renderer.identity_method(method).handle.lora
    unet = renderer.pipe.unet
    before = {name: (param, param.detach().clone()) for name, param in unet.named_parameters()}
    seen: list[tuple[bool, int, bool]] = []

    addresses = [linear.weight.data_ptr() for linear, _ in lora.targets]

    def probe(module, args):
        same_addresses = [linear.weight.data_ptr() for linear, _ in lora.targets] == addresses
        seen.append((lora.merged, lora.hooked, same_addresses))

    handle = unet.register_forward_pre_hook(probe)
    try:
        alone = renderer.render([mia])
        assert [(merged, hooked) for merged, hooked, _ in seen] == [(True, 0)] * SMALL["steps"]
        assert all(same_address for _, _, same_address in seen)
        seen.clear()
        mixed = renderer.render([mia, RenderRequest(prompt="a street", seed=3, **SMALL)])
        assert {(merged, hooked) for merged, hooked, _ in seen} == {(False, len(lora.targets))}
    finally:
        handle.remove()
    assert not lora.merged and lora.hooked == len(lora.targets) > 0
    for name, param in unet.named_parameters():
        original, values = before[name]
        assert param is original and torch.equal(param.detach(), values), name
    assert np.abs(pixels(alone[0]) - pixels(mixed[0])).max() <= BATCH_TOLERANCE["fast"]
    renderer.detach_identity()


@pytest.mark.parametrize("preset,method", CASES)
def test_identity_inputs_of_compiled_blocks_keep_their_addresses_from_batch_to_batch(
    registry, monkeypatch, preset, method
):
    """Under a compiling profile the tensors a block reads from identity processors and handles (PuLID's kept keys,
    values and scales, IP-Adapter's scales) are static inputs of its graph. CUDA graphs need each at the address it
    was recorded with, else they record the block again, every batch; they stay put across batches of other
    characters, weights, start steps and compositions. The renderer is warmed up as a replica of max batch 3 is,
    and its traffic then comes smallest batch first: the warm-up's largest identity batch has sized the slots, so a
    larger batch than any before moves nothing that smaller ones recorded. Checked with a backend that records the
    addresses, as CUDA graph trees compare them, under SDXL's ``fast`` (CUDA graphs) and FLUX's ``fast`` with CUDA
    graphs chosen (``compile.mode: reduce-overhead``)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from imagegen.pipelines.profiles import profile_for
    from tests.static_inputs import StaticInputAddresses

    recorder = StaticInputAddresses()
    denoiser = UNet2DConditionModel if preset == "tiny-sdxl" else FluxTransformer2DModel
    profile = profile_for(get_preset(preset), "fast")
    graphs = profile.compile.model_copy(update={"mode": "reduce-overhead", "options": None})
    profile = profile.model_copy(update={"name": "fast-graphs", "compile": graphs})
    compile_blocks = denoiser.compile_repeated_blocks

    def compile_recording(self, *args, mode=None, options=None, **kwargs):
        return compile_blocks(self, *args, backend=recorder, **kwargs)

    mark_step_begin = torch.compiler.cudagraph_mark_step_begin

    def step_begin():
        recorder.step_begin()
        mark_step_begin()

    monkeypatch.setattr(denoiser, "compile_repeated_blocks", compile_recording)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", step_begin)
    renderer = renderer_for(registry, preset, profile)
    batches = requests(method)
    size = (SMALL["width"], SMALL["height"])
    warm_up(renderer, sizes=[size], batch_sizes=(1,), steps=SMALL["steps"], largest_batch=3)
    for name in ("alone", "zero", "batch", "alone", "other", "zero", "batch", "other"):
        renderer.render(batches[name])
    renderer.detach_identity()
    assert recorder.graphs > 0 and recorder.static_inputs() > 0 and recorder.paths > len(batches)
    assert recorder.readdressed() == {}
