"""The render service: plan → render through the gate → audit, with no web framework in sight.

One ``RenderService`` per ingress replica serves the synchronous route and the job runner alike:

- ``plan`` validates a ``RenderBody`` once for its caller (preset served here, limits, the
  character visible to the caller's tenant and renderable under the age policy, its gate
  centroid) and resolves it into one typed ``RenderRequest`` (seed drawn, defaults filled) plus
  the gate's settings;
- ``execute`` renders every image concurrently (they batch with each other and with other
  requests in the renderer deployment), each through the consistency gate: a ``RenderCall`` per
  attempt goes to the preset's renderer replica, which renders, scores the face, watermarks,
  stamps and encodes the PNG once and returns it with its score; the best attempt wins;
- the winners are audited and counted, and the result comes back as the ``RenderOut`` the HTTP
  layer sends.

Errors are ``ApiError`` (status, code, message, field) or ``ImagegenError``; the HTTP layer maps
them to its one JSON error shape.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from imagegen import provenance
from imagegen.faces import backend_family
from imagegen.identity.methods import resolve_method
from imagegen.identity.provider import refusal
from imagegen.identity.registry import Registry
from imagegen.pipelines.presets import get_preset
from imagegen.pipelines.types import MAX_SEED, RenderRequest
from imagegen.serve.actors import GateTarget, RenderCall, RenderedImage
from imagegen.serve.audit import AuditWriter
from imagegen.serve.config import IngressConfig
from imagegen.serve.errors import ApiError, too_busy
from imagegen.serve.jobs import RendererDied
from imagegen.serve.limits import counted_job_cap_error
from imagegen.serve.metrics import Metrics
from imagegen.serve.schemas import DesignJobResult, GateAttempt, GateReport, ImageOut, JobOut, RenderBody, RenderOut
from imagegen.serve.store import Job, JobCapReached, ServeStore
from imagegen.serve.tenancy import Caller, character_for
from imagegen.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: progress of a whole render: (image index, attempt, step done, steps total)
RenderProgress = Callable[[int, int, int, int], None]


@dataclass(frozen=True)
class Plan:
    """A validated render: what to render (one resolved ``RenderRequest``), for whom, with which gate."""

    request_id: str
    caller: Caller
    job_id: str | None
    preset: str
    base: RenderRequest
    num_images: int
    character_version: int | None
    gate: GateTarget | None
    gate_min: float | None
    max_attempts: int
    body: RenderBody
    #: the deployment's age policy, stamped into every image (``Settings.age_policy``)
    age_policy: str

    @property
    def key_id(self) -> str:
        return self.caller.key_id

    def seed_for(self, index: int, attempt: int) -> int:
        assert self.base.seed is not None
        return self.base.seed + index + attempt * self.num_images

    def call(self, index: int, attempt: int, progress: bool) -> RenderCall:
        """The renderer call of attempt ``attempt`` at image ``index``."""
        return RenderCall(
            request=self.base.model_copy(update={"seed": self.seed_for(index, attempt)}),
            request_id=self.request_id,
            character_version=self.character_version,
            extra={"preset": self.preset, "job_id": self.job_id, "age_policy": self.age_policy},
            gate=self.gate,
            progress=progress,
        )


@dataclass(frozen=True)
class Dispatch:
    """How hard to try a renderer: replica deaths retried, and whether to wait out a full queue."""

    retries: int
    wait_on_backpressure: bool


#: a synchronous request: one retry if a replica dies; a full queue answers 503 at once
SYNC = Dispatch(retries=1, wait_on_backpressure=False)
#: a job: the runner re-queues it if a replica dies; a full queue is waited out
JOB = Dispatch(retries=0, wait_on_backpressure=True)


class Renderers(Protocol):
    """How the service reaches a preset's renderer (Serve handles online; see ``dispatch``)."""

    async def render(
        self, preset: str, call: RenderCall, progress: Callable[[int, int], None] | None, dispatch: Dispatch
    ) -> RenderedImage: ...

    async def health(self, preset: str) -> dict[str, Any]: ...


