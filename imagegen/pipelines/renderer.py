"""The render core: one preset loaded once, batches of requests rendered in one pipeline call.

Why batches are safe: every sample gets its own CPU ``torch.Generator`` seeded from its request,
and prompt embeddings are per sample, so a request renders the same image alone or inside any
batch (up to float rounding of batched matmuls).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from types import ModuleType

import numpy as np
import torch
from PIL import Image

from imagegen.errors import BadOutputError, InvalidRequestError
from imagegen.pipelines import flux, sdxl
from imagegen.pipelines.cancel import CallCancelled, Cancelled, CancelWatch, denoise_active_rows
from imagegen.pipelines.compile_cache import CompileCache
from imagegen.pipelines.conditioning import BatchConditioning, Conditioner, IdentityProvider, IdentitySample, Tensors
from imagegen.pipelines.loading import load_optimised_pipeline, pick_device, pick_dtype
from imagegen.pipelines.presets import Preset, get_preset
from imagegen.pipelines.profiles import Profile, profile_for, raise_recompile_limit, reset_step_cache
from imagegen.pipelines.types import RenderRequest, RenderResult
from imagegen.settings import Settings, get_settings
from imagegen.versions import library_versions

log = logging.getLogger(__name__)

FAMILIES: dict[str, ModuleType] = {"flux": flux, "sdxl": sdxl}
#: an image whose brightest pixel is below this (in [0, 1]) counts as all black
BLACK_THRESHOLD = 2 / 255

#: progress callback: (step done, total steps)
Progress = Callable[[int, int], None]
#: ``RenderResult.problem`` of a request cancelled by its caller: no image, nothing post-processed
CANCELLED = "cancelled"


class PromptCache:
    """A bounded LRU of prompt embeddings; encoding text is a large share of a small render."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def get_or_compute(self, key: tuple, compute: Callable[[], dict[str, torch.Tensor]]):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        value = compute()
        with self._lock:
            self.misses += 1
            if self.capacity > 0:
                self._items[key] = value
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


def image_problem(pixels: np.ndarray) -> str | None:
    """'nan' for non-finite pixels, 'black' for an all-black image, None for a usable one."""
    if not np.isfinite(pixels).all():
        return "nan"
    if float(pixels.max()) < BLACK_THRESHOLD:
        return "black"
    return None


def to_pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8))


