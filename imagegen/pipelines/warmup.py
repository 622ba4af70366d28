"""Warm a loaded ``Renderer`` up once, before it takes traffic: every cost a first request would pay.

A freshly loaded pipeline is slow on its first calls: lazy CUDA / oneDNN kernel selection, the
allocator growing its pools, and, under a compiling optimisation profile, ``torch.compile`` tracing
and compiling the denoiser's blocks for each new input shape (size x batch). Identity conditioners
load their own modules on first use. A replica that skipped this would make its first callers pay
seconds to minutes, and under a compiling profile every new (size, batch) would stall the batch that
first meets it. So a renderer replica calls :func:`warm_up` at start with the sizes it is configured
for (``RendererConfig.warmup_sizes``) and reports itself ready only afterwards (``/readyz``).

What it does, on the calling thread (the replica's render thread):

1. renders plain requests at every configured size x batch size (``steps`` denoising steps: the
   first step and a later one take every code path, step caches included);
2. loads every identity method of the preset (``renderer.conditioner``); a conditioner that offers
   ``example_tensors()`` (identity tensors of the right shapes that need no registered character)
   also renders one identity sample at the first size, so its hooks are traced and compiled too, and,
   under a compiling profile, a batch of two samples and a batch of a sample and a plain request (the
   compiled blocks' variants for "every row takes identity" and "some rows do", each at a second batch
   size, which makes the batch dimension dynamic), and first of all a batch of the largest size the
   renderer will be given (a replica's ``max_batch_size``), which sizes the buffers that keep identity
   values at fixed addresses for CUDA graphs (``imagegen.identity.fixed_address``) once, before any
   graph reads them;
3. under a compiling profile, stores what it compiled for the next replica when it was new
   (``imagegen.pipelines.compile_cache``: a replica that finds it compiles from cache);
4. returns a :class:`WarmupReport`: seconds per step of the above, the ``torch._dynamo``
   counters that moved (graphs compiled, recompiles, graph breaks) so a profile that recompiles per
   batch composition shows up at start rather than in production latency, and what the compile caches did.

A size the preset cannot render is a :class:`WarmupError` naming the setting, not a crash later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from imagegen.errors import ImagegenError
from imagegen.pipelines.profiles import compile_phase_seconds
from imagegen.pipelines.types import RenderRequest

log = logging.getLogger(__name__)

#: the character id warm-up renders carry: reserved for :class:`_ExampleIdentity`, never looked up in a registry
WARMUP_CHARACTER = "imagegen-warmup"
#: ``torch._dynamo.utils.counters`` groups worth reporting (their totals before vs after warm-up)
DYNAMO_GROUPS = ("stats", "recompiles", "graph_break", "unimplemented")


class WarmupError(ImagegenError):
    """Warm-up could not render a configured shape or load an identity method; the replica must not serve."""

    code = "warmup_failed"


@dataclass
class WarmupReport:
    """What :func:`warm_up` did and what it cost (``/readyz`` shows it)."""

    seconds: float = 0.0
    #: one entry per plain render: {"size": [w, h], "batch": n, "seconds": s}
    renders: list[dict[str, Any]] = field(default_factory=list)
    #: one entry per identity method: {"method", "load_s", "rendered" (bool), "render_s"}
    identity: list[dict[str, Any]] = field(default_factory=list)
    #: ``torch._dynamo`` counters that changed during warm-up (group -> name -> delta); empty when eager
    compile: dict[str, dict[str, int]] = field(default_factory=dict)
    #: the renderer's optimisation profile name (None before renderers had profiles)
    profile: str | None = None
    #: seconds of the warm-up's compiles per phase (``profiles.COMPILE_PHASES``: tracing, backend, kernel compiles,
    #: cache loads ...); empty when eager
    compile_phases: dict[str, float] = field(default_factory=dict)
    #: what the compile caches did (``CompileCacheReport.summary()``: loaded / saved, hits and misses); None when the
    #: profile does not compile
    compile_cache: dict[str, Any] | None = None

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        """(width, height, batch) of every plain render."""
        return [(r["size"][0], r["size"][1], r["batch"]) for r in self.renders]

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data["seconds"] = round(self.seconds, 3)
        return data


def compiles(renderer: Any) -> bool:
    """Whether ``renderer``'s profile compiled its denoiser's blocks (``torch.compile``: variants to warm up)."""
    return bool(getattr(renderer, "compiles", False))  # set by Renderer from its applied profile


def profile_name(renderer: Any) -> str | None:
    """``renderer.profile.name`` when the renderer has an optimisation profile, else None."""
    return getattr(getattr(renderer, "profile", None), "name", None)


def warm_up(
    renderer: Any,
    sizes: Sequence[tuple[int, int]] | None = None,
    batch_sizes: Sequence[int] = (1,),
    *,
    steps: int = 2,
    identity: bool = True,
    largest_batch: int | None = None,
) -> WarmupReport:
    """Render ``renderer``'s configured shapes once and load its identity methods (see the module docstring).

    ``sizes``: (width, height) pairs; None or empty means the preset's default size. ``batch_sizes``:
    batch sizes rendered at every size. ``identity``: also load (and, where the conditioner has
    ``example_tensors()``, render with) every identity method of the preset. ``largest_batch``: the largest batch
    the renderer will be given (default: the largest of ``batch_sizes``), the size of the first identity batch under
    a compiling profile.
    """
    started = time.perf_counter()
    preset = renderer.preset
    shapes = [(int(w), int(h)) for w, h in sizes] if sizes else [(preset.defaults.width, preset.defaults.height)]
    batches = sorted({int(b) for b in batch_sizes}) or [1]
    if batches[0] < 1:
        raise WarmupError(f"warm-up batch sizes must be at least 1, got {batches}")
    before, phases_before = _dynamo_counters(), compile_phase_seconds()
    report = WarmupReport(profile=profile_name(renderer))
    for width, height in shapes:
        for batch in batches:
            requests = [_request(preset, width, height, steps, seed=i) for i in range(batch)]
            t0 = time.perf_counter()
            try:
                renderer.render(requests)
            except ImagegenError as exc:
                raise WarmupError(
                    f"warm-up of preset '{preset.name}' at {width}x{height}, batch {batch} failed: {exc} "
                    "(check the renderer's warmup_sizes against the preset's limits in configs/models.yaml)"
                ) from exc
            seconds = round(time.perf_counter() - t0, 3)
            report.renders.append({"size": [width, height], "batch": batch, "seconds": seconds})
    if identity and getattr(renderer, "identity", None) is not None:
        width, height = shapes[0]
        largest = max(batches[-1], largest_batch or 0)
        for method in preset.methods:
            report.identity.append(_warm_method(renderer, method, width, height, steps, largest=largest))
    report.compile = _counter_delta(before, _dynamo_counters())
    phases = compile_phase_seconds()
    report.compile_phases = {
        name: round(seconds - phases_before[name], 3)
        for name, seconds in phases.items()
        if seconds - phases_before[name] >= 0.001
    }
    cache = getattr(renderer, "compile_cache", None)
    if cache is not None:
        # everything the configured shapes compile is compiled now: store it for the next replica (when new)
        report.compile_cache = cache.finish().summary()
    report.seconds = time.perf_counter() - started
    log.info(
        "warmed up %s (profile %s) in %.2fs: shapes %s, identity methods %s%s",
        preset.name,
        report.profile,
        report.seconds,
        report.shapes,
        [m["method"] for m in report.identity],
        f", compile counters {report.compile}" if report.compile else "",
    )
    if report.compile_cache is not None:
        log.info(
            "compile cache: artifacts %s, %s; hits/misses %s; compile phases (s) %s",
            report.compile_cache["load"],
            report.compile_cache["save"],
            report.compile_cache["counters"],
            report.compile_phases,
        )
    return report


def _request(preset: Any, width: int, height: int, steps: int, seed: int, **extra: Any) -> RenderRequest:
    steps = min(steps, preset.limits.max_steps)
    try:
        return RenderRequest(prompt="warm-up", seed=seed, width=width, height=height, steps=steps, **extra)
    except ValueError as exc:
        raise WarmupError(f"warm-up size {width}x{height} is not a valid request: {exc}") from None


def _warm_method(renderer: Any, method: str, width: int, height: int, steps: int, largest: int = 1) -> dict[str, Any]:
    """Load ``method``'s conditioner; render one identity sample when it has ``example_tensors()`` (under a
    compiling profile also the batches described in the module docstring, the first one ``largest`` samples)."""
    t0 = time.perf_counter()
    try:
        conditioner = renderer.conditioner(method)
    except Exception as exc:
        raise WarmupError(
            f"warm-up could not load identity method '{method}' of '{renderer.preset.name}': {exc}"
        ) from exc
    entry: dict[str, Any] = {"method": method, "load_s": round(time.perf_counter() - t0, 3), "rendered": False}
    examples = getattr(conditioner, "example_tensors", None)
    if not callable(examples):
        return entry
    t0 = time.perf_counter()
    request = _request(renderer.preset, width, height, steps, seed=0, character=WARMUP_CHARACTER, method=method)
    plain = _request(renderer.preset, width, height, steps, seed=0)
    batches = [[request], [plain]]  # a plain request while the method stays attached runs the hooks' other branch
    if compiles(renderer):
        # a compiled block has a variant per state the identity puts it in: every row taking it (FaceID's LoRA merged
        # into the weights, no hooks) and some rows only (hooks on); a second batch size of each makes its batch
        # dimension dynamic, so no later batch size or composition compiles in the middle of a request
        batches += [[request, request.model_copy(update={"seed": 1})], [request, plain]]
        if largest > 2:
            # the largest batch first: it sizes the buffers that hold identity values at fixed addresses (FixedSlots)
            # once and for all, before any graph reads them; growing them later would move every value the graphs
            # recorded so far read, and CUDA graphs would record each identity block again
            batches.insert(0, [request.model_copy(update={"seed": seed}) for seed in range(largest)])
    with _example_identity(renderer, examples()):
        try:
            for batch in batches:
                renderer.render(batch)
        except ImagegenError as exc:
            raise WarmupError(f"warm-up identity render with '{method}' failed: {exc}") from exc
    entry.update(rendered=True, render_s=round(time.perf_counter() - t0, 3))
    return entry


class _ExampleIdentity:
    """The renderer's identity provider, except that :data:`WARMUP_CHARACTER` gets example tensors.

    Warm-up must not need a registered character (a fresh deployment has none) nor touch the
    registry; everything else (method choice, loading) is the real provider's.
    """

    def __init__(self, inner: Any, tensors: dict):
        self.inner = inner
        self.tensors = tensors

    def resolve_method(self, preset: Any, requested: str | None) -> str:
        return self.inner.resolve_method(preset, requested)

    def load(self, name: str, preset: Any, device: Any, dtype: Any) -> Any:
        return self.inner.load(name, preset, device, dtype)

    def tensors_for(self, character: str, conditioner: Any, version: int | None = None) -> dict:
        if character == WARMUP_CHARACTER:
            return self.tensors
        return self.inner.tensors_for(character, conditioner, version)


@contextmanager
def _example_identity(renderer: Any, tensors: dict):
    """Swap the renderer's provider for one that knows the warm-up character (warm-up runs before traffic)."""
    inner = renderer.identity
    renderer.identity = _ExampleIdentity(inner, tensors)
    try:
        yield
    finally:
        renderer.identity = inner


def _dynamo_counters() -> dict[str, dict[str, int]]:
    """A copy of ``torch._dynamo.utils.counters`` (empty when dynamo was never imported)."""
    import sys

    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return {}
    counters = getattr(utils, "counters", {})
    return {group: dict(counters[group]) for group in DYNAMO_GROUPS if group in counters}


def _counter_delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    delta: dict[str, dict[str, int]] = {}
    for group, values in after.items():
        moved = {
            str(name): int(value - before.get(group, {}).get(name, 0))
            for name, value in values.items()
            if isinstance(value, int | float) and value != before.get(group, {}).get(name, 0)
        }
        if moved:
            delta[group] = moved
    return delta
