"""The one class that hosts a ``Renderer`` in a long-lived Ray process, and the call it takes.

The same class serves online (wrapped by the Serve replica ``imagegen.serve.renderer_deployment``)
and offline (``ray.remote`` actors in an ``ActorPool`` for suites and bulk jobs, see
:func:`actor_pool`): it loads and warms up its preset once, reports its health, and renders
batches of :class:`RenderCall`. Every image is finished where its pixels are: scored against the
consistency gate's centroid when the call has one, watermarked, stamped with provenance metadata
and encoded as PNG **once**; only the PNG bytes and plain data cross the process boundary.

``render`` renders a batch and raises on the first bad request (what a suite wants);
``render_isolated`` renders a batch coming from *different* callers: each request is validated
on its own, a bad one becomes a :class:`RenderError` for that caller only, and a batch whose
pipeline call fails is split so one request cannot fail the others. A caller that goes away sets
its request's cancellation flag: the request leaves its pipeline call at the next denoising step
and ends as a :class:`RenderCancelled`, never scored, watermarked or encoded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from imagegen import provenance
from imagegen.errors import ImagegenError
from imagegen.identity.provider import identity_renderer
from imagegen.pipelines.assets import preflight
from imagegen.pipelines.cancel import Cancelled
from imagegen.pipelines.presets import get_preset
from imagegen.pipelines.renderer import CANCELLED, Progress
from imagegen.pipelines.types import RenderRequest, RenderResult
from imagegen.pipelines.warmup import WarmupReport, profile_name, warm_up
from imagegen.provenance.png import STRIP_THREADS as PNG_STRIP_THREADS
from imagegen.serve.gate import GateScorer
from imagegen.settings import get_settings

log = logging.getLogger(__name__)

#: threads that stamp the images of one batch side by side: watermarking and PNG/zlib encoding release the GIL,
#: and at 1024 px each image costs a few hundred CPU ms that would otherwise run one after another while the
#: accelerator waits for the next batch
STAMP_THREADS = max(1, min(4, os.cpu_count() or 1))


def encode_threads(images: int) -> int:
    """The threads each of ``images`` PNGs stamped side by side may encode its strips on: the strip pool divided
    between them (strips cost ~20% more CPU than one encode: worth it only on cores that would otherwise idle)."""
    return max(1, PNG_STRIP_THREADS // max(1, min(images, STAMP_THREADS)))


#: progress of one pipeline call inside ``render_isolated``: (indices of the requests in it, done, total)
GroupProgress = Callable[[list[int], int, int], None]

#: runs the finishing of one pipeline call's images (scores, stamps, ``on_result``), given as a job: at once in
#: the render thread (``finish_now``), or handed to another thread so the next pipeline call can start
Finisher = Callable[[Callable[[], None]], None]


def finish_now(job: Callable[[], None]) -> None:
    job()


@dataclass(frozen=True)
class GateTarget:
    """The consistency gate of one image: score its largest face against ``centroid`` (backend's scale)."""

    backend: str
    centroid: tuple[float, ...]


@dataclass(frozen=True)
class RenderCall:
    """One image to render, as it travels from the render service (or a suite) to a renderer.

    ``request`` was validated at the edge; the replica prepares it once. The provenance fields
    say who asked (``request_id``, and ``extra`` such as the key and job), ``metadata`` adds
    plain entries to the PNG (a suite's cell), ``gate`` asks for a face score.
    """

    request: RenderRequest
    request_id: str = "offline"
    character_version: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    gate: GateTarget | None = None
    #: stream step progress back to the caller
    progress: bool = False


@dataclass
class RenderedImage:
    """A finished image: PNG bytes (watermarked, with provenance), its metadata, score and batch."""

    png: bytes | None
    image_id: str
    metadata: dict[str, Any]
    problem: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: the pipeline batch this image came from: id, size, distinct characters, replica pid
    batch: dict[str, Any] = field(default_factory=dict)
    #: consistency gate: similarity of the largest face to the centroid (None: no face, or no gate)
    similarity: float | None = None
    #: the provenance record written into the PNG (None for an unusable image)
    provenance: dict[str, Any] | None = None

    @property
    def seed(self) -> int:
        return int(self.metadata["seed"])


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


@dataclass
class RenderCancelled(RenderError):
    """A request its caller cancelled: it left its pipeline call after ``steps_run`` of ``steps`` steps."""

    code: str = "cancelled"
    message: str = "the render was cancelled by its caller"
    steps_run: int = 0
    steps: int = 0


def request_tag(request_id: str) -> str:
    """How health reports name a request: a digest of its id (health is unauthenticated; the id is
    the caller's, who can compute the tag, and nobody else learns it)."""
    return hashlib.sha256(request_id.encode()).hexdigest()[:16]


def as_call(item: RenderCall | RenderRequest) -> RenderCall:
    """A bare ``RenderRequest`` (scripts, suites) as a call with default provenance."""
    return item if isinstance(item, RenderCall) else RenderCall(request=item)


class RendererActor:
    """Hosts one preset's ``Renderer``: load and warm up once, then render and finish batches on demand.

    ``warmup``: one plain render at the preset's default size before the constructor returns (what
    an offline pool needs). The Serve replica passes False and calls :meth:`warm` with the sizes of
    its ``user_config`` instead, so the warm-up covers the shapes it will serve.

    ``profile``: the renderer's optimisation profile (None: ``IMAGEGEN_PROFILE``, else the preset's own).
    """

    def __init__(self, preset: str, warmup: bool = True, device: str | None = None, profile: str | None = None):
        started = time.perf_counter()
        settings = None if profile is None else get_settings().model_copy(update={"profile": profile})
        # a replica never downloads: the preset's model is on this node (or a shared cache), else one line
        # naming `imagegen models pull` for this node, before minutes of loading start
        preflight(get_preset(preset), (), settings)
        self.renderer = identity_renderer(preset, device=device, settings=settings)
        #: who signs the C2PA manifests: "configured" (IMAGEGEN_C2PA_CERT/KEY) or "development"; read at start
        material = provenance.signer_material()
        provenance.verify_signer(material)  # a pair that cannot sign valid manifests fails the replica at start
        self.signer = material.source
        if self.signer == "development":
            log.warning("C2PA: signing with the DEVELOPMENT signer of IMAGEGEN_HOME (configure IMAGEGEN_C2PA_CERT/KEY)")
        #: what warm-up did (None: not warmed up)
        self.warmup: WarmupReport | None = None
        if warmup:
            self.warm(batch_sizes=[1], steps=1, identity=False)
        self.ready_seconds = time.perf_counter() - started
        self.rendered = 0
        self.batches = 0
        self.failed = 0
        self.cancelled = 0
        #: the last few cancellations (request tag, steps run of steps), for health checks and tests
        self.recent_cancels: deque[dict[str, Any]] = deque(maxlen=16)
        #: the pipeline call in progress: (request tags in it, step done, steps), None between calls
        self._rendering: tuple[list[str], int, int] | None = None
        self._gates: dict[str, GateScorer] = {}
        log.info("renderer actor for %s ready in %.2fs (pid %d)", preset, self.ready_seconds, os.getpid())

    def warm(
        self,
        sizes: Sequence[tuple[int, int]] | None = None,
        batch_sizes: Sequence[int] = (1,),
        *,
        steps: int = 2,
        identity: bool = True,
        largest_batch: int | None = None,
    ) -> WarmupReport:
        """Warm the renderer up (``imagegen.pipelines.warmup.warm_up``) and keep the report for health checks."""
        self.warmup = warm_up(
            self.renderer, sizes, batch_sizes, steps=steps, identity=identity, largest_batch=largest_batch
        )
        return self.warmup

    def render(
        self, items: Sequence[RenderCall | RenderRequest], progress: Progress | None = None
    ) -> list[RenderedImage]:
        """Render and finish a batch; the first bad request fails it (``ImagegenError``)."""
        calls = [as_call(i) for i in items]
        results = self.renderer.render([c.request for c in calls], progress=progress)
        self._count(results)
        return self.finish_all(calls, results)

    def render_isolated(
        self,
        items: Sequence[RenderCall | RenderRequest],
        progress: GroupProgress | None = None,
        on_result: Callable[[int, RenderedImage | RenderError], None] | None = None,
        cancelled: Sequence[Cancelled | None] | None = None,
        timings: Sequence[dict[str, float]] | None = None,
        batch_info: dict[str, Any] | None = None,
        finish: Finisher = finish_now,
    ) -> list[RenderedImage | RenderError]:
        """Render calls from independent callers; one bad request never fails the others.

        Each request is prepared alone (an invalid one gets its ``RenderError``); the valid ones
        are grouped by shape (``RenderRequest.batch_key``: different characters share a group,
        identity is per sample) and each group is rendered together. ``progress`` gets each
        group's step progress with the indices of its requests; ``on_result`` gets every outcome
        as soon as it is known (results of a group arrive together).

        ``cancelled`` holds one flag per item (None: cannot be cancelled), read between
        denoising steps: a cancelled request ends as a :class:`RenderCancelled` (see the module
        docstring); a group whose requests are all cancelled stops and frees the renderer.

        ``timings`` (one dict per item) are added to each image's timings, and ``batch_info`` to
        every image's ``batch``, before the image is stamped: the Serve replica records there how
        long each request queued and how long its batch was held open for company.

        ``finish`` runs each group's finishing (scores, stamps, then ``settle`` and ``on_result``). By default it
        runs at once, in this thread, and the returned list holds every outcome. The Serve replica hands it to a
        thread of its own when another batch waits for the renderer, so that batch renders while these images are
        stamped; outcomes of groups still finishing when this returns reach the caller only through ``on_result``.
        """
        calls = [as_call(i) for i in items]
        flags = list(cancelled) if cancelled is not None else [None] * len(calls)
        if len(flags) != len(calls):
            raise ValueError(f"{len(flags)} cancellation flags for {len(calls)} calls")
        extra = _Extra(list(timings) if timings is not None else [{} for _ in calls], dict(batch_info or {}))
        if len(extra.timings) != len(calls):
            raise ValueError(f"{len(extra.timings)} timing records for {len(calls)} calls")
        outcomes: list[RenderedImage | RenderError | None] = [None] * len(calls)

        def settle(index: int, outcome: RenderedImage | RenderError) -> None:
            outcomes[index] = outcome
            if isinstance(outcome, RenderCancelled):
                self.cancelled += 1
                self.recent_cancels.append(
                    {
                        "request": request_tag(calls[index].request_id),
                        "steps_run": outcome.steps_run,
                        "steps": outcome.steps,
                    }
                )
            elif isinstance(outcome, RenderError):
                self.failed += 1
            if on_result is not None:
                on_result(index, outcome)

        prepared: dict[int, RenderRequest] = {}
        for index, call in enumerate(calls):
            flag = flags[index]
            if flag is not None and flag():
                settle(index, RenderCancelled(steps=call.request.steps or 0))
                continue
            try:
                prepared[index] = self.renderer.prepare(call.request)
            except Exception as exc:  # noqa: BLE001 - every failure becomes this caller's error
                settle(index, RenderError.from_exception(exc))
        groups: dict[tuple, list[int]] = {}
        for index, request in prepared.items():
            groups.setdefault(request.batch_key(), []).append(index)
        for indices in groups.values():
            self._render_group(indices, calls, prepared, progress, settle, flags, extra, finish)
        return [o for o in outcomes if o is not None]

    def _render_group(
        self,
        indices: list[int],
        calls: list[RenderCall],
        prepared: dict[int, RenderRequest],
        progress: GroupProgress | None,
        settle: Callable[[int, RenderedImage | RenderError], None],
        flags: Sequence[Cancelled | None],
        extra: _Extra,
        finish: Finisher,
    ) -> None:
        tags = [request_tag(calls[i].request_id) for i in indices]

        def step(done: int, total: int) -> None:
            self._rendering = (tags, done, total)
            if progress is not None:
                progress(indices, done, total)

        try:
            results = self.renderer.render_prepared(
                [prepared[i] for i in indices], progress=step, cancelled=[flags[i] for i in indices]
            )
        except Exception as exc:  # noqa: BLE001 - isolate: retry the members one by one
            if len(indices) == 1:
                log.warning("render failed: %s", exc)
                settle(indices[0], RenderError.from_exception(exc))
                return
            log.warning("a batch of %d failed (%s); rendering its members one by one", len(indices), exc)
            for index in indices:
                self._render_group([index], calls, prepared, progress, settle, flags, extra, finish)
            return
        finally:
            self._rendering = None
        self._count([r for r in results if r.problem != CANCELLED])
        finishing: list[tuple[int, RenderResult]] = []
        for index, result in zip(indices, results, strict=True):
            if result.problem == CANCELLED:  # its caller is gone: no score, watermark or PNG
                steps = result.request.steps or 0
                settle(index, RenderCancelled(steps_run=result.batch.get("steps_run", 0), steps=steps))
                continue
            result.timings.update(extra.timings[index])
            result.batch.update(extra.batch)
            finishing.append((index, result))
        if not finishing:
            return

        def finish_group() -> None:
            finished = self.finish_all([calls[i] for i, _ in finishing], [r for _, r in finishing], isolate=True)
            for (index, _), outcome in zip(finishing, finished, strict=True):
                settle(index, outcome)

        finish(finish_group)

    def _count(self, results: list[RenderResult]) -> None:
        self.rendered += len(results)
        self.batches += len({r.batch.get("id") for r in results})

    def finish(self, call: RenderCall, result: RenderResult) -> RenderedImage:
        """Score (when gated), watermark, stamp and encode one image: the only PNG encode it gets."""
        return self._stamp(call, result, self._score(call, result), encode_threads(1))

    def finish_all(
        self, calls: Sequence[RenderCall], results: Sequence[RenderResult], isolate: bool = False
    ) -> list[Any]:
        """:meth:`finish` for a batch: scores one by one (one face model), stamps side by side (``STAMP_THREADS``).

        ``isolate``: a failure becomes that image's :class:`RenderError` instead of failing the batch.
        """

        def guarded(fn: Callable[[], Any]) -> Any:
            if not isolate:
                return fn()
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - a face-scoring or encoding failure is this caller's
                return RenderError.from_exception(exc)

        scores = [guarded(lambda c=c, r=r: self._score(c, r)) for c, r in zip(calls, results, strict=True)]
        jobs = [
            (lambda c=c, r=r, s=s: self._stamp(c, r, s, threads))
            for c, r, s in zip(calls, results, scores, strict=True)
            if not isinstance(s, RenderError)
        ]
        threads = encode_threads(len(jobs))  # read by the jobs when they run
        if len(jobs) > 1:
            stamped = iter(list(self._stamp_pool().map(guarded, jobs)))
        else:
            stamped = iter([guarded(job) for job in jobs])
        return [s if isinstance(s, RenderError) else next(stamped) for s in scores]

    def _stamp_pool(self) -> ThreadPoolExecutor:
        pool = getattr(self, "_stamp_threads", None)
        if pool is None:
            pool = self._stamp_threads = ThreadPoolExecutor(STAMP_THREADS, thread_name_prefix="stamp")
        return pool

    def _score(self, call: RenderCall, result: RenderResult) -> float | None:
        """The gate's face similarity (None when the call has no gate or the image failed)."""
        if call.gate is None or result.image is None:
            return None
        return self._gate(call.gate.backend).score(result.image, call.gate.centroid)

    def _stamp(self, call: RenderCall, result: RenderResult, similarity: float | None, threads: int) -> RenderedImage:
        metadata = {**result.metadata(), **call.metadata}
        image_id = uuid.uuid4().hex
        batch = {**result.batch, "pid": os.getpid()}
        if result.image is None:
            return RenderedImage(None, image_id, metadata, result.problem, dict(result.timings), batch)
        extra = dict(call.extra)
        if call.gate is not None:
            extra["identity_similarity"] = similarity
        started = time.perf_counter()
        png, record = provenance.stamp(
            result.image,
            metadata,
            image_id=image_id,
            request_id=call.request_id,
            character_version=call.character_version,
            extra=extra,
            encode_threads=threads,
        )
        # watermark + metadata + the PNG encode + the C2PA signature: the replica's own work on each image
        # (in the response's timings; the PNG, already signed, keeps the render's)
        timings = {**result.timings, "stamp_s": round(time.perf_counter() - started, 6)}
        metadata = {**metadata, "timings": timings}
        return RenderedImage(png, image_id, metadata, None, timings, batch, similarity=similarity, provenance=record)

    def _gate(self, backend: str) -> GateScorer:
        if backend not in self._gates:
            self._gates[backend] = GateScorer(backend)
        return self._gates[backend]

    def health(self) -> dict[str, Any]:
        """What a health check needs: alive, which preset, where, how busy it is and has been."""
        rendering = self._rendering
        applied = getattr(self.renderer, "applied_profile", None)
        return {
            "ok": True,
            "preset": self.renderer.preset.name,
            "profile": profile_name(self.renderer),
            "profile_applied": applied.summary() if hasattr(applied, "summary") else None,
            "warm": self.warmup is not None,
            "warmup": None if self.warmup is None else self.warmup.summary(),
            "device": str(self.renderer.device),
            "torch_threads": torch.get_num_threads(),
            "pid": os.getpid(),
            "c2pa_signer": self.signer,
            "ready_seconds": round(self.ready_seconds, 3),
            "rendered": self.rendered,
            "batches": self.batches,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "stopped_calls": self.renderer.stopped_calls,
            "recent_cancels": list(self.recent_cancels),
            "rendering": None
            if rendering is None
            else {"requests": list(rendering[0]), "step": rendering[1], "steps": rendering[2]},
        }


@dataclass(frozen=True)
class _Extra:
    """What ``render_isolated``'s caller adds to each image: per-item timings and shared batch info."""

    timings: list[dict[str, float]]
    batch: dict[str, Any]


def remote_renderer_class(num_gpus: float = 0, num_cpus: float = 1, **options: Any):
    """``RendererActor`` as a Ray actor class with the given resources (GPU count from configuration)."""
    import ray

    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, **options)(RendererActor)


def actor_pool(preset: str, size: int = 1, *, num_gpus: float = 0, num_cpus: float = 1, warmup: bool = True):
    """An offline ``ray.util.ActorPool`` of ``size`` renderer actors for ``preset`` (Ray must be initialised).

    Typical use: ``pool.map(lambda a, batch: a.render.remote(batch), batches)`` with batches of
    ``RenderCall`` (or bare ``RenderRequest``).
    """
    from ray.util import ActorPool

    if size < 1:
        raise ValueError("an actor pool needs at least one actor")
    cls = remote_renderer_class(num_gpus=num_gpus, num_cpus=num_cpus)
    return ActorPool([cls.remote(preset, warmup=warmup) for _ in range(size)])
