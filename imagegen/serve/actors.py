"""The one class that hosts a ``Renderer`` in a long-lived Ray process.

The same class serves online (wrapped by the Serve replica ``imagegen.serve.renderer_deployment``)
and offline (``ray.remote`` actors in an ``ActorPool`` for suites and bulk jobs, see
:func:`actor_pool`): it loads and warms up its preset once, reports its health, and renders
batches. Results cross process boundaries as PNG bytes plus metadata, never as live objects.

``render`` renders a batch and raises on the first bad request (what a suite wants);
``render_isolated`` renders a batch coming from *different* callers: each request is validated
on its own, a bad one becomes a :class:`RenderError` for that caller only, and a batch whose
pipeline call fails is split so one request cannot fail the others.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from imagegen.errors import ImagegenError
from imagegen.pipelines.renderer import Progress, Renderer
from imagegen.pipelines.types import RenderRequest, RenderResult

log = logging.getLogger(__name__)

#: progress of one pipeline call inside ``render_isolated``: (indices of the requests in it, done, total)
GroupProgress = Callable[[list[int], int, int], None]


@dataclass
class RenderedImage:
    """A render result that can be pickled across Ray: PNG bytes, not a PIL object."""

    png: bytes | None
    metadata: dict[str, Any]
    problem: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: the pipeline batch this image came from: id, size, distinct characters, replica pid
    batch: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_result(cls, result: RenderResult, batch: dict[str, Any] | None = None) -> RenderedImage:
        png = None
        if result.image is not None:
            buffer = io.BytesIO()
            result.image.save(buffer, format="PNG")
            png = buffer.getvalue()
        return cls(
            png=png,
            metadata=result.metadata(),
            problem=result.problem,
            timings=dict(result.timings),
            batch=dict(batch or {}),
        )


@dataclass
class RenderError:
    """Why one request of a batch was not rendered (the others were)."""

    code: str
    message: str
    field: str | None = None

    @classmethod
    def from_exception(cls, exc: Exception) -> RenderError:
        if isinstance(exc, ImagegenError):
            return cls(code=exc.code, message=str(exc), field=exc.field)
        return cls(code="render_failed", message=f"{type(exc).__name__}: {exc}")


class RendererActor:
    """Hosts one preset's ``Renderer``: load and warm up once, then render batches on demand."""

    def __init__(self, preset: str, warmup: bool = True, device: str | None = None):
        started = time.perf_counter()
        self.renderer = Renderer(preset, device=device)
        if warmup:
            d = self.renderer.preset.defaults
            self.renderer.render([RenderRequest(prompt="warm-up", seed=0, width=d.width, height=d.height, steps=1)])
        self.ready_seconds = time.perf_counter() - started
        self.rendered = 0
        self.batches = 0
        self.failed = 0
        self._batch_ids = itertools.count(1)
        self._instance = uuid.uuid4().hex[:8]
        log.info("renderer actor for %s ready in %.2fs (pid %d)", preset, self.ready_seconds, os.getpid())

    @staticmethod
    def _parse(request: RenderRequest | dict) -> RenderRequest:
        return request if isinstance(request, RenderRequest) else RenderRequest(**request)

    def render(self, requests: list[RenderRequest | dict], progress: Progress | None = None) -> list[RenderedImage]:
        """Render a batch; requests may arrive as dicts (JSON) or ``RenderRequest`` objects."""
        parsed = [self._parse(r) for r in requests]
        results = self.renderer.render(parsed, progress=progress)
        self.rendered += len(results)
        out: list[RenderedImage | None] = [None] * len(results)
        for members in _pipeline_calls([r.request for r in results]):
            info = self._batch_info([results[i].request for i in members])
            self.batches += 1
            for i in members:
                out[i] = RenderedImage.from_result(results[i], info)
        return [o for o in out if o is not None]

    def render_isolated(
        self,
        requests: Sequence[RenderRequest | dict],
        progress: GroupProgress | None = None,
        on_result: Callable[[int, RenderedImage | RenderError], None] | None = None,
    ) -> list[RenderedImage | RenderError]:
        """Render requests from independent callers; one bad request never fails the others.

        Each request is validated alone (an invalid one gets its ``RenderError``); the valid ones
        are grouped by shape (``RenderRequest.batch_key``: different characters share a group,
        identity is per sample) and each group is one pipeline call. ``progress`` gets each
        group's step progress with the indices of its requests; ``on_result`` gets every outcome
        as soon as it is known (results of a group arrive together).
        """
        outcomes: list[RenderedImage | RenderError | None] = [None] * len(requests)

        def settle(index: int, outcome: RenderedImage | RenderError) -> None:
            outcomes[index] = outcome
            if isinstance(outcome, RenderError):
                self.failed += 1
            if on_result is not None:
                on_result(index, outcome)

        prepared: dict[int, RenderRequest] = {}
        for index, raw in enumerate(requests):
            try:
                prepared[index] = self.renderer.prepare(self._parse(raw))
            except Exception as exc:  # noqa: BLE001 - every failure becomes this caller's error
                settle(index, RenderError.from_exception(exc))
        groups: dict[tuple, list[int]] = {}
        for index, request in prepared.items():
            groups.setdefault(request.batch_key(), []).append(index)
        for indices in groups.values():
            self._render_group(indices, [prepared[i] for i in indices], progress, settle)
        return [o for o in outcomes if o is not None]

    def _render_group(
        self,
        indices: list[int],
        group: list[RenderRequest],
        progress: GroupProgress | None,
        settle: Callable[[int, RenderedImage | RenderError], None],
    ) -> None:
        def step(done: int, total: int) -> None:
            if progress is not None:
                progress(indices, done, total)

        try:
            results = self.renderer.render(group, progress=step)
        except Exception as exc:  # noqa: BLE001 - isolate: retry the members one by one
            if len(group) == 1:
                log.warning("render failed: %s", exc)
                settle(indices[0], RenderError.from_exception(exc))
                return
            log.warning("a batch of %d failed (%s); rendering its members one by one", len(group), exc)
            for index, request in zip(indices, group, strict=True):
                self._render_group([index], [request], progress, settle)
            return
        resolved = [r.request for r in results]
        batches: dict[int, dict[str, Any]] = {}
        for members in _pipeline_calls(resolved):
            info = self._batch_info([resolved[i] for i in members])
            batches.update({i: info for i in members})
        self.rendered += len(results)
        self.batches += len({id(b) for b in batches.values()})
        for position, (index, result) in enumerate(zip(indices, results, strict=True)):
            settle(index, RenderedImage.from_result(result, batches.get(position)))

    def _batch_info(self, requests: Sequence[RenderRequest]) -> dict[str, Any]:
        return {
            "id": f"{self._instance}-{next(self._batch_ids)}",
            "size": len(requests),
            "characters": len({r.character for r in requests if r.character}),
            "pid": os.getpid(),
        }

    def health(self) -> dict[str, Any]:
        """What a health check needs: alive, which preset, where, how busy it has been."""
        return {
            "ok": True,
            "preset": self.renderer.preset.name,
            "device": str(self.renderer.device),
            "torch_threads": torch.get_num_threads(),
            "pid": os.getpid(),
            "ready_seconds": round(self.ready_seconds, 3),
            "rendered": self.rendered,
            "batches": self.batches,
            "failed": self.failed,
        }


def _pipeline_calls(requests: list[RenderRequest]) -> list[list[int]]:
    """Which of ``requests`` (already resolved) ``Renderer.render`` put in the same pipeline call."""
    return list(Renderer.pipeline_calls(requests).values())


def remote_renderer_class(num_gpus: float = 0, num_cpus: float = 1, **options: Any):
    """``RendererActor`` as a Ray actor class with the given resources (GPU count from configuration)."""
    import ray

    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, **options)(RendererActor)


def actor_pool(preset: str, size: int = 1, *, num_gpus: float = 0, num_cpus: float = 1, warmup: bool = True):
    """An offline ``ray.util.ActorPool`` of ``size`` renderer actors for ``preset`` (Ray must be initialised).

    Typical use: ``pool.map(lambda a, batch: a.render.remote(batch), batches)``.
    """
    from ray.util import ActorPool

    if size < 1:
        raise ValueError("an actor pool needs at least one actor")
    cls = remote_renderer_class(num_gpus=num_gpus, num_cpus=num_cpus)
    return ActorPool([cls.remote(preset, warmup=warmup) for _ in range(size)])
