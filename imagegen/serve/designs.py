"""The design flow for the HTTP service: ``DesignFlow`` steps as tenant-owned jobs on the renderer replicas.

No web framework here (``http/designs.py`` parses and maps). Every step the library plans as
``PlannedRender``s becomes **one job** in the service's durable job table (``kind: design``): the
job runner hands it to ``run_job``, which sends every render to the preset's renderer deployment
at once (they batch there with each other), streams step progress into the job's events (what
``GET /v1/designs/{id}/events`` serves), stores the images in the design and audits them like any
served image. Face checks and the reference report run on a small CPU pool of their own.

Ownership: a design belongs to the tenant of the key that started it; a key of another tenant gets
the same 404 as for a design that never existed. Jobs of a design are stored with the design's
draft key as their character, so deleting a design removes its jobs (rows, events) with the same
purge a deleted character gets, then its rows and folder (every image, the draft identity).
Designs expire after ``design_ttl_s``; an expired one is deleted when it is next asked for, and by
a periodic sweep otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from imagegen import provenance
from imagegen.errors import ImagegenError
from imagegen.identity.design.flow import DesignFlow, PlannedRender, Rendered
from imagegen.identity.design.grid import Slot
from imagegen.identity.design.store import Design, DesignExpiredError, DesignStore, UnknownDesignError
from imagegen.identity.registry import Registry
from imagegen.pipelines.types import RenderRequest
from imagegen.serve.actors import RenderCall, RenderedImage
from imagegen.serve.config import IngressConfig
from imagegen.serve.errors import ApiError, status_for
from imagegen.serve.limits import counted_job_cap_error
from imagegen.serve.metrics import Metrics
from imagegen.serve.service import JOB, Renderers
from imagegen.serve.store import Job, JobCapReached, ServeStore
from imagegen.serve.tenancy import Caller
from imagegen.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: status of the design flow's own error codes (the rest: ``errors.status_for``)
STATUS = {"synthetic_not_allowed": 422, "design_busy": 409, "design_not_ready": 409, "not_found": 404}


def api_error(exc: ImagegenError) -> ApiError:
    return ApiError(STATUS.get(exc.code) or status_for(exc.code), exc.code, str(exc), exc.field)


def not_found(design_id: str) -> ApiError:
    """The one answer for a design that is missing, expired or another tenant's."""
    return ApiError(404, "not_found", f"no design {design_id[:40]!r}; GET /v1/designs lists this key's", "design_id")