@dataclass
class Rendered:
    """What ``execute`` returns: the response body (without image bytes) and the PNG of each image."""

    out: RenderOut
    pngs: list[bytes | None]


class RenderService:
    """Plans, renders (through the gate) and audits renders for one ingress replica."""

    def __init__(
        self,
        renderers: Renderers,
        presets: list[str],
        registry: Registry,
        store: ServeStore,
        metrics: Metrics,
        config: Callable[[], IngressConfig],
        gate_backend: str,
        settings: Settings | None = None,
    ):
        self.renderers = renderers
        self.presets = list(presets)
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.config = config
        self.gate_backend = gate_backend
        self.gate_family = backend_family(gate_backend)
        self.settings = settings or get_settings()
        self.db_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="db")
        #: audit rows are written behind the response (``imagegen.serve.audit``)
        self.audit = AuditWriter(store.add_audit, self.db)

    async def db(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking database call off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.db_pool, fn, *args)

    # -- plan ------------------------------------------------------------------------------------
    async def plan(self, body: RenderBody, caller: Caller, request_id: str, job_id: str | None = None) -> Plan:
        """Validate ``body`` for ``caller`` and resolve it into one typed request (raises ``ApiError``)."""
        cfg = self.config()
        if body.preset not in self.presets:
            raise ApiError(
                404,
                "unknown_preset",
                f"preset {body.preset!r} is not served here; served: {', '.join(self.presets)}",
                "preset",
            )
        for name in ("prompt", "negative_prompt"):
            if len(getattr(body, name)) > cfg.max_prompt_chars:
                raise ApiError(422, "invalid_request", f"{name} is longer than {cfg.max_prompt_chars} characters", name)
        if body.num_images > cfg.max_images_per_request:
            raise ApiError(
                422, "invalid_request", f"num_images is above the limit of {cfg.max_images_per_request}", "num_images"
            )
        gate_min = body.min_identity_similarity
        if gate_min is not None and body.character is None:
            raise ApiError(
                422, "invalid_request", "min_identity_similarity needs a character", "min_identity_similarity"
            )
        if body.character is None:
            # identity fields without a character would be ignored: say so instead of rendering as if they applied
            for name in ("method", "identity_weight", "identity_start_step", "character_version"):
                if name in body.model_fields_set and getattr(body, name) != RenderBody.model_fields[name].default:
                    raise ApiError(422, "invalid_request", f"{name} needs a character", name)
        if body.max_attempts is not None and body.max_attempts > 1 and gate_min is None:
            raise ApiError(422, "invalid_request", "max_attempts > 1 needs min_identity_similarity", "max_attempts")
        if body.max_attempts is not None and body.max_attempts > cfg.max_gate_attempts:
            raise ApiError(422, "invalid_request", f"max_attempts is above {cfg.max_gate_attempts}", "max_attempts")
        max_attempts = body.max_attempts or (3 if gate_min is not None else 1)
        seed = body.seed if body.seed is not None else random.SystemRandom().randrange(2**32)
        if seed + body.num_images * max_attempts > MAX_SEED:
            raise ApiError(422, "invalid_request", "seed is too large for this many images and attempts", "seed")
        preset = get_preset(body.preset)
        base = body.render_request().model_copy(update={"seed": seed})
        if base.character is not None:
            base = base.model_copy(update={"method": resolve_method(preset, base.method)})
        base = base.resolved(preset)
        base.check_against(preset)
        character_version, gate = None, None
        if body.character is not None:
            character = await self.db(character_for, self.registry, body.character, caller)
            refused = refusal(character, allow_draft=False, allow_unverified_age=self.settings.allow_unverified_age)
            if refused is not None:
                raise ApiError(409, refused.code, refused.message, "character")
            if body.character_version is not None and body.character_version != character.version:
                raise ApiError(
                    409,
                    "character_changed",
                    f"character {character.id!r} is at version {character.version}, not {body.character_version}",
                    "character_version",
                )
            character_version = character.version
            # the renderer renders this registration or refuses (a character deleted and registered again meanwhile)
            base = base.model_copy(update={"character_version": character_version})
            if gate_min is not None:
                centroid = character.centroids.get(self.gate_family)
                if centroid is None:
                    raise ApiError(
                        422,
                        "invalid_request",
                        f"character {character.id!r} has no identity centroid for face backend "
                        f"{self.gate_family!r}; re-analyse its references",
                        "min_identity_similarity",
                    )
                gate = GateTarget(self.gate_backend, tuple(float(v) for v in centroid))
        return Plan(
            request_id=request_id,
            caller=caller,
            job_id=job_id,
            preset=body.preset,
            base=base,
            num_images=body.num_images,
            character_version=character_version,
            gate=gate,
            gate_min=gate_min,
            max_attempts=max_attempts,
            body=body.model_copy(update={"seed": seed}),
            age_policy=self.settings.age_policy,
        )

    # -- execute ---------------------------------------------------------------------------------
    async def execute(self, plan: Plan, dispatch: Dispatch, on_progress: RenderProgress | None = None) -> Rendered:
        """Render every image of ``plan`` (concurrently: they batch with each other and with others)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        rendered = await _gather_or_cancel(
            [self._render_image(plan, i, dispatch, on_progress) for i in range(plan.num_images)]
        )
        rendered_at = loop.time()
        images = [self._image_out(plan, i, image, gate) for i, (image, gate) in enumerate(rendered)]
        audits = [self._audit(plan, image) for image, _ in rendered if image.png is not None]
        scored = [
            self._character_render(plan, i, image, gate)
            for i, (image, gate) in enumerate(rendered)
            if image.png is not None and plan.base.character is not None
        ]
        await self.audit.submit(audits, scored)
        self.metrics.images.labels(plan.preset).inc(len(audits))
        out = RenderOut(
            request_id=plan.request_id,
            preset=plan.preset,
            character=plan.base.character,
            character_version=plan.character_version,
            images=images,
            timings={"render_s": round(rendered_at - started, 4), "total_s": round(loop.time() - started, 4)},
        )
        return Rendered(out, [image.png for image, _ in rendered])

    async def _render_image(
        self, plan: Plan, index: int, dispatch: Dispatch, on_progress: RenderProgress | None
    ) -> tuple[RenderedImage, GateReport | None]:
        """Image ``index`` of ``plan``, through the consistency gate: (winning image, gate report)."""
        attempts: list[GateAttempt] = []
        best: tuple[float, RenderedImage] | None = None
        last: RenderedImage | None = None
        for attempt in range(plan.max_attempts):
            callback = None
            if on_progress is not None:

                def callback(done: int, total: int, a: int = attempt) -> None:
                    on_progress(index, a, done, total)

            call = plan.call(index, attempt, progress=callback is not None)
            image = await self.renderers.render(plan.preset, call, callback, dispatch)
            self.metrics.observe_batch(plan.preset, image.batch)
            last = image
            if plan.gate_min is None:
                return image, None
            if image.png is None:
                attempts.append(GateAttempt(seed=image.seed, problem=image.problem))
            else:
                score = image.similarity
                passed = score is not None and score >= plan.gate_min
                attempts.append(GateAttempt(seed=image.seed, similarity=score, passed=passed))
                rank = -1e9 if score is None else score
                if best is None or rank > best[0]:
                    best = (rank, image)
                if passed:
                    break
            if attempt + 1 < plan.max_attempts:
                self.metrics.gate_retries.labels(plan.preset).inc()
        assert last is not None and plan.gate_min is not None
        passed = any(a.passed for a in attempts)
        if not passed:
            self.metrics.gate_failures.labels(plan.preset).inc()
        winner = best[1] if best is not None else last
        report = GateReport(
            min_identity_similarity=plan.gate_min,
            backend=self.gate_family,
            passed=passed,
            winning_seed=best[1].seed if best is not None else None,
            attempts=attempts,
        )
        return winner, report

    @staticmethod
    def _image_out(plan: Plan, index: int, image: RenderedImage, gate: GateReport | None) -> ImageOut:
        metadata = dict(image.metadata)
        if image.provenance is not None:
            metadata["provenance"] = image.provenance
        return ImageOut(
            index=index,
            image_id=image.image_id,
            seed=image.seed,
            width=metadata.get("width"),
            height=metadata.get("height"),
            problem=image.problem,
            gate=gate,
            identity_similarity=image.similarity if gate is not None else None,
            watermark=(image.provenance or {}).get("watermark") or {},
            metadata=metadata,
        )

    @staticmethod
    def _audit(plan: Plan, image: RenderedImage) -> dict[str, Any]:
        metadata = image.metadata
        return {
            "image_id": image.image_id,
            "request_id": plan.request_id,
            "job_id": plan.job_id,
            "key_id": plan.key_id,
            "tenant": plan.caller.tenant,
            "preset": plan.preset,
            "character": metadata.get("character"),
            "character_version": plan.character_version,
            "method": metadata.get("method"),
            "prompt_sha256": provenance.prompt_sha256(plan.base.prompt, plan.base.negative_prompt or ""),
            "seed": image.seed,
            "watermark_tag": provenance.tag_for(image.image_id),
        }

    def _character_render(self, plan: Plan, index: int, image: RenderedImage, gate: GateReport | None) -> dict:
        """A character's recent render with its score (``character_renders``: what its page lists)."""
        metadata = image.metadata
        similarity = image.similarity if gate is not None else None
        return {
            "image_id": image.image_id,
            "tenant": plan.caller.tenant,
            "key_id": plan.key_id,
            "character": plan.base.character,
            "character_version": plan.character_version,
            "request_id": plan.request_id,
            "job_id": plan.job_id,
            "image_index": index,
            "preset": plan.preset,
            "method": metadata.get("method"),
            "prompt": plan.base.prompt,
            "identity_weight": plan.base.identity_weight,
            "seed": image.seed,
            "width": metadata.get("width"),
            "height": metadata.get("height"),
            "similarity": similarity,
            "threshold": plan.gate_min,
            "passed": None if gate is None else (similarity is not None and similarity >= (plan.gate_min or 0.0)),
            "backend": self.gate_family if gate is not None else None,
        }

    # -- jobs ------------------------------------------------------------------------------------
    async def run_job(self, job: Job, emit: Callable[[dict], None]) -> dict:
        """The job runner's executor: plan the stored body again, render, store the PNGs, return the result."""
        body = RenderBody.model_validate(job.request["body"])
        key = await self.db(self.store.get_key, job.key_id)
        if key is None or not key.active:
            raise ApiError(403, "key_revoked", "the API key that submitted this job was revoked; it did not run")
        plan = await self.plan(body, Caller.of(key), job.request["request_id"], job_id=job.id)
        done_images: set[int] = set()
        loop = asyncio.get_running_loop()
        last_emit = [0.0]

        def on_progress(index: int, attempt: int, done: int, total: int) -> None:
            now = loop.time()
            if done >= total:
                done_images.add(index)
            elif now - last_emit[0] < 0.1:
                return
            last_emit[0] = now
            emit(
                {
                    "image": index,
                    "attempt": attempt + 1,
                    "step": done,
                    "steps": total,
                    "images_done": len(done_images),
                    "images_total": plan.num_images,
                }
            )

        rendered = await self.execute(plan, JOB, on_progress)
        await self.audit.flush()  # a job is done when its audit rows are: readers of its result find them
        result = rendered.out.model_dump(mode="json")
        for image, png in zip(result["images"], rendered.pngs, strict=True):
            if png is not None:
                image["digest"] = await self.db(self.store.results.put, png)
                image["url"] = f"/v1/jobs/{job.id}/images/{image['index']}"
        return result

    def job_out(self, job: Job, include_images: bool = False) -> JobOut:
        """A stored job as the API shows it (blocking: reads image blobs when ``include_images``).

        A render job's result is a ``RenderOut``; a design job's (a step of ``/v1/designs``) a
        ``DesignJobResult`` that links to its design.
        """
        result: RenderOut | DesignJobResult | None = None
        links = {"self": f"/v1/jobs/{job.id}", "events": f"/v1/jobs/{job.id}/events"}
        if job.kind == "design":
            links["design"] = f"/v1/designs/{job.request['design_id']}"
            if job.result is not None:
                result = DesignJobResult.model_validate(job.result)
        elif job.result is not None:
            data = json.loads(json.dumps(job.result))
            for image in data.get("images", []):
                digest = image.pop("digest", None)
                if include_images and digest:
                    image["png_base64"] = base64.b64encode(self.store.results.get(digest)).decode()
            result = RenderOut.model_validate(data)
        return JobOut(
            job_id=job.id,
            kind=job.kind,
            status=job.status,
            preset=job.preset,
            attempts=job.attempts,
            progress=job.progress or {},
            created_at=iso(job.created_at) or "",
            started_at=iso(job.started_at),
            finished_at=iso(job.finished_at),
            error={"code": job.error_code, "message": job.error_message, "field": None} if job.error_code else None,
            result=result,
            links=links,
        )

    async def submit_job(self, body: RenderBody, caller: Caller, request_id: str, key_cap: int | None = None) -> Job:
        """Plan a job and store it ``queued``; the runner picks it up.

        429 when the caller's key has ``key_cap`` jobs queued or running (``too_many_jobs``) or all
        keys together ``max_queued_jobs`` (``job_queue_full``): counted in the job's insert, one
        step for every replica (``ServeStore.create_job``), so concurrent submissions never pass a cap.
        """
        cfg = self.config()
        plan = await self.plan(body, caller, request_id, job_id=uuid.uuid4().hex)
        assert plan.job_id is not None
        stored = {"body": plan.body.model_dump(mode="json"), "request_id": plan.request_id}
        try:
            return await self.db(
                lambda: self.store.create_job(
                    plan.job_id,
                    plan.key_id,
                    plan.preset,
                    stored,
                    plan.num_images,
                    tenant=caller.tenant,
                    character=plan.base.character,
                    key_cap=key_cap,
                    total_cap=cfg.max_queued_jobs,
                )
            )
        except JobCapReached as refused:
            raise counted_job_cap_error(refused, cfg.retry_after_s, self.metrics) from None