class Renderer:
    """Hosts one preset's pipeline; renders lists of requests in as few pipeline calls as possible.

    Identity comes from the injected ``identity`` provider (``imagegen.pipelines.conditioning``):
    the renderer attaches, uses and detaches conditioners and asks for each character's tensors;
    which characters exist and which may be rendered is the provider's business. Without a
    provider a request naming a character is refused.
    """

    def __init__(
        self,
        preset: str | Preset,
        settings: Settings | None = None,
        device: str | None = None,
        identity: IdentityProvider | None = None,
        profile: str | Profile | None = None,
    ):
        self.settings = settings or get_settings()
        self.preset = preset if isinstance(preset, Preset) else get_preset(preset)
        self.family = FAMILIES[self.preset.family]
        self.device = torch.device(device) if device else pick_device(self.settings)
        self.dtype = pick_dtype(self.preset, self.device)
        #: the optimisation profile (``imagegen.pipelines.profiles``): None is the preset's own / IMAGEGEN_PROFILE
        self.profile = profile if isinstance(profile, Profile) else profile_for(self.preset, profile, self.settings)
        started = time.perf_counter()
        self.pipe, self.applied_profile = load_optimised_pipeline(
            self.preset, self.device, self.dtype, self.settings, self.profile
        )
        self.load_seconds = time.perf_counter() - started
        #: compiled code kept between processes (None under a profile that does not compile): its local directory is
        #: set and its stored artifacts are loaded now, before the first call compiles (``torch.compile`` is lazy);
        #: warm-up stores them (``imagegen.pipelines.compile_cache``)
        self.compile_cache: CompileCache | None = None
        #: the profile compiled the denoiser's blocks (every render raises dynamo's recompile limit in its thread)
        self.compiles = "compile" in self.applied_profile.applied
        if self.compiles:
            self.compile_cache = CompileCache.for_renderer(self.settings, self.preset.name, self.profile, self.device)
            self.compile_cache.start()
        self.prompt_cache = PromptCache(self.settings.prompt_cache_size)
        # a diffusers pipeline holds per-call state (scheduler timesteps): one call at a time
        self._lock = threading.Lock()
        self.identity = identity
        self._conditioners: dict[str, Conditioner] = {}
        self._attached: str | None = None
        self._batch_ids = itertools.count(1)
        self._instance = uuid.uuid4().hex[:8]
        #: requests cancelled inside a pipeline call, and calls stopped because all theirs were
        self.cancelled_rows = 0
        self.stopped_calls = 0
        log.info(
            "loaded preset %s on %s/%s, profile %s, in %.2fs",
            self.preset.name,
            self.device,
            self.dtype,
            self.profile.name,
            self.load_seconds,
        )

    def prepare(self, request: RenderRequest) -> RenderRequest:
        """Validate a request against this preset and fill its defaults (seed and method included)."""
        if request.character is not None:
            if self.identity is None:
                raise InvalidRequestError(
                    f"this renderer of preset '{self.preset.name}' has no identity provider; "
                    "render characters through the CLI or the service",
                    field="character",
                )
            request = request.model_copy(update={"method": self.identity.resolve_method(self.preset, request.method)})
        resolved = request.resolved(self.preset)
        resolved.check_against(self.preset)
        return resolved

    def render(
        self,
        requests: Sequence[RenderRequest],
        progress: Progress | None = None,
        strict: bool = False,
        cancelled: Sequence[Cancelled | None] | None = None,
    ) -> list[RenderResult]:
        """Prepare and render every request; results come back in request order (see ``render_prepared``)."""
        return self.render_prepared([self.prepare(r) for r in requests], progress, strict, cancelled)

    def render_prepared(
        self,
        prepared: Sequence[RenderRequest],
        progress: Progress | None = None,
        strict: bool = False,
        cancelled: Sequence[Cancelled | None] | None = None,
    ) -> list[RenderResult]:
        """Render requests ``prepare`` returned; results come back in request order.

        Compatible requests (same size, steps, guidance) share one pipeline call; each result
        says which (``RenderResult.batch``). Every character's tensors are fetched before the
        first call, so an unknown or unrenderable character refuses the whole list before
        anything renders. With ``strict`` a NaN or black image raises ``BadOutputError``;
        otherwise it is reported on its result.

        ``cancelled`` (one flag per request, None for a request without one) is read after every
        denoising step: a cancelled request leaves its batch at the next step and comes back with
        ``problem == CANCELLED`` and no image (see ``imagegen.pipelines.cancel``); a pipeline call
        whose requests are all cancelled stops at once, and one cancelled before it starts never runs.
        """
        if cancelled is not None and len(cancelled) != len(prepared):
            raise ValueError(f"{len(cancelled)} cancellation flags for {len(prepared)} requests")
        groups = self._pipeline_calls(prepared)
        tensors = self._identity_tensors(prepared, groups)
        total_steps = sum(prepared[idx[0]].steps for idx in groups.values())
        done_steps = 0
        results: list[RenderResult | None] = [None] * len(prepared)
        # the attached method's calls first: a list mixing methods switches once less
        for (_, method), indices in sorted(groups.items(), key=lambda group: group[0][1] != self._attached):
            batch = [prepared[i] for i in indices]
            flags = [cancelled[i] for i in indices] if cancelled is not None else None
            rendered = self._render_batch(batch, method, tensors, progress, done_steps, total_steps, flags)
            for i, result in zip(indices, rendered, strict=True):
                results[i] = result
            done_steps += batch[0].steps
        final = [r for r in results if r is not None]
        bad = [r for r in final if not r.ok and r.problem != CANCELLED]
        if bad:
            log.warning("%d of %d images unusable: %s", len(bad), len(final), [(r.seed, r.problem) for r in bad])
            if strict:
                raise BadOutputError(
                    f"{len(bad)} of {len(final)} images came out unusable ("
                    + ", ".join(f"seed {r.seed}: {r.problem}" for r in bad)
                    + "); in half precision this is usually a VAE overflow: use an fp16-safe VAE or float32"
                )
        return final

    @staticmethod
    def _pipeline_calls(prepared: Sequence[RenderRequest]) -> dict[tuple, list[int]]:
        """Indices of (prepared) requests that share a pipeline call: same shape and identity method.

        A request without a character joins a group of its shape that has a method (identity
        weight 0 leaves it exactly as a plain render), so mixed batches stay one call.
        """
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(prepared):
            if request.character is not None:
                groups.setdefault((request.batch_key(), request.method), []).append(index)
        for index, request in enumerate(prepared):
            if request.character is None:
                key = next((k for k in groups if k[0] == request.batch_key()), (request.batch_key(), None))
                groups.setdefault(key, []).append(index)
        return {key: sorted(indices) for key, indices in groups.items()}

    def _identity_tensors(self, prepared: Sequence[RenderRequest], groups: dict[tuple, list[int]]) -> dict:
        """(character, version, method) -> tensors for every character of the list: one provider call per triple."""
        tensors: dict[tuple[str, int | None, str], Tensors] = {}
        for (_, method), indices in groups.items():
            for i in indices:
                request = prepared[i]
                key = (request.character, request.character_version, method)
                if request.character is not None and key not in tensors:
                    assert self.identity is not None and method is not None  # prepare() refused it otherwise
                    tensors[key] = self.identity.tensors_for(  # type: ignore[index]
                        request.character, self.conditioner(method), request.character_version
                    )
        return tensors

    def conditioner(self, name: str) -> Conditioner:
        """The conditioner ``name`` for this pipeline, loaded once (not necessarily attached)."""
        if name not in self._conditioners:
            if self.identity is None:
                raise InvalidRequestError(f"this renderer has no identity provider for method '{name}'", field="method")
            conditioner = self.identity.load(name, self.preset, self.device, self.dtype)
            conditioner.check_profile(self.profile)  # a method the profile would break refuses before any render
            self._conditioners[name] = conditioner
        return self._conditioners[name]

    def identity_method(self, name: str) -> Conditioner:
        """The conditioner ``name``, loaded once and attached to this pipeline (detaching any other)."""
        conditioner = self.conditioner(name)
        if self._attached != name:
            if self._attached is not None:
                self._conditioners[self._attached].detach(self.pipe)
            conditioner.attach(self.pipe)
            self._attached = name
        return conditioner

    def detach_identity(self) -> None:
        """Remove the attached conditioner: the pipeline renders exactly as freshly loaded."""
        if self._attached is not None:
            self._conditioners[self._attached].detach(self.pipe)
            self._attached = None

    def _identity(self, batch: list[RenderRequest], method_name: str | None, tensors: dict):
        """The identity context of one batch (a no-op context when no sample has a character)."""
        if method_name is None:
            return nullcontext(BatchConditioning())
        conditioner = self.identity_method(method_name)
        samples = [
            IdentitySample(
                tensors=tensors[(r.character, r.character_version, method_name)] if r.character else None,
                weight=r.identity_weight if r.character else 0.0,
                start_step=r.identity_start_step,
            )
            for r in batch
        ]
        first = batch[0]
        cfg = first.true_cfg_scale > 1 if self.preset.family == "flux" else (first.guidance or 0) > 1
        return conditioner.conditioning(self.pipe, samples, cfg=cfg)

    def _encode(self, request: RenderRequest) -> dict[str, torch.Tensor]:
        return self.prompt_cache.get_or_compute(
            self.family.embed_key(request),
            lambda: self.family.encode(self.pipe, request, self.device, self.preset.max_sequence_length),
        )

    def _render_batch(
        self,
        batch: list[RenderRequest],
        method_name: str | None,
        tensors: dict,
        progress: Progress | None,
        done_before: int,
        total: int,
        flags: Sequence[Cancelled | None] | None = None,
    ) -> list[RenderResult]:
        started = time.perf_counter()
        watch = CancelWatch(flags, len(batch))
        encoded = started
        pixels = None
        with self._lock, torch.inference_mode():
            if self.compiles:
                # dynamo's settings are per thread: the limit apply_profile raised in the loading thread does not hold
                # in a replica's warm-up or pipeline thread, which would fail past 8 variants (fullgraph)
                raise_recompile_limit()
            if not watch.poll(0):  # cancelled while it waited for the pipeline: never starts
                per_sample = [self._encode(r) for r in batch]
                embeds = {key: torch.cat([e[key] for e in per_sample]) for key in per_sample[0]}
                generators = [torch.Generator("cpu").manual_seed(r.seed) for r in batch]
                with self._identity(batch, method_name, tensors) as identity, self._active_rows(watch, identity):
                    encoded = time.perf_counter()

                    def on_step(pipe, step: int, timestep, kwargs):
                        if identity.on_step_end is not None:
                            kwargs = identity.on_step_end(pipe, step, timestep, kwargs)
                        if progress is not None:
                            progress(done_before + step + 1, total)
                        if watch.poll(step + 1):
                            raise CallCancelled
                        return kwargs

                    reset_step_cache(self.pipe, self.preset.family)  # a stopped call leaves its cache behind
                    try:
                        pixels = self.family.call(self.pipe, embeds, batch[0], generators, on_step, **identity.kwargs)
                    except CallCancelled:
                        pixels = None
                watch.poll(batch[0].steps)  # a row cancelled during the decode is dropped too
        finished = time.perf_counter()
        timings = {
            "batch_size": float(len(batch)),
            "encode_s": encoded - started,  # prompts and identity attach
            "pipeline_s": finished - encoded,
            "total_s": finished - started,
        }
        info = {
            "id": f"{self._instance}-{next(self._batch_ids)}",
            "size": len(batch),
            "characters": len({r.character for r in batch if r.character}),
        }
        left = [i for i in range(len(batch)) if watch.cancelled(i)]
        if left:
            self.cancelled_rows += len(left)
            self.stopped_calls += pixels is None
            log.info(
                "batch %s: %d of %d requests cancelled (after steps %s of %d)%s",
                info["id"],
                len(left),
                len(batch),
                [watch.left_at[i] for i in left],
                batch[0].steps,
                "; call stopped" if pixels is None else "",
            )
        results = []
        for row, request in enumerate(batch):
            if watch.cancelled(row):
                results.append(
                    RenderResult(
                        request=request,
                        preset=self.preset.name,
                        profile=self.profile.name,
                        image=None,
                        problem=CANCELLED,
                        timings=dict(timings),
                        versions=library_versions(),
                        batch={**info, "steps_run": watch.left_at[row]},
                    )
                )
                continue
            assert pixels is not None  # the call stops early only when every row is cancelled
            image = pixels[row]
            problem = image_problem(image)
            results.append(
                RenderResult(
                    request=request,
                    preset=self.preset.name,
                    profile=self.profile.name,
                    image=None if problem else to_pil(image),
                    problem=problem,
                    timings=dict(timings),
                    versions=library_versions(),
                    batch=dict(info),
                )
            )
        return results

    def _active_rows(self, watch: CancelWatch, identity: BatchConditioning):
        """Run the denoiser on the rows still in (a no-op context without flags).

        A step cache keeps per-batch state (residuals of every row), so under one nobody leaves mid-call.
        Identity conditioning keeps per-row state of its own (tokens, weights, start steps): it
        leaves with the rows (``identity.select_rows``, called before the first call sliced to
        new rows). Conditioning that cannot narrow (``rows_can_leave`` false) keeps every row to
        the end of the call; its cancelled rows are dropped before post-processing.
        """
        if not watch.watching or watch.size < 2 or not identity.rows_can_leave:
            return nullcontext()
        if self.profile.step_cache is not None:  # its state holds every row of the batch: rows stay to the end
            return nullcontext()
        family = self.family
        return denoise_active_rows(
            family.denoiser(self.pipe), watch, family.denoiser_rows, family.select_rows, identity.select_rows
        )