class DesignService:
    """Designs for one ingress replica: create, read, steps as jobs, delete, expire."""

    def __init__(
        self,
        registry: Registry,
        store: ServeStore,
        renderers: Renderers,
        presets: list[str],
        metrics: Metrics,
        config: Callable[[], IngressConfig],
        wake_jobs: Callable[[], None],
        cancel_local: Callable[[str], None],
        settings: Settings | None = None,
    ):
        self.settings = settings or get_settings()
        self.store = store
        self.designs = DesignStore.open(self.settings)
        self.flow = DesignFlow(self.designs, registry, self.settings)
        self.renderers = renderers
        self.presets = list(presets)
        self.metrics = metrics
        self.config = config
        self.wake_jobs = wake_jobs
        self.cancel_local = cancel_local
        #: face checks, reports and registration: CPU-heavy, so a pool of their own
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="design")
        self._sweeper: asyncio.Task | None = None

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking library call off the event loop; its ``ImagegenError`` becomes the API's error."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, lambda: fn(*args, **kwargs))
        except ImagegenError as exc:
            raise api_error(exc) from None

    # -- reading ---------------------------------------------------------------------------------
    async def get(self, caller: Caller, design_id: str) -> Design:
        """The caller's design; 404 ``not_found`` when missing, expired (deleted now) or another tenant's."""
        try:
            design = await asyncio.get_running_loop().run_in_executor(self.pool, self.designs.get, design_id)
        except DesignExpiredError:
            await self.delete_everything(design_id)
            raise not_found(design_id) from None
        except UnknownDesignError:
            raise not_found(design_id) from None
        if not caller.sees(design.tenant):
            raise not_found(design_id)
        return design

    async def all(self, caller: Caller) -> list[Design]:
        return await self.run(self.designs.list, caller.tenant_filter)

    async def image(self, caller: Caller, design_id: str, image_id: str) -> bytes:
        design = await self.get(caller, design_id)
        return await self.run(self.designs.image_bytes, design, image_id)

    # -- steps -----------------------------------------------------------------------------------
    async def create(self, caller: Caller, body: dict[str, Any], request_id: str, key_cap: int | None = None) -> Design:
        cfg = self.config()
        preset = body.get("preset") or self.presets[0]
        if preset not in self.presets:
            raise ApiError(
                404,
                "unknown_preset",
                f"preset {preset!r} is not served here; served: {', '.join(self.presets)}",
                "preset",
            )
        candidates = body.get("candidates", 8)
        if isinstance(candidates, int) and not isinstance(candidates, bool) and candidates > cfg.max_design_candidates:
            raise ApiError(422, "invalid_request", f"candidates must be 1 to {cfg.max_design_candidates}", "candidates")
        await self._check_queue()
        design, plans = await self.run(
            self.flow.start,
            character_id=body["character_id"],
            name=body["name"],
            card=body.get("card") or {},
            preset=preset,
            candidates=candidates,
            seed=body.get("seed"),
            tenant=caller.tenant,
            key_id=caller.key_id,
            ttl_s=cfg.design_ttl_s,
        )
        # refused at a job cap: the new design is deleted again
        return await self._submit(
            design, "describe", plans, caller, request_id, key_cap, undo=lambda: self.designs.delete(design.id)
        )

    async def pick(self, caller: Caller, design_id: str, indices: Any = None, upload: tuple | None = None) -> Design:
        design = await self.get(caller, design_id)
        if upload is not None:
            filename, data, provenance_data = upload
            return await self.run(
                self.flow.pick_upload, design, filename, data, provenance_data, creator=f"api key {caller.key_id}"
            )
        return await self.run(self.flow.pick_candidates, design, indices)

    async def turnaround(
        self,
        caller: Caller,
        design_id: str,
        grid: Any,
        method: str | None,
        request_id: str,
        key_cap: int | None = None,
    ) -> Design:
        design = await self.get(caller, design_id)
        await self._check_queue()
        planned, plans = await self.run(self.flow.turnaround, design, grid, method)

        def undo() -> None:  # refused at a job cap: the design as it was
            self.designs.update(
                design.id,
                stage=design.stage,
                status=design.status,
                method=design.method,
                grid=design.grid,
                error=design.error,
            )

        return await self._submit(planned, "turnaround", plans, caller, request_id, key_cap, undo=undo)

    async def curate(
        self, caller: Caller, design_id: str, body: dict[str, Any], request_id: str, key_cap: int | None = None
    ) -> tuple[Design, bool]:
        """Apply keep / drop and start re-rolls; (design, whether a re-roll job is rendering)."""
        design = await self.get(caller, design_id)
        if body.get("reroll"):
            await self._check_queue()
        updated, plans = await self.run(
            self.flow.curate,
            design,
            drop=body.get("drop", []),
            keep=body.get("keep", []),
            reroll=body.get("reroll", []),
        )
        if not plans:
            return updated, False

        def undo() -> None:  # refused at a job cap: the slots kept as they were, the design as it was
            self.designs.set_image_fields(design.id, {s.id: {"kept": s.kept} for s in design.of_kind("slot")})
            self.designs.update(design.id, status=design.status, error=design.error)

        return await self._submit(updated, "reroll", plans, caller, request_id, key_cap, undo=undo), True

    async def register(self, caller: Caller, design_id: str, provenance_data: Any) -> Any:
        design = await self.get(caller, design_id)
        # without a "who", the registering key is named as the creator
        return await self.run(self.flow.register, design, provenance_data, creator=f"api key {caller.key_id}")

    async def delete(self, caller: Caller, design_id: str) -> dict[str, Any]:
        design = await self.get(caller, design_id)
        return await self.delete_everything(design.id, design)

    async def delete_everything(self, design_id: str, design: Design | None = None) -> dict[str, Any]:
        """The design's rows and folder, then its jobs (a running one is cancelled first): every byte."""
        loop = asyncio.get_running_loop()
        if design is None:
            with contextlib.suppress(UnknownDesignError):
                design = await loop.run_in_executor(self.pool, lambda: self.designs.get(design_id, expired_too=True))
        try:
            gone = await loop.run_in_executor(self.pool, self.designs.delete, design_id)
        except UnknownDesignError:
            raise not_found(design_id) from None
        purged: dict[str, int] = {}
        if design is not None:
            if design.job_id:
                await loop.run_in_executor(self.pool, self.store.cancel_job, design.job_id)
                self.cancel_local(design.job_id)
            purged = await loop.run_in_executor(self.pool, self.store.purge_character, design.draft_key)
        return {
            "design_id": design_id,
            "images": gone.images,
            "files": gone.files,
            "bytes_removed": gone.bytes_removed,
            "jobs": purged.get("jobs", 0),
        }

    # -- jobs ------------------------------------------------------------------------------------
    async def _check_queue(self) -> None:
        """429 ``job_queue_full`` early, before a step changes the design; ``_submit`` checks again, atomically."""
        cfg = self.config()
        active = await asyncio.get_running_loop().run_in_executor(self.pool, self.store.count_active_jobs)
        if active >= cfg.max_queued_jobs:
            refused = JobCapReached("total", active, cfg.max_queued_jobs)
            raise counted_job_cap_error(refused, cfg.retry_after_s, self.metrics)

    async def _submit(
        self,
        design: Design,
        op: str,
        plans: list[PlannedRender],
        caller: Caller,
        request_id: str,
        key_cap: int | None,
        *,
        undo: Callable[[], Any],
    ) -> Design:
        """Store one job rendering ``plans`` for ``design`` and point the design at it.

        The key's ``key_cap`` and ``max_queued_jobs`` are checked in the job's insert, atomically
        (``ServeStore.create_job``); refused at one, ``undo`` puts the design back as it was
        before the step and the answer is the cap's 429.
        """
        job_id = uuid.uuid4().hex
        request = {
            "kind": "design",
            "design_id": design.id,
            "op": op,
            "request_id": request_id,
            "plans": [plan_json(p) for p in plans],
        }
        cfg = self.config()

        def store() -> Design:
            try:
                self.store.create_job(
                    job_id,
                    caller.key_id,
                    design.preset,
                    request,
                    len(plans),
                    tenant=design.tenant,
                    character=design.draft_key,
                    key_cap=key_cap,
                    total_cap=cfg.max_queued_jobs,
                )
            except JobCapReached:
                undo()
                raise
            return self.designs.update(design.id, job_id=job_id, status="rendering", error=None)

        try:
            updated = await self.run(store)
        except JobCapReached as refused:
            raise counted_job_cap_error(refused, cfg.retry_after_s, self.metrics) from None
        self.wake_jobs()
        return updated

    async def run_job(self, job: Job, emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """The job runner's executor for design jobs: render every plan (batched), record, report."""
        request = job.request
        design_id, op = request["design_id"], request["op"]
        loop = asyncio.get_running_loop()
        key = await loop.run_in_executor(self.pool, self.store.get_key, job.key_id)
        if key is None or not key.active:
            await self._fail(design_id, "the API key that started this step was revoked")
            raise ApiError(403, "key_revoked", "the API key that submitted this job was revoked; it did not run")
        try:
            design = await loop.run_in_executor(self.pool, self.designs.get, design_id)
        except UnknownDesignError:
            raise ApiError(404, "not_found", "the design of this job is gone") from None
        plans = [plan_from_json(p) for p in request["plans"]]
        try:
            outcomes = await self._render(job, design, plans, emit)
            record = {"describe": self.flow.record_candidates, "turnaround": self.flow.record_slots}.get(
                op, self.flow.record_rerolls
            )
            done = await self.run(record, design, plans, outcomes)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await self._fail(design_id, getattr(exc, "message", None) or str(exc) or type(exc).__name__)
            raise
        images = sum(1 for o in outcomes if o.png is not None)
        return {
            "design_id": design_id,
            "op": op,
            "stage": done.stage,
            "status": done.status,
            "rendered": images,
            "images": [],
        }

    async def _fail(self, design_id: str, why: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(
                self.pool, lambda: self.designs.update(design_id, status="failed", error=why[:2000])
            )

    async def _render(
        self, job: Job, design: Design, plans: list[PlannedRender], emit: Callable[[dict[str, Any]], None]
    ) -> list[Rendered]:
        loop = asyncio.get_running_loop()
        done_images: set[int] = set()
        last = [0.0]

        def progress(index: int, step: int, steps: int) -> None:
            now = loop.time()
            if step >= steps:
                done_images.add(index)
            elif now - last[0] < 0.1:
                return
            last[0] = now
            emit(
                {
                    "design_id": design.id,
                    "image": index,
                    "step": step,
                    "steps": steps,
                    "images_done": len(done_images),
                    "images_total": len(plans),
                }
            )

        async def one(i: int, plan: PlannedRender) -> RenderedImage:
            call = RenderCall(
                request=plan.request,
                request_id=job.request.get("request_id", job.id),
                extra={
                    "preset": design.preset,
                    "job_id": job.id,
                    "design_id": design.id,
                    "age_policy": self.settings.age_policy,
                },
                progress=True,
            )
            image = await self.renderers.render(design.preset, call, lambda d, t: progress(i, d, t), JOB)
            self.metrics.observe_batch(design.preset, image.batch)
            return image

        tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(plans)]
        try:
            rendered = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        audits = [
            {
                "image_id": image.image_id,
                "request_id": job.request.get("request_id", job.id),
                "job_id": job.id,
                "key_id": job.key_id,
                "tenant": design.tenant,
                "preset": design.preset,
                "character": design.draft_key,
                "character_version": None,
                "method": image.metadata.get("method"),
                "prompt_sha256": provenance.prompt_sha256(plan.request.prompt, plan.request.negative_prompt or ""),
                "seed": image.seed,
                "watermark_tag": provenance.tag_for(image.image_id),
            }
            for plan, image in zip(plans, rendered, strict=True)
            if image.png is not None
        ]
        await loop.run_in_executor(self.pool, self.store.add_audit, audits)
        self.metrics.images.labels(design.preset).inc(len(audits))
        return [Rendered(r.png, r.image_id, r.metadata, r.problem) for r in rendered]

    # -- expiry ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the periodic sweep of expired designs (on the replica's event loop)."""
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - the loop must survive a database hiccup
                log.exception("sweeping expired designs failed")
            await asyncio.sleep(self.config().design_sweep_s)

    async def sweep(self) -> int:
        """Delete every expired design with everything it made; returns how many."""
        ids = await asyncio.get_running_loop().run_in_executor(self.pool, self.designs.expired_ids)
        gone = 0
        for design_id in ids:
            with contextlib.suppress(ApiError):
                await self.delete_everything(design_id)
                gone += 1
        if gone:
            log.info("deleted %d expired designs", gone)
        return gone

    def shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()


def plan_json(plan: PlannedRender) -> dict[str, Any]:
    return {
        "kind": plan.kind,
        "index": plan.index,
        "request": plan.request.model_dump(mode="json"),
        "parents": list(plan.parents),
        "slot": plan.slot.to_dict() if plan.slot else None,
    }


def plan_from_json(data: dict[str, Any]) -> PlannedRender:
    return PlannedRender(
        kind=data["kind"],
        index=int(data["index"]),
        request=RenderRequest.model_validate(data["request"]),
        parents=tuple(data.get("parents") or ()),
        slot=Slot(**data["slot"]) if data.get("slot") else None,
    )