def iso(value: Any) -> str | None:
    """A timestamp as the API shows it (ISO 8601), None as None."""
    return value.isoformat() if value is not None else None


async def _gather_or_cancel(coroutines: list) -> list:
    """``asyncio.gather`` that cancels the others when one fails (no orphan renders).

    One coroutine (a one-image request, the common case) is awaited in the caller's task: a task of its own and a
    gather would add two event-loop turns between the renderer's answer and the response.
    """
    if len(coroutines) == 1:
        return [await coroutines[0]]
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class SyncRenders:
    """The synchronous-render policy of one ingress replica: bounded in-flight count and a time limit."""

    def __init__(self, service: RenderService):
        self.service = service
        self.inflight = 0

    async def render(self, body: RenderBody, caller: Caller, request_id: str) -> Rendered:
        service, cfg = self.service, self.service.config()
        plan = await service.plan(body, caller, request_id)
        if self.inflight >= cfg.max_inflight_renders:
            service.metrics.rejected.labels("ingress_busy").inc()
            raise too_busy(
                "overloaded",
                f"{self.inflight} renders in progress on this replica (limit {cfg.max_inflight_renders}); retry later",
                cfg.retry_after_s,
            )
        self.inflight += 1
        try:
            # in this task (``asyncio.wait_for`` would run the render in a task of its own: a loop turn more)
            async with asyncio.timeout(cfg.sync_timeout_s):
                return await service.execute(plan, SYNC)
        except TimeoutError:
            raise ApiError(504, "timeout", f"the render took longer than {cfg.sync_timeout_s:.0f}s") from None
        except RendererDied as exc:
            raise too_busy("renderer_unavailable", str(exc), cfg.retry_after_s, 503) from None
        finally:
            self.inflight -= 1
