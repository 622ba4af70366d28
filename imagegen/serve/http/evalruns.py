"""``/v1/eval/runs``: submit a suite (JSON or YAML), follow the run, read its summary and report, delete it.

Submitting renders, so it needs the ``render`` scope; reading needs any key of the run's tenant
(``admin``: any tenant). Another tenant's run answers exactly like a missing one (404 ``not_found``).
``report.html`` is self-contained (images and plots as data URIs, inline styles, no script) and
is answered with a Content-Security-Policy that allows nothing else: no script, no request
anywhere, sandboxed.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from imagegen.serve.errors import ApiError
from imagegen.serve.evalruns import parse_suite_text
from imagegen.serve.http.deps import AUTH, ingress_of, scoped
from imagegen.serve.http.jsonlimits import parse_json_limited
from imagegen.serve.service import iso
from imagegen.serve.store import ApiKey, EvalRun
from imagegen.serve.tenancy import Caller

router = APIRouter(tags=["evaluation"], dependencies=AUTH)
RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")
YAML_TYPES = {"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"}
#: report.html: its own inline styles and data: images, nothing else (no script, no fetch, no form, no frame)
REPORT_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'self'; sandbox"
)
FILES = {
    "report.html": "text/html; charset=utf-8",
    "metrics.json": "application/json",
    "junit.xml": "application/xml",
}
SUITE_BODY = {
    "requestBody": {
        "required": True,
        "description": "A suite (the fields of configs/suites/*.yaml) as JSON or YAML; characters are the "
        "tenant's registered ones; workers, gpus_per_worker, batch_size and profile are refused; baseline is "
        "the run_id of an earlier run.",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/yaml": {"schema": {"type": "string"}},
        },
    }
}


def run_out(run: EvalRun) -> dict[str, Any]:
    """A run as the API shows it."""
    base = f"/v1/eval/runs/{run.id}"
    return {
        "run_id": run.id,
        "suite": run.suite,
        "tenant": run.tenant,
        "status": run.status,
        "verdict": run.verdict,
        "characters": run.characters,
        "progress": run.progress,
        "created_at": iso(run.created_at),
        "started_at": iso(run.started_at),
        "finished_at": iso(run.finished_at),
        "error": {"code": run.error_code, "message": run.error_message, "field": None} if run.error_code else None,
        "summary": run.summary,
        "spec": run.spec,
        "links": {"self": base, **{name: f"{base}/{name}" for name in FILES if name in run.files}},
    }


def _run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id):
        raise ApiError(404, "not_found", f"no evaluation run {run_id[:40]!r} for this key", "run_id")
    return run_id


async def _suite_of(request: Request) -> Any:
    """The request body as a suite mapping: JSON (the edge already bounded its size and depth) or YAML."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await request.body()
    depth = ingress_of(request).cfg.max_json_depth
    if media in ("", "application/json"):
        return parse_json_limited(raw, max_depth=depth, field="suite")
    if media in YAML_TYPES:
        try:
            return parse_suite_text(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(422, "invalid_suite", "a YAML suite is UTF-8 text", "suite") from None
        except RecursionError:
            raise ApiError(422, "json_too_deep", f"suite: nested deeper than {depth} levels", "suite") from None
        except yaml.YAMLError as exc:
            raise ApiError(422, "invalid_suite", f"the suite is not valid YAML: {exc}", "suite") from None
    raise ApiError(
        415, "unsupported_media_type", f"send the suite as application/json or application/yaml, not {media!r}", "suite"
    )


@router.post("/v1/eval/runs", status_code=202, openapi_extra=SUITE_BODY)
async def create_run(request: Request, response: Response, key: ApiKey = Depends(scoped("render"))) -> dict[str, Any]:
    """Run a suite on the service's renderers: 202 with the run (`queued`); it renders, scores and writes its report."""
    data = await _suite_of(request)
    run = await ingress_of(request).evalruns.submit(Caller.of(key), data)
    response.headers["Location"] = f"/v1/eval/runs/{run.id}"
    return run_out(run)


@router.get("/v1/eval/runs")
async def list_runs(
    request: Request, limit: int = Query(50, ge=1, le=500), key: ApiKey = Depends(scoped(None))
) -> dict[str, Any]:
    """The tenant's evaluation runs (every tenant's for admin), newest first."""
    runs = await ingress_of(request).evalruns.all(Caller.of(key), limit)
    return {"runs": [run_out(r) for r in runs]}


@router.get("/v1/eval/runs/{run_id}")
async def get_run(request: Request, run_id: str, key: ApiKey = Depends(scoped(None))) -> dict[str, Any]:
    """A run: status, progress, error, and once done its summary (verdict, reasons, headline metrics)."""
    run = await ingress_of(request).evalruns.get(Caller.of(key), _run_id(run_id))
    return run_out(run)


@router.get(
    "/v1/eval/runs/{run_id}/{name}",
    response_class=Response,
    responses={200: {"content": {t.split(";")[0]: {} for t in FILES.values()}, "description": "The file."}},
)
async def get_run_file(request: Request, run_id: str, name: str, key: ApiKey = Depends(scoped(None))) -> Response:
    """`report.html` (self-contained, strict CSP), `metrics.json` or `junit.xml` of a finished run."""
    if name not in FILES:
        raise ApiError(404, "not_found", f"a run has {', '.join(FILES)}; not {name[:40]!r}", "name")
    data = await ingress_of(request).evalruns.file(Caller.of(key), _run_id(run_id), name)
    headers = {
        "Cache-Control": "private, no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if name == "report.html":
        headers["Content-Security-Policy"] = REPORT_CSP
    return Response(data, media_type=FILES[name], headers=headers)


@router.delete("/v1/eval/runs/{run_id}", status_code=204, response_class=Response)
async def delete_run(request: Request, run_id: str, key: ApiKey = Depends(scoped("render"))) -> Response:
    """Delete a run and every file it kept (a running one stops)."""
    await ingress_of(request).evalruns.delete(Caller.of(key), _run_id(run_id))
    return Response(status_code=204)
