"""Health, metrics and API docs: ``/healthz``, ``/readyz``, ``/metrics``, ``/openapi.json``, ``/docs``.

Health routes need no key and are answered even when the ingress is busy: the per-key and total
limits keep ``reserved_requests`` of its slots free (``serve/limits.py``). ``/healthz`` touches
nothing; ``/readyz`` probes the database, the object store and every renderer, at most once per ``READY_CACHE_S``
(concurrent callers share one probe), so a flood of readiness checks costs the renderers nothing.
A renderer counts as ready only when the replica that answered is warm (``ready`` in its health:
its warm-up of the configured shapes completed, see ``imagegen.serve.renderer_deployment``); each
renderer's entry shows ``warm``, ``warmup_s``, its warm-ups and its optimisation ``profile``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response

from imagegen import __version__ as imagegen_version
from imagegen.serve import data_plane
from imagegen.serve.errors import error_body
from imagegen.serve.http.deps import AUTH, ingress_of, key_of, scoped

router = APIRouter(tags=["health"])
#: a readiness answer is reused this long
READY_CACHE_S = 1.0


class Readiness:
    """The last readiness probe of this replica and the one in progress (shared by concurrent callers)."""

    def __init__(self) -> None:
        self.at = float("-inf")
        self.result: tuple[bool, dict[str, Any]] | None = None
        self.task: asyncio.Future | None = None

    async def check(self, service: Any) -> tuple[bool, dict[str, Any]]:
        if self.result is not None and time.monotonic() - self.at < READY_CACHE_S:
            return self.result
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._probe(service))
        return await asyncio.shield(self.task)  # a caller that goes away does not cancel the others' probe

    async def _probe(self, service: Any) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {}
        ready = True
        try:
            await asyncio.wait_for(service.db(service.store.ping), 5)
            checks["database"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["database"] = f"error: {type(exc).__name__}"
            ready = False
        try:  # job images are read and written here: a node that cannot reach the object store is not ready
            await asyncio.wait_for(service.db(service.store.results.ping), 5)
            checks["storage"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["storage"] = f"error: {type(exc).__name__}"
            ready = False

        # the write-behind audit trail: rows queued, and why they are not written when the database refuses
        checks["audit"] = service.audit.status()
        checks["data_plane"] = data_plane.status()  # Ray Serve's throughput-optimised mode, as this replica runs it

        async def probe(preset: str) -> tuple[str, Any]:
            try:
                return preset, await asyncio.wait_for(service.renderers.health(preset), 5)
            except Exception as exc:  # noqa: BLE001
                return preset, f"error: {type(exc).__name__}"

        results = await asyncio.gather(*(probe(p) for p in service.presets))
        checks["renderers"] = dict(results)
        ready = ready and all(isinstance(v, dict) and v.get("ready", True) for _, v in results)
        self.result, self.at = (ready, checks), time.monotonic()
        return self.result


readiness = Readiness()


@router.get("/healthz")
async def healthz() -> dict:
    """Liveness: the ingress answers."""
    return {"status": "ok", "version": imagegen_version}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Readiness: the database answers and every renderer deployment has a live, warm replica (cached for a second)."""
    service = ingress_of(request).service
    ready, checks = await readiness.check(service)
    if ready:
        return JSONResponse({"status": "ready", "age_policy": service.settings.age_policy, "checks": checks})
    body = error_body("not_ready", "a dependency of the service is not ready")
    return JSONResponse({**body, "checks": checks}, status_code=503, headers={"Retry-After": "2"})


@router.get("/metrics", dependencies=[*AUTH, Depends(scoped("admin"))], response_class=Response)
async def metrics_route(request: Request) -> Response:
    """Prometheus metrics of this ingress replica (needs the `admin` scope)."""
    ingress = ingress_of(request)
    return Response(await ingress.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/openapi.json", include_in_schema=False)
async def openapi_route(request: Request) -> JSONResponse:
    if not ingress_of(request).cfg.public_docs:
        key_of(request, None)
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
async def docs_route(request: Request) -> Response:
    if not ingress_of(request).cfg.public_docs:
        key_of(request, None)
    return get_swagger_ui_html(openapi_url="/openapi.json", title="imagegen API")
