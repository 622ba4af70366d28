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
from types import ModuleType

import numpy as np
import torch
from PIL import Image

from imagegen.errors import BadOutputError, InvalidRequestError
from imagegen.pipelines import flux, sdxl
from imagegen.pipelines.loading import load_pipeline, pick_device, pick_dtype
from imagegen.pipelines.presets import Preset, get_preset
from imagegen.pipelines.types import RenderRequest, RenderResult
from imagegen.settings import Settings, get_settings
from imagegen.versions import library_versions

log = logging.getLogger(__name__)

FAMILIES: dict[str, ModuleType] = {"flux": flux, "sdxl": sdxl}
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

    def __init__(self, preset: str | Preset, settings: Settings | None = None, device: str | None = None):
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
        log.info("loaded preset %s on %s/%s in %.2fs", self.preset.name, self.device, self.dtype, self.load_seconds)

    def prepare(self, request: RenderRequest) -> RenderRequest:
        """Validate a request against this preset and fill its defaults (seed included)."""
        if request.character is not None:
            raise InvalidRequestError(
                f"identity conditioning is not available on preset '{self.preset.name}' yet", field="character"
            )
        request.check_against(self.preset)
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
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(prepared):
            groups.setdefault(request.batch_key(), []).append(index)
        total_steps = sum(prepared[idx[0]].steps for idx in groups.values())
        done_steps = 0
        results: list[RenderResult | None] = [None] * len(prepared)
        for indices in groups.values():
            batch = [prepared[i] for i in indices]
            for i, result in zip(indices, self._render_batch(batch, progress, done_steps, total_steps), strict=True):
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

    def _encode(self, request: RenderRequest) -> dict[str, torch.Tensor]:
        return self.prompt_cache.get_or_compute(
            self.family.embed_key(request),
            lambda: self.family.encode(self.pipe, request, self.device, self.preset.max_sequence_length),
        )

    def _render_batch(
        self, batch: list[RenderRequest], progress: Progress | None, done_before: int, total: int
    ) -> list[RenderResult]:
        started = time.perf_counter()
        with self._lock, torch.inference_mode():
            per_sample = [self._encode(r) for r in batch]
            embeds = {key: torch.cat([e[key] for e in per_sample]) for key in per_sample[0]}
            encoded = time.perf_counter()
            generators = [torch.Generator("cpu").manual_seed(r.seed) for r in batch]

            def on_step(pipe, step: int, timestep, kwargs):
                if progress is not None:
                    progress(done_before + step + 1, total)
                return kwargs

            pixels = self.family.call(self.pipe, embeds, batch[0], generators, on_step)
        finished = time.perf_counter()
        timings = {
            "batch_size": float(len(batch)),
            "encode_s": encoded - started,
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
