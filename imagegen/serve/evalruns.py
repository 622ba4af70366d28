"""Evaluation runs through the API: a tenant's suite, rendered on the service's renderers, scored, reported.

``imagegen eval run`` renders a suite's grid through a Ray actor pool of its own; a run submitted
with ``POST /v1/eval/runs`` renders the same grid (``eval.suite.expand``: the same cells, the same
typed ``RenderCall``) on the renderer deployments that serve traffic — so it measures the models,
methods and profiles *as deployed* — and is scored and written by the same code
(``eval.run.score_suite_run``): the same ``metrics.json``, ``junit.xml`` and self-contained
``report.html``.

What an API suite may name is narrower than a suite file's, because a tenant writes it:

- characters are the tenant's own registered characters (another tenant's is "unknown", as
  everywhere; bundled ``sample`` photos are for the CLI), renderable under the service's policy
  when a method uses identity;
- presets are the ones this service serves; ``workers``, ``gpus_per_worker``, ``batch_size`` and
  ``profile`` are the deployment's business and are refused; ``baseline`` is the ``run_id`` of an
  earlier finished run of the tenant (never a path), compared the way ``imagegen eval compare``
  does; the grid is at most ``MAX_CELLS`` renders and ``bootstrap.samples`` at most
  ``MAX_BOOTSTRAP``; a tenant has at most ``MAX_ACTIVE_PER_TENANT`` runs queued or running.

The run executes in the ingress replica that accepted it (renders at most ``RENDER_CONCURRENCY``
at a time, so they batch on the renderers beside online traffic without crowding it out; scoring
in a thread of its own). Its working directory is temporary: once written, the report, metrics and
JUnit files go to the service's results store (any replica serves them) and the directory is
deleted. Every render is audited like a served image (tenant, key, watermark tag), so
``imagegen provenance check`` knows it. A replica that dies mid-run stops sending heartbeats and
its run is failed (``runner_died``) at the next read; deleting a run (or a character it renders)
stops it and deletes every file it stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from imagegen import provenance
from imagegen.errors import ImagegenError
from imagegen.eval.render import RenderOutcome
from imagegen.eval.suite import Cell, Suite, expand
from imagegen.files import atomic_write
from imagegen.identity.provider import refusal
from imagegen.identity.registry import Registry
from imagegen.pipelines.types import RenderRequest
from imagegen.serve.actors import RenderCall
from imagegen.serve.errors import ApiError, too_busy
from imagegen.serve.jobs import RendererDied
from imagegen.serve.service import JOB, Renderers
from imagegen.serve.store import ACTIVE, EvalRun, ServeStore
from imagegen.serve.tenancy import Caller, character_for
from imagegen.settings import Settings

log = logging.getLogger(__name__)

#: renders in one API run
MAX_CELLS = 256
#: bootstrap resamples (the confidence intervals are CPU work in the ingress replica)
MAX_BOOTSTRAP = 2000
#: runs of one tenant queued or running at once
MAX_ACTIVE_PER_TENANT = 2
#: renders of one run in flight at once
RENDER_CONCURRENCY = 8
#: a running run records a heartbeat this often; one silent for STALE_AFTER_S is failed
HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0
#: suite fields that belong to the deployment, not to a tenant's suite
NOT_FOR_THE_SERVICE = {
    "workers": "the service's renderer replicas render API runs",
    "gpus_per_worker": "the service's renderer replicas render API runs",
    "batch_size": "the service's renderers batch API runs with other requests",
    "profile": "API runs render with the renderers' profiles as deployed",
}
#: the run directory's files the service keeps (the renders are in report.html as thumbnails); the last
#: two are what a later run compares with when it names this one as its baseline
KEPT_FILES = ("report.html", "metrics.json", "junit.xml", "scores.json", "run.json")
BASELINE_FILES = ("metrics.json", "scores.json", "run.json")
RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def invalid(message: str, field: str | None = "suite") -> ApiError:
    return ApiError(422, "invalid_suite", message, field)


def validate_suite(data: Any) -> Suite:
    """A tenant's suite (a parsed JSON / YAML mapping) as a ``Suite``; 422 ``invalid_suite`` naming the field."""
    if not isinstance(data, dict):
        raise invalid("a suite is a mapping: name, presets, methods, characters, prompts, seeds ...")
    for name, why in NOT_FOR_THE_SERVICE.items():
        if name in data:
            raise invalid(f"{name} does not apply to a run through the API: {why}", name)
    try:
        suite = Suite.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        raise invalid(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")), loc or "suite") from None
    except ImagegenError as exc:  # an unknown face backend in thresholds
        raise invalid(str(exc), exc.field or "thresholds") from None
    for spec in suite.characters:
        if spec.sample is not None or spec.register_sample:
            raise invalid(
                f"character {spec.id!r}: an API suite renders the tenant's registered characters, not bundled "
                "samples (register one with POST /v1/characters)",
                "characters",
            )
    if suite.baseline is not None and not RUN_ID_RE.fullmatch(suite.baseline):
        raise invalid("baseline is the run_id of an earlier run of this tenant (GET /v1/eval/runs)", "baseline")
    if suite.bootstrap.samples > MAX_BOOTSTRAP:
        raise invalid(f"bootstrap.samples is at most {MAX_BOOTSTRAP} for a run through the API", "bootstrap.samples")
    return suite


def run_summary(metrics: dict[str, Any], result: Any) -> dict[str, Any]:
    """What ``GET /v1/eval/runs/{id}`` shows of a finished run: verdict, reasons and headline metrics.

    Taken from the run's ``metrics.json`` as written (plain JSON: no NaN, no numpy types).
    """
    outcome = result.outcome
    comparison = metrics.get("comparison")
    shown = ("baseline", "summary", "failed", "regressions", "gated_regressions")
    return {
        **{
            k: metrics.get(k) for k in ("verdict", "summary", "reasons", "gated", "thresholds", "overall", "characters")
        },
        "comparison": None if comparison is None else {k: comparison.get(k) for k in shown},
        "rendered": len(outcome.rendered) if outcome else 0,
        "unusable": len(outcome.problems) if outcome else 0,
        "skipped": len(result.skipped),
    }


class EvalRunService:
    """Submits, runs, lists and deletes a tenant's evaluation runs (one per ingress replica)."""

    def __init__(
        self,
        registry: Registry,
        store: ServeStore,
        renderers: Renderers,
        presets: list[str],
        db: Callable[..., Any],
        settings: Settings,
        gate_backend: str,
    ):
        self.registry = registry
        self.store = store
        self.renderers = renderers
        self.presets = list(presets)
        self.db = db
        self.settings = settings
        self.gate_backend = gate_backend
        #: this replica, as the owner of the runs it executes
        self.owner = f"ingress-{uuid.uuid4().hex[:12]}"
        #: scoring and writing a run: CPU work, one run at a time per replica
        self.cpu_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval")
        self.tasks: dict[str, asyncio.Task] = {}
        self._last_stale_check = 0.0

    # -- submit ----------------------------------------------------------------------------------
    async def submit(self, caller: Caller, data: Any) -> EvalRun:
        """Validate a tenant's suite, store the run ``queued`` and start it (202); 4xx for what cannot run."""
        suite = validate_suite(data)
        unknown = [p for p in suite.presets if p not in self.presets]
        if unknown:
            raise ApiError(
                404,
                "unknown_preset",
                f"preset {unknown[0]!r} is not served here; served: {', '.join(self.presets)}",
                "presets",
            )
        if suite.backend is None:
            suite = suite.model_copy(update={"backend": self.gate_backend})
        uses_identity = any(m.uses_identity for m in suite.methods)
        names: dict[str, str] = {}
        for spec in suite.characters:
            character = await self.db(character_for, self.registry, spec.id, caller)
            refused = refusal(character, allow_draft=False, allow_unverified_age=self.settings.allow_unverified_age)
            if uses_identity and refused is not None:
                raise ApiError(409, refused.code, refused.message, "characters")
            names[spec.id] = spec.name or character.name
        cells = self._cells(suite, names)
        if suite.baseline is not None:
            baseline = await self.get(caller, suite.baseline)
            if baseline.status != "done" or any(name not in baseline.files for name in BASELINE_FILES):
                raise ApiError(
                    409,
                    "baseline_not_usable",
                    f"evaluation run {baseline.id} is {baseline.status}, not a finished run to compare with",
                    "baseline",
                )
        active = [r for r in await self.db(self.store.list_eval_runs, caller.tenant, 100) if r.status in ACTIVE]
        if len(active) >= MAX_ACTIVE_PER_TENANT:
            raise too_busy(
                "too_many_eval_runs",
                f"{len(active)} evaluation runs of this tenant are queued or running (at most "
                f"{MAX_ACTIVE_PER_TENANT}); wait for one to end",
                30,
            )
        run_id = uuid.uuid4().hex
        spec = suite.model_dump(mode="json", by_alias=True)
        run = await self.db(
            lambda: self.store.create_eval_run(
                run_id,
                tenant=caller.tenant,
                key_id=caller.key_id,
                suite=suite.name,
                characters=[c.id for c in suite.characters],
                spec=spec,
            )
        )
        task = asyncio.get_running_loop().create_task(self._run(run, suite, cells, caller))
        self.tasks[run_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(run_id, None))
        return run

    def _cells(self, suite: Suite, names: dict[str, str]) -> list[Cell]:
        """The grid, each distinct request checked against its preset's limits (422 naming the field)."""
        from imagegen.pipelines.presets import get_preset

        cells = expand(suite, names, {})
        if len(cells) > MAX_CELLS:
            raise invalid(
                f"the grid is {len(cells)} renders; a run through the API renders at most {MAX_CELLS} "
                "(fewer presets, methods, weights, characters, prompts or seeds)"
            )
        seen: set[tuple[Any, ...]] = set()
        for cell in cells:
            shape = (cell.preset, *(cell.request.get(k) for k in ("width", "height", "steps", "guidance")))
            if shape in seen:
                continue
            seen.add(shape)
            try:
                preset = get_preset(cell.preset)
                RenderRequest(**cell.request).resolved(preset).check_against(preset)
            except ImagegenError as exc:
                raise invalid(f"preset {cell.preset}: {exc}", exc.field or "suite") from None
            except ValidationError as exc:
                err = exc.errors(include_url=False)[0]
                field = ".".join(str(p) for p in err.get("loc", ())) or "suite"
                raise invalid(f"preset {cell.preset}: {field}: {err.get('msg')}", field) from None
        return cells

    # -- run -------------------------------------------------------------------------------------
    async def _run(self, run: EvalRun, suite: Suite, cells: list[Cell], caller: Caller) -> None:
        """Render the grid on the service's renderers, score it, keep the report; the run's whole life."""
        work = Path(tempfile.mkdtemp(prefix="imagegen-eval-"))
        stop = asyncio.Event()
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(run.id, stop))
        started = time.perf_counter()
        files: dict[str, str] = {}
        try:
            if not await self._progress(run.id, {"phase": "render", "done": 0, "total": len(cells)}):
                return
            outcome, audits = await self._render(run.id, suite, cells, caller, work)
            await self.db(self.store.add_audit, audits)
            if not await self._progress(run.id, {"phase": "score", "done": 0, "total": len(cells)}):
                return
            baseline = await self._baseline(suite, caller, work) if suite.baseline else None
            seconds = time.perf_counter() - started
            result = await asyncio.get_running_loop().run_in_executor(
                self.cpu_pool, self._score, suite, cells, outcome, work, seconds, baseline, run.id
            )
            for name in KEPT_FILES:
                files[name] = await self.db(self.store.results.put, (work / name).read_bytes())
            summary = run_summary(json.loads((work / "metrics.json").read_text()), result)
            finished = await self.db(
                lambda: self.store.finish_eval_run(run.id, self.owner, summary=summary, files=files)
            )
            if not finished:  # deleted (or failed as stale) meanwhile: keep nothing
                await self.db(self.store.discard_result, {"images": [{"digest": d} for d in files.values()]})
        except asyncio.CancelledError:  # deleted: keep nothing
            if files:
                await self.db(self.store.discard_result, {"images": [{"digest": d} for d in files.values()]})
            raise
        except Exception as exc:  # noqa: BLE001 - every failure ends the run with a reason
            code, message = _failure(exc)
            if code == "internal_error":
                log.exception("evaluation run %s failed", run.id)
            await self.db(lambda: self.store.finish_eval_run(run.id, self.owner, error=(code, message)))
        finally:
            stop.set()
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            shutil.rmtree(work, ignore_errors=True)

    async def _render(
        self, run_id: str, suite: Suite, cells: list[Cell], caller: Caller, work: Path
    ) -> tuple[RenderOutcome, list[dict[str, Any]]]:
        """Every cell through the renderer deployments (``RENDER_CONCURRENCY`` at a time); PNGs under ``work``."""
        outcome = RenderOutcome()
        audits: list[dict[str, Any]] = []
        gate = asyncio.Semaphore(RENDER_CONCURRENCY)
        versions = {c.id: (await self.db(character_for, self.registry, c.id, caller)).version for c in suite.characters}
        done = 0
        last = 0.0

        async def one(cell: Cell) -> None:
            nonlocal done, last
            async with gate:
                call = RenderCall(
                    request=RenderRequest(**cell.request),
                    request_id=f"eval-{run_id}-{cell.key[:24]}",
                    character_version=versions[cell.character] if "character" in cell.request else None,
                    extra={"preset": cell.preset, "eval_run": run_id, "age_policy": self.settings.age_policy},
                    metadata={"eval": {"suite": suite.name, "run": run_id, "key": cell.key, "tags": cell.tags}},
                )
                try:
                    image = await self.renderers.render(cell.preset, call, None, JOB)
                except ApiError as exc:
                    if suite.on_unsupported != "skip" or exc.status >= 500:
                        raise
                    outcome.skipped[cell.key] = f"{cell.preset} cannot render it: {exc.message}"
                else:
                    if image.png is None:
                        outcome.problems[cell.key] = image.problem or "unusable"
                    else:
                        png = image.png
                        await self.db(atomic_write, work / cell.file, lambda tmp: Path(tmp).write_bytes(png))
                        outcome.rendered.append(cell)
                        audits.append(self._audit(call, cell, image, caller))
            done += 1
            now = time.monotonic()
            if now - last > 1.0 or done == len(cells):
                last = now
                if not await self._progress(run_id, {"phase": "render", "done": done, "total": len(cells)}):
                    raise asyncio.CancelledError  # the run was deleted

        tasks = [asyncio.ensure_future(one(cell)) for cell in cells]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return outcome, audits

    @staticmethod
    def _audit(call: RenderCall, cell: Cell, image: Any, caller: Caller) -> dict[str, Any]:
        request = call.request
        return {
            "image_id": image.image_id,
            "request_id": call.request_id,
            "job_id": None,
            "key_id": caller.key_id,
            "tenant": caller.tenant,
            "preset": cell.preset,
            "character": request.character,
            "character_version": call.character_version,
            "method": image.metadata.get("method"),
            "prompt_sha256": provenance.prompt_sha256(request.prompt, request.negative_prompt or ""),
            "seed": image.seed,
            "watermark_tag": provenance.tag_for(image.image_id),
        }

    async def _baseline(self, suite: Suite, caller: Caller, work: Path) -> Path:
        """The baseline run's files in a directory of their own, as ``eval compare`` reads a run."""
        assert suite.baseline is not None
        baseline = await self.get(caller, suite.baseline)  # it may have been deleted since: 404 ends this run
        where = work / "baseline"
        for name in BASELINE_FILES:
            if name not in baseline.files:
                raise ApiError(409, "baseline_not_usable", f"evaluation run {baseline.id} has no {name}", "baseline")
            data = await self.db(self.store.results.get, baseline.files[name])
            await self.db(atomic_write, where / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
        return where

    def _score(
        self,
        suite: Suite,
        cells: list[Cell],
        outcome: RenderOutcome,
        work: Path,
        seconds: float,
        baseline: Path | None,
        run_id: str,
    ) -> Any:
        """Score the grid, compare it with its baseline, write the run directory (blocking: the eval thread)."""
        from imagegen.eval.identities import identity_from_registry
        from imagegen.eval.run import score_suite_run
        from imagegen.eval.thresholds import resolve_thresholds
        from imagegen.faces import get_analyzer

        analyzer = get_analyzer(suite.backend)
        identities = {c.id: identity_from_registry(self.registry, c.id, analyzer) for c in suite.characters}
        return score_suite_run(
            suite,
            cells,
            outcome,
            work,
            identities=identities,
            analyzer=analyzer,
            thresholds=resolve_thresholds(analyzer.name, suite.thresholds),
            profiles={preset: "as deployed" for preset in suite.presets},
            rendered_seconds=seconds,
            baseline=baseline,
            images_shown="rendered by the service (thumbnails below)",
            labels=(f"run {suite.baseline}", f"run {run_id}"),
        )

    async def _progress(self, run_id: str, progress: dict[str, Any]) -> bool:
        return await self.db(self.store.eval_run_progress, run_id, self.owner, progress)

    async def _heartbeat(self, run_id: str, stop: asyncio.Event) -> None:
        """Keep the run alive while it scores; cancel it when it was deleted meanwhile."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=HEARTBEAT_S)
            if stop.is_set():
                return
            if not await self._progress(run_id, {}):
                task = self.tasks.get(run_id)
                if task is not None:
                    task.cancel()
                return

    # -- read and delete -------------------------------------------------------------------------
    async def _fail_stale(self) -> None:
        now = time.monotonic()
        if now - self._last_stale_check > 10:
            self._last_stale_check = now
            await self.db(self.store.fail_stale_eval_runs, STALE_AFTER_S)

    async def all(self, caller: Caller, limit: int) -> list[EvalRun]:
        await self._fail_stale()
        return await self.db(self.store.list_eval_runs, caller.tenant_filter, limit)

    async def get(self, caller: Caller, run_id: str) -> EvalRun:
        """The run, if the caller's tenant owns it (admin: any); 404 ``not_found`` otherwise, existing or not."""
        await self._fail_stale()
        run = await self.db(self.store.get_eval_run, run_id)
        if run is None or not caller.sees(run.tenant):
            raise ApiError(404, "not_found", f"no evaluation run {run_id!r} for this key", "run_id")
        return run

    async def file(self, caller: Caller, run_id: str, name: str) -> bytes:
        """One kept file of a finished run (``report.html``, ``metrics.json``, ``junit.xml``)."""
        run = await self.get(caller, run_id)
        digest = run.files.get(name)
        if digest is None:
            state = "failed" if run.status == "failed" else f"is {run.status}"
            raise ApiError(
                409 if run.status in ACTIVE else 404,
                "run_not_finished" if run.status in ACTIVE else "not_found",
                f"evaluation run {run_id} {state}: it has no {name}",
                "run_id",
            )
        return await self.db(self.store.results.get, digest)

    async def delete(self, caller: Caller, run_id: str) -> None:
        """Delete the run (stopping it if it runs here; elsewhere its heartbeat sees it gone) and its files."""
        await self.get(caller, run_id)
        task = self.tasks.get(run_id)
        if task is not None:
            task.cancel()
        await self.db(self.store.delete_eval_run, run_id)


def _failure(exc: Exception) -> tuple[str, str]:
    """(code, message) of what ended a run, in the words an API error would use."""
    if isinstance(exc, ApiError):
        return exc.code, exc.message
    if isinstance(exc, ImagegenError):
        return exc.code, str(exc)
    if isinstance(exc, RendererDied):
        return "renderer_unavailable", str(exc)
    return "internal_error", f"the evaluation failed: {type(exc).__name__}"


def parse_suite_text(text: str) -> Any:
    """A suite written as YAML (anchors and aliases refused: they expand without bound)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a suite sent to the API", event.start_mark
            )
        return super().compose_node(parent, index)
