"""The render core: one preset loaded once, batches of requests rendered in one pipeline call.

Why batches are safe: every sample gets its own CPU ``torch.Generator`` seeded from its request,
and prompt embeddings are per sample, so a request renders the same image alone or inside any
batch (up to float rounding of batched matmuls).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from types import ModuleType

import numpy as np
import torch
from PIL import Image

from imagegen.errors import BadOutputError
from imagegen.identity.conditioning import (
    BatchConditioning,
    CharacterNotRenderableError,
    ConditioningCache,
    IdentityMethod,
    IdentitySample,
)
from imagegen.identity.methods import create_method, resolve_method
from imagegen.pipelines import flux, sdxl
from imagegen.pipelines.loading import load_pipeline, pick_device, pick_dtype
from imagegen.pipelines.presets import Preset, get_preset
from imagegen.pipelines.types import RenderRequest, RenderResult
from imagegen.settings import Settings, get_settings
from imagegen.versions import library_versions

log = logging.getLogger(__name__)

FAMILIES: dict[str, ModuleType] = {"flux": flux, "sdxl": sdxl}
#: characters whose identity tensors a renderer keeps in memory
IDENTITY_LRU_SIZE = 64
#: an image whose brightest pixel is below this (in [0, 1]) counts as all black
BLACK_THRESHOLD = 2 / 255

#: progress callback: (step done, total steps)
Progress = Callable[[int, int], None]


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
    """Hosts one preset's pipeline; renders lists of requests in as few pipeline calls as possible."""

    def __init__(
        self,
        preset: str | Preset,
        settings: Settings | None = None,
        device: str | None = None,
        registry=None,
        allow_draft: bool = False,
    ):
        self.settings = settings or get_settings()
        self.preset = preset if isinstance(preset, Preset) else get_preset(preset)
        self.family = FAMILIES[self.preset.family]
        self.device = torch.device(device) if device else pick_device(self.settings)
        self.dtype = pick_dtype(self.preset, self.device)
        started = time.perf_counter()
        self.pipe = load_pipeline(self.preset, self.device, self.dtype, self.settings)
        self.load_seconds = time.perf_counter() - started
        self.prompt_cache = PromptCache(self.settings.prompt_cache_size)
        # a diffusers pipeline holds per-call state (scheduler timesteps): one call at a time
        self._lock = threading.Lock()
        #: the registry characters and cached identity tensors come from (opened on first use)
        self._registry = registry
        #: render characters still in draft (artists previewing); approved only otherwise
        self.allow_draft = allow_draft
        self._methods: dict[str, IdentityMethod] = {}
        self._attached: str | None = None
        self._conditioning: ConditioningCache | None = None
        #: (character id, version, method) -> tensors: the hot path reads neither disk nor face models
        self._identity_lru: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        log.info("loaded preset %s on %s/%s in %.2fs", self.preset.name, self.device, self.dtype, self.load_seconds)

    def prepare(self, request: RenderRequest) -> RenderRequest:
        """Validate a request against this preset and fill its defaults (seed and method included)."""
        request.check_against(self.preset)
        if request.character is not None:
            request = request.model_copy(update={"method": resolve_method(self.preset, request.method)})
        resolved = request.resolved(self.preset)
        resolved.check_against(self.preset)
        return resolved

    def render(
        self,
        requests: Sequence[RenderRequest],
        progress: Progress | None = None,
        strict: bool = False,
    ) -> list[RenderResult]:
        """Render every request; results come back in request order.

        Compatible requests (same size, steps, guidance) share one pipeline call. With ``strict``
        a NaN or black image raises ``BadOutputError``; otherwise it is reported on its result.
        """
        prepared = [self.prepare(r) for r in requests]
        for request in prepared:
            if request.character is not None:
                self._character(request.character)  # unknown or unapproved: refuse before rendering anything
        groups = self.pipeline_calls(prepared)
        total_steps = sum(prepared[idx[0]].steps for idx in groups.values())
        done_steps = 0
        results: list[RenderResult | None] = [None] * len(prepared)
        for (_, method), indices in groups.items():
            batch = [prepared[i] for i in indices]
            rendered = self._render_batch(batch, method, progress, done_steps, total_steps)
            for i, result in zip(indices, rendered, strict=True):
                results[i] = result
            done_steps += batch[0].steps
        final = [r for r in results if r is not None]
        bad = [r for r in final if not r.ok]
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
    def pipeline_calls(prepared: list[RenderRequest]) -> dict[tuple, list[int]]:
        """Indices of (prepared) requests that share a pipeline call: same shape and identity method.

        Public so callers that report batches (the Ray actor) count what ``render`` really did.

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

    @property
    def registry(self):
        if self._registry is None:
            from imagegen.identity.registry import Registry

            self._registry = Registry.open(self.settings)
        return self._registry

    def _character(self, character_id: str):
        character = self.registry.get(character_id)
        if character.status != "approved" and not self.allow_draft:
            raise CharacterNotRenderableError(
                f"character '{character_id}' is a draft; approve it first "
                f"(`imagegen characters approve {character_id}`)"
            )
        return character

    def identity_method(self, name: str) -> IdentityMethod:
        """The method ``name``, loaded once and attached to this pipeline (detaching any other)."""
        if name not in self._methods:
            self._methods[name] = create_method(name, self.preset, self.device, self.dtype, self.settings)
        if self._attached != name:
            if self._attached is not None:
                self._methods[self._attached].detach(self.pipe)
            self._methods[name].attach(self.pipe)
            self._attached = name
        return self._methods[name]

    def detach_identity(self) -> None:
        """Remove the attached identity method: the pipeline renders exactly as freshly loaded."""
        if self._attached is not None:
            self._methods[self._attached].detach(self.pipe)
            self._attached = None

    @property
    def conditioning_cache(self) -> ConditioningCache:
        if self._conditioning is None:
            self._conditioning = ConditioningCache(self.registry)
        return self._conditioning

    def identity_tensors(self, character_id: str, method: IdentityMethod) -> dict[str, torch.Tensor]:
        """Cached conditioning of a character: memory, then the registry, computed only on a miss."""
        character = self._character(character_id)
        key = (character.id, character.version, method.name, method.weights_hash)
        if key not in self._identity_lru:
            self._identity_lru[key] = self.conditioning_cache.get(character, method)
            while len(self._identity_lru) > IDENTITY_LRU_SIZE:
                self._identity_lru.popitem(last=False)
        self._identity_lru.move_to_end(key)
        return self._identity_lru[key]

    def _identity(self, batch: list[RenderRequest], method_name: str | None):
        """The identity context of one batch (a no-op context when no sample has a character)."""
        if method_name is None:
            return nullcontext(BatchConditioning())
        method = self.identity_method(method_name)
        samples = [
            IdentitySample(
                tensors=self.identity_tensors(r.character, method) if r.character else None,
                weight=r.identity_weight if r.character else 0.0,
                start_step=r.identity_start_step,
            )
            for r in batch
        ]
        first = batch[0]
        cfg = first.true_cfg_scale > 1 if self.preset.family == "flux" else (first.guidance or 0) > 1
        return method.conditioning(self.pipe, samples, cfg=cfg)

    def _encode(self, request: RenderRequest) -> dict[str, torch.Tensor]:
        return self.prompt_cache.get_or_compute(
            self.family.embed_key(request),
            lambda: self.family.encode(self.pipe, request, self.device, self.preset.max_sequence_length),
        )

    def _render_batch(
        self,
        batch: list[RenderRequest],
        method_name: str | None,
        progress: Progress | None,
        done_before: int,
        total: int,
    ) -> list[RenderResult]:
        started = time.perf_counter()
        with self._lock, torch.inference_mode():
            per_sample = [self._encode(r) for r in batch]
            embeds = {key: torch.cat([e[key] for e in per_sample]) for key in per_sample[0]}
            generators = [torch.Generator("cpu").manual_seed(r.seed) for r in batch]
            with self._identity(batch, method_name) as identity:
                encoded = time.perf_counter()

                def on_step(pipe, step: int, timestep, kwargs):
                    if identity.on_step_end is not None:
                        kwargs = identity.on_step_end(pipe, step, timestep, kwargs)
                    if progress is not None:
                        progress(done_before + step + 1, total)
                    return kwargs

                pixels = self.family.call(self.pipe, embeds, batch[0], generators, on_step, **identity.kwargs)
        finished = time.perf_counter()
        timings = {
            "batch_size": float(len(batch)),
            "encode_s": encoded - started,  # prompts and identity lookup
            "pipeline_s": finished - encoded,
            "total_s": finished - started,
        }
        results = []
        for request, image in zip(batch, pixels, strict=True):
            problem = image_problem(image)
            results.append(
                RenderResult(
                    request=request,
                    preset=self.preset.name,
                    image=None if problem else to_pil(image),
                    problem=problem,
                    timings=dict(timings),
                    versions=library_versions(),
                )
            )
        return results
