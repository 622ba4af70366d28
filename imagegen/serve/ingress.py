"""The HTTP ingress: a FastAPI app served by a Ray Serve deployment, composed with one renderer
deployment per preset through ``DeploymentHandle``s.

Every request passes ``EdgeMiddleware`` first: request id, body-size limit (413 before the body
is parsed), API-key check (401 before the body is parsed; health routes are exempt) and metrics.
Routes then check the key's scope (403), validate (422), and answer in one JSON error shape.
Renders go to the renderer deployments (``@serve.batch`` there), come back as PNG bytes, are
watermarked and stamped with provenance metadata here, and are audited.
"""

import asyncio
import base64
import contextlib
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from PIL import Image
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from imagegen import __version__ as imagegen_version
from imagegen import provenance
from imagegen.errors import ImagegenError
from imagegen.identity.models import validate_character_id
from imagegen.pipelines.presets import get_preset
from imagegen.pipelines.types import MAX_SEED, RenderRequest
from imagegen.serve.auth import KeyVerifier, allows
from imagegen.serve.config import INGRESS_NAME, IngressConfig
from imagegen.serve.errors import ApiError, error_body, too_busy, validation_error
from imagegen.serve.gate import GateScorer
from imagegen.serve.jobs import JobRunner, RendererDied
from imagegen.serve.metrics import Metrics
from imagegen.serve.schemas import JobOut, RenderBody, RenderOut
from imagegen.serve.store import TERMINAL, ApiKey, Job, ServeStore, prompt_sha256

log = logging.getLogger(__name__)

PUBLIC_PATHS = {"/healthz", "/readyz"}
DOC_PATHS = {"/docs", "/openapi.json", "/docs/oauth2-redirect"}
JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SSE_TERMINAL = set(TERMINAL)
STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
}

api = FastAPI(
    title="imagegen",
    version=imagegen_version,
    description=(
        "Render registered characters with a consistent face. Every route but `/healthz` and `/readyz` "
        "needs an API key: `Authorization: Bearer igk_...` (`imagegen keys create`). Errors are always "
        '`{"error": {"code", "message", "field"}}`.'
    ),
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)
bearer = HTTPBearer(auto_error=False, description="An API key from `imagegen keys create`.")
AUTH = [Security(bearer)]

#: the ingress of this replica process (the middleware reads its config and metrics)
_INGRESS: "Ingress | None" = None


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the {limit:,}-byte limit of this route")


# -- edge middleware -------------------------------------------------------------------------------
class EdgeMiddleware:
    """Request id, body limit, API key and metrics for every HTTP request (pure ASGI: streams pass through)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ingress = _INGRESS
        cfg = ingress.cfg if ingress else IngressConfig()
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        scope["imagegen.request_id"] = request_id
        path, method = scope.get("path", ""), scope.get("method", "GET")
        status_holder = {"status": 500, "started": False}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        async def reply(error: ApiError) -> None:
            await error.response(request_id)(scope, receive, send_wrapper)

        try:
            limit = cfg.max_upload_bytes if (path == "/v1/characters" and method == "POST") else cfg.max_body_bytes
            length = headers.get("content-length")
            if length is not None and not length.isdigit():
                await reply(ApiError(400, "bad_request", "the Content-Length header is not a number"))
                return
            if length is not None and int(length) > limit:
                await reply(ApiError(413, "payload_too_large", BodyTooLarge(limit).detail))
                return
            public = path in PUBLIC_PATHS or (path in DOC_PATHS and cfg.public_docs)
            if not public:
                if ingress is None:
                    await reply(ApiError(503, "not_ready", "the service is starting", headers={"Retry-After": "2"}))
                    return
                try:
                    scope["imagegen.key"] = await ingress.authenticate(headers)
                except ApiError as exc:
                    await reply(exc)
                    return
            received = 0

            async def receive_wrapper() -> dict:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise BodyTooLarge(limit)
                return message

            try:
                await self.app(scope, receive_wrapper, send_wrapper)
            except BodyTooLarge as exc:
                if not status_holder["started"]:
                    await reply(ApiError(413, "payload_too_large", exc.detail))
        finally:
            if ingress is not None:
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                status = str(status_holder["status"])
                ingress.metrics.requests.labels(template, method, status).inc()
                ingress.metrics.latency.labels(template, method).observe(time.perf_counter() - started)


api.add_middleware(EdgeMiddleware)


# -- error handlers --------------------------------------------------------------------------------
def _request_id(request: Request) -> str | None:
    return request.scope.get("imagegen.request_id")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response(_request_id(request))


@api.exception_handler(ImagegenError)
async def _imagegen_error(request: Request, exc: ImagegenError) -> JSONResponse:
    error = ApiError.from_imagegen(exc)
    if exc.code == "invalid_character_id" and request.url.path in ("/v1/renders", "/v1/jobs"):
        error.field = "character"  # the body field is `character` (the registry says character_id)
    return error.response(_request_id(request))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(list(exc.errors())).response(_request_id(request))


@api.exception_handler(ValidationError)
async def _pydantic_error(request: Request, exc: ValidationError) -> JSONResponse:
    return validation_error(exc.errors(include_url=False)).response(_request_id(request))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = STATUS_CODES.get(exc.status_code, "http_error")
    error = ApiError(exc.status_code, code, str(exc.detail), None, dict(exc.headers or {}))
    return error.response(_request_id(request))


@api.exception_handler(BackPressureError)
async def _backpressure(request: Request, exc: BackPressureError) -> JSONResponse:
    ingress = _INGRESS
    retry = ingress.cfg.retry_after_s if ingress else 2
    return too_busy("renderer_overloaded", str(exc), retry, 503).response(_request_id(request))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    body = error_body(
        "internal_error", f"unexpected server error ({type(exc).__name__}); request id {_request_id(request)}"
    )
    return JSONResponse(body, status_code=500)


# -- the render plan -------------------------------------------------------------------------------
@dataclass
class Plan:
    """A validated render: what to render, for whom, with which gate."""

    request_id: str
    key_id: str
    job_id: str | None
    preset: str
    base: RenderRequest
    num_images: int
    character_version: int | None
    gate_min: float | None
    max_attempts: int
    centroid: list[float] | None
    body: RenderBody

    def seed_for(self, index: int, attempt: int) -> int:
        assert self.base.seed is not None
        return self.base.seed + index + attempt * self.num_images


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _json_field(raw: str, field: str) -> Any:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ApiError(422, "validation_error", f"{field} must be JSON: {exc}", field) from None
    if not isinstance(value, dict):
        raise ApiError(422, "validation_error", f"{field} must be a JSON object", field)
    return value


def _prefers_png(accept: str) -> bool:
    first = accept.split(",")[0].split(";")[0].strip().lower()
    return first == "image/png"


def _bytes_io(data: bytes):
    import io

    return io.BytesIO(data)


async def _gather_or_cancel(coroutines: list) -> list:
    """``asyncio.gather`` that cancels the others when one fails (no orphan renders)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@serve.deployment(name=INGRESS_NAME, max_ongoing_requests=100)
@serve.ingress(api)
class Ingress:
    """The ingress replica: routes, auth, limits, jobs, provenance."""

    def __init__(self, renderers: dict, presets: list[str]):
        import imagegen.serve.ingress as this_module  # the real module: this class may be pickled by value
        from imagegen.identity.registry import Registry

        self.renderers = renderers
        self.presets = list(presets)
        self.cfg = IngressConfig()
        self.metrics = Metrics()
        self.db_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="db")
        self.cpu_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cpu")
        self.store = ServeStore.open()
        self.registry = Registry.open()
        self.verifier = KeyVerifier(self.store, ttl_s=self.cfg.auth_cache_s)
        self.gate = GateScorer()
        self.inflight = 0
        self._job_signal = asyncio.Condition()
        self.runner = JobRunner(self.store, self._run_job, lambda: self.cfg, self.db_pool, self._notify_job)
        self.runner.start()
        this_module._INGRESS = self

    def reconfigure(self, user_config: dict | None) -> None:
        self.cfg = IngressConfig.model_validate(user_config or {})
        self.verifier.ttl_s = self.cfg.auth_cache_s

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.runner.shutdown()

    # -- helpers ---------------------------------------------------------------------------------
    async def db(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.db_pool, fn, *args)

    async def cpu(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, fn, *args)

    async def authenticate(self, headers: dict[str, str]) -> ApiKey:
        header = headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        token = token or headers.get("x-api-key", "").strip()
        challenge = {"WWW-Authenticate": "Bearer"}
        if not token:
            raise ApiError(
                401,
                "unauthorized",
                "this route needs an API key: send 'Authorization: Bearer <key>' "
                "(create one with `imagegen keys create`)",
                headers=challenge,
            )
        key = await self.db(self.verifier.verify, token)
        if key is None:
            raise ApiError(401, "unauthorized", "the API key is unknown, revoked or malformed", headers=challenge)
        return key

    @staticmethod
    def _key(request: Request, needed: str | None) -> ApiKey:
        key: ApiKey | None = request.scope.get("imagegen.key")
        if key is None:  # only reachable on a public docs route
            raise ApiError(401, "unauthorized", "this route needs an API key", headers={"WWW-Authenticate": "Bearer"})
        if not allows(key.scopes, needed):
            raise ApiError(
                403, "forbidden", f"this route needs the scope {needed!r}; this key has: {', '.join(key.scopes)}"
            )
        return key

    def _notify_job(self, job_id: str) -> None:
        async def notify() -> None:
            async with self._job_signal:
                self._job_signal.notify_all()

        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(notify())

    # -- health, metrics, docs -------------------------------------------------------------------
    @api.get("/healthz", tags=["health"])
    async def healthz(self) -> dict:
        """Liveness: the ingress answers."""
        return {"status": "ok", "version": imagegen_version}

    @api.get("/readyz", tags=["health"])
    async def readyz(self) -> JSONResponse:
        """Readiness: the database answers and every renderer deployment has a live replica."""
        checks: dict[str, Any] = {}
        ready = True
        try:
            await asyncio.wait_for(self.db(self.store.ping), 5)
            checks["database"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["database"] = f"error: {type(exc).__name__}"
            ready = False

        async def probe(preset: str) -> tuple[str, Any]:
            try:
                return preset, await asyncio.wait_for(self.renderers[preset].health.remote(), 5)
            except Exception as exc:  # noqa: BLE001
                return preset, f"error: {type(exc).__name__}"

        results = await asyncio.gather(*(probe(p) for p in self.presets))
        checks["renderers"] = dict(results)
        ready = ready and all(isinstance(v, dict) for _, v in results)
        if ready:
            return JSONResponse({"status": "ready", "checks": checks})
        body = error_body("not_ready", "a dependency of the service is not ready")
        return JSONResponse({**body, "checks": checks}, status_code=503, headers={"Retry-After": "2"})

    @api.get("/metrics", tags=["health"], dependencies=AUTH, response_class=Response)
    async def metrics_route(self, request: Request) -> Response:
        """Prometheus metrics of this ingress replica (needs the `admin` scope)."""
        self._key(request, "admin")
        counts = await self.db(self.store.job_counts)
        for status in ("queued", "running", "done", "failed", "cancelled"):
            self.metrics.jobs.labels(status).set(counts.get(status, 0))
        self.metrics.inflight.set(self.inflight)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_route(self, request: Request) -> JSONResponse:
        if not self.cfg.public_docs:
            self._key(request, None)
        return JSONResponse(request.app.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs_route(self, request: Request) -> Response:
        if not self.cfg.public_docs:
            self._key(request, None)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="imagegen API")

    # -- characters ------------------------------------------------------------------------------
    @staticmethod
    def _character_summary(character: Any) -> dict:
        return {
            "id": character.id,
            "name": character.name,
            "status": character.status,
            "version": character.version,
            "references": len(character.references),
            "provenance": character.provenance.model_dump(mode="json"),
            "age_check": character.age_check,
            "centroid_backends": sorted(character.centroids),
            "created_at": _iso(character.created_at),
            "updated_at": _iso(character.updated_at),
        }

    @staticmethod
    def _character_full(character: Any) -> dict:
        data = character.model_dump(mode="json")
        for ref in data["references"]:
            for face in ref["faces"].values():
                face.pop("embedding", None)
        data["centroids"] = sorted(data["centroids"])
        return data

    @api.post("/v1/characters", status_code=201, tags=["characters"], dependencies=AUTH)
    async def create_character(
        self,
        request: Request,
        id: str = Form(..., max_length=64, description="Slug: a-z, 0-9, '-' and '_'."),
        name: str = Form(..., min_length=1, max_length=200),
        provenance_json: str = Form(
            ..., alias="provenance", max_length=10_000, description='JSON: {"kind", "creator", "date", "evidence"}'
        ),
        card_json: str | None = Form(None, alias="card", max_length=100_000, description="JSON card (optional)."),
        references: list[UploadFile] = File(..., description="Reference images (PNG, JPEG, WebP)."),
    ) -> dict:
        """Register a character (as `draft`) from reference images; returns its reference report."""
        from imagegen.identity.characters import MAX_REFERENCES, register_character

        self._key(request, "characters:write")
        validate_character_id(id)
        provenance_data = _json_field(provenance_json, "provenance")
        card = _json_field(card_json, "card") if card_json else None
        if len(references) > MAX_REFERENCES:
            raise ApiError(422, "invalid_reference", f"at most {MAX_REFERENCES} references", "references")
        files = [(upload.filename or f"reference-{i}", await upload.read()) for i, upload in enumerate(references)]

        def register() -> Any:
            return register_character(
                self.registry, character_id=id, name=name, provenance=provenance_data, files=files, card=card
            )

        registration = await self.cpu(register)
        return {
            "character": self._character_summary(registration.character),
            "report": registration.report.to_dict(),
            "age_check": dict(registration.age.__dict__),
        }

    @api.get("/v1/characters", tags=["characters"], dependencies=AUTH)
    async def list_characters(
        self, request: Request, status: str | None = Query(None, pattern="^(draft|approved)$")
    ) -> dict:
        """Every registered character (summaries), optionally only `draft` or `approved` ones."""
        self._key(request, None)
        characters = await self.db(lambda: self.registry.list(status=status))
        return {"characters": [self._character_summary(c) for c in characters]}

    @api.get("/v1/characters/{character_id}", tags=["characters"], dependencies=AUTH)
    async def get_character(self, request: Request, character_id: str) -> dict:
        """One character: card, provenance, references and face analyses (no embeddings)."""
        self._key(request, None)
        character = await self.db(self.registry.get, validate_character_id(character_id))
        return self._character_full(character)

    @api.post("/v1/characters/{character_id}/approve", tags=["characters"], dependencies=AUTH)
    async def approve_character(self, request: Request, character_id: str) -> dict:
        """Approve a character: re-runs the reference report and every safeguard first."""
        from imagegen.identity.characters import approve_character

        self._key(request, "characters:write")
        validate_character_id(character_id)
        registration = await self.cpu(approve_character, self.registry, character_id)
        return {
            "character": self._character_summary(registration.character),
            "report": registration.report.to_dict(),
            "age_check": dict(registration.age.__dict__),
        }

    @api.delete("/v1/characters/{character_id}", tags=["characters"], dependencies=AUTH)
    async def delete_character(self, request: Request, character_id: str) -> dict:
        """Delete a character and every byte of it; says how much went."""
        self._key(request, "characters:write")
        report = await self.db(self.registry.delete, validate_character_id(character_id))
        return {"deleted": dict(report.__dict__)}

    # -- planning --------------------------------------------------------------------------------
    async def _plan(self, body: RenderBody, key_id: str, request_id: str, job_id: str | None = None) -> Plan:
        cfg = self.cfg
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
        preset = get_preset(body.preset)
        base = body.render_request()
        base.check_against(preset)
        gate_min = body.min_identity_similarity
        if gate_min is not None and body.character is None:
            raise ApiError(
                422, "invalid_request", "min_identity_similarity needs a character", "min_identity_similarity"
            )
        if body.max_attempts is not None and body.max_attempts > 1 and gate_min is None:
            raise ApiError(422, "invalid_request", "max_attempts > 1 needs min_identity_similarity", "max_attempts")
        if body.max_attempts is not None and body.max_attempts > cfg.max_gate_attempts:
            raise ApiError(422, "invalid_request", f"max_attempts is above {cfg.max_gate_attempts}", "max_attempts")
        max_attempts = body.max_attempts or (3 if gate_min is not None else 1)
        seed = body.seed if body.seed is not None else random.SystemRandom().randrange(2**32)
        if seed + body.num_images * max_attempts > MAX_SEED:
            raise ApiError(422, "invalid_request", "seed is too large for this many images and attempts", "seed")
        base = base.model_copy(update={"seed": seed})
        character_version = centroid = None
        if body.character is not None:
            character = await self.db(self.registry.get, body.character)
            if character.status != "approved":
                raise ApiError(
                    409,
                    "character_not_renderable",
                    f"character {character.id!r} is {character.status}; approve it first "
                    f"(POST /v1/characters/{character.id}/approve)",
                    "character",
                )
            character_version = character.version
            if gate_min is not None:
                centroid = character.centroids.get(self.gate.family)
                if centroid is None:
                    raise ApiError(
                        422,
                        "invalid_request",
                        f"character {character.id!r} has no identity centroid for face backend "
                        f"{self.gate.family!r}; re-analyse its references",
                        "min_identity_similarity",
                    )
        return Plan(
            request_id=request_id,
            key_id=key_id,
            job_id=job_id,
            preset=body.preset,
            base=base,
            num_images=body.num_images,
            character_version=character_version,
            gate_min=gate_min,
            max_attempts=max_attempts,
            centroid=centroid,
            body=body.model_copy(update={"seed": seed}),
        )

    # -- calling the renderers -------------------------------------------------------------------
    async def _call_renderer(
        self,
        preset: str,
        request: RenderRequest,
        progress: Callable[[int, int], None] | None,
        *,
        retries: int,
        wait_on_backpressure: bool,
    ) -> dict:
        """One image from the preset's renderer deployment (streamed: progress, then the result)."""
        handle = self.renderers[preset]
        attempt = 0
        gauge = self.metrics.queue_depth.labels(preset)
        while True:
            attempt += 1
            gauge.inc()
            try:
                stream = handle.options(stream=True).render.remote(
                    {"request": request.model_dump(mode="json"), "progress": progress is not None}
                )
                async for event in stream:
                    if event is None:
                        continue
                    if event["type"] == "progress":
                        if progress is not None:
                            progress(event["done"], event["total"])
                    elif event["type"] == "result":
                        self.metrics.observe_batch(preset, event.get("batch") or {})
                        return event
                    elif event["type"] == "error":
                        raise ApiError.from_code(event["code"], event["message"], event.get("field"))
                raise RendererDied(f"the {preset} renderer ended the stream without a result")
            except BackPressureError as exc:
                self.metrics.rejected.labels("renderer_queue_full").inc()
                if not wait_on_backpressure:
                    raise too_busy("renderer_overloaded", str(exc), self.cfg.retry_after_s, 503) from None
                await asyncio.sleep(self.cfg.retry_after_s * (0.5 + random.random()))
                attempt -= 1
            except (RayActorError, ReplicaUnavailableError, RendererDied) as exc:
                reason = f"the {preset} renderer replica died or became unreachable: {type(exc).__name__}"
                log.warning("%s (attempt %d)", reason, attempt)
                if attempt > retries:
                    raise RendererDied(reason) from exc
                self.metrics.renderer_retries.labels(preset).inc()
            finally:
                gauge.dec()

    async def _render_image(
        self,
        plan: Plan,
        index: int,
        on_progress: Callable[[int, int, int, int], None] | None,
        retries: int,
        wait_on_backpressure: bool,
    ) -> tuple[dict, dict | None]:
        """Image ``index`` of ``plan``, through the consistency gate: (winning result, gate report)."""
        attempts: list[dict] = []
        best: tuple[float, dict, int] | None = None
        last: dict | None = None
        for attempt in range(plan.max_attempts):
            seed = plan.seed_for(index, attempt)
            request = plan.base.model_copy(update={"seed": seed})
            callback = None
            if on_progress is not None:

                def callback(done: int, total: int, a: int = attempt) -> None:
                    on_progress(index, a, done, total)

            event = await self._call_renderer(
                plan.preset, request, callback, retries=retries, wait_on_backpressure=wait_on_backpressure
            )
            last = event
            if event.get("png") is None:
                attempts.append({"seed": seed, "similarity": None, "passed": False, "problem": event.get("problem")})
            elif plan.gate_min is None:
                return event, None
            else:
                score = await self.cpu(self.gate.score, event["png"], plan.centroid)
                passed = score is not None and score >= plan.gate_min
                attempts.append({"seed": seed, "similarity": score, "passed": passed, "problem": None})
                rank = -1e9 if score is None else score
                if best is None or rank > best[0]:
                    best = (rank, event, seed)
                if passed:
                    break
            if attempt + 1 < plan.max_attempts:
                self.metrics.gate_retries.labels(plan.preset).inc()
        if plan.gate_min is None:
            assert last is not None
            return last, None
        passed = any(a["passed"] for a in attempts)
        if not passed:
            self.metrics.gate_failures.labels(plan.preset).inc()
        winner = best[1] if best is not None else last
        assert winner is not None
        report = {
            "min_identity_similarity": plan.gate_min,
            "backend": self.gate.family,
            "passed": passed,
            "winning_seed": best[2] if best is not None else None,
            "attempts": attempts,
        }
        return winner, report

    def _stamp(self, plan: Plan, index: int, event: dict, gate: dict | None) -> tuple[dict, bytes | None, dict | None]:
        """Provenance for one image (watermark + PNG metadata) and its audit record."""
        metadata = dict(event["metadata"])
        image_id = uuid.uuid4().hex
        seed = int(metadata["seed"])
        out: dict[str, Any] = {
            "index": index,
            "image_id": image_id,
            "seed": seed,
            "width": metadata.get("width"),
            "height": metadata.get("height"),
            "problem": event.get("problem"),
            "gate": gate,
            "identity_similarity": None,
        }
        if gate is not None:
            scores = {a["seed"]: a["similarity"] for a in gate["attempts"]}
            out["identity_similarity"] = scores.get(seed)
        if event.get("png") is None:
            out["metadata"] = metadata
            return out, None, None
        extra = {"preset": plan.preset, "job_id": plan.job_id, "key_id": plan.key_id}
        if gate is not None:
            extra["identity_similarity"] = out["identity_similarity"]
        with Image.open(_bytes_io(event["png"])) as image:
            png, record = provenance.stamp(
                image.convert("RGB"),
                metadata,
                image_id=image_id,
                request_id=plan.request_id,
                character_version=plan.character_version,
                extra=extra,
            )
        out["watermark"] = record["watermark"]
        out["metadata"] = {**metadata, "provenance": record}
        audit = {
            "image_id": image_id,
            "request_id": plan.request_id,
            "job_id": plan.job_id,
            "key_id": plan.key_id,
            "preset": plan.preset,
            "character": metadata.get("character"),
            "character_version": plan.character_version,
            "method": metadata.get("method"),
            "prompt_sha256": prompt_sha256(metadata.get("prompt") or "", metadata.get("negative_prompt") or ""),
            "seed": seed,
            "watermark_tag": provenance.tag_for(image_id),
        }
        return out, png, audit

    async def _execute(
        self,
        plan: Plan,
        on_progress: Callable[[int, int, int, int], None] | None = None,
        *,
        retries: int,
        wait_on_backpressure: bool,
    ) -> tuple[dict, list[bytes | None]]:
        """Render every image of ``plan`` (concurrently: they batch with each other and with others)."""
        started = time.perf_counter()
        rendered = await _gather_or_cancel(
            [self._render_image(plan, i, on_progress, retries, wait_on_backpressure) for i in range(plan.num_images)]
        )
        rendered_at = time.perf_counter()
        stamped = [await self.cpu(self._stamp, plan, i, event, gate) for i, (event, gate) in enumerate(rendered)]
        await self.db(self.store.add_audit, [audit for _, _, audit in stamped if audit is not None])
        ok = sum(1 for _, png, _ in stamped if png is not None)
        self.metrics.images.labels(plan.preset).inc(ok)
        result = {
            "request_id": plan.request_id,
            "preset": plan.preset,
            "character": plan.base.character,
            "character_version": plan.character_version,
            "images": [out for out, _, _ in stamped],
            "timings": {
                "render_s": round(rendered_at - started, 4),
                "total_s": round(time.perf_counter() - started, 4),
            },
        }
        return result, [png for _, png, _ in stamped]

    # -- synchronous renders ---------------------------------------------------------------------
    @api.post(
        "/v1/renders",
        tags=["renders"],
        dependencies=AUTH,
        response_model=RenderOut,
        responses={200: {"content": {"image/png": {}}, "description": "JSON, or one PNG with `Accept: image/png`"}},
    )
    async def render(
        self,
        request: Request,
        body: RenderBody,
        format: str | None = Query(None, pattern="^(json|png)$", description="`png`: the single image as image/png"),
    ) -> Response:
        """Render synchronously: JSON with base64 PNGs, or the PNG itself for a single image."""
        key = self._key(request, "render")
        want_png = format == "png" or (format is None and _prefers_png(request.headers.get("accept", "")))
        if want_png and body.num_images != 1:
            raise ApiError(406, "not_acceptable", "image/png returns one image: ask for num_images=1 or JSON", "format")
        request_id = request.scope.get("imagegen.request_id") or uuid.uuid4().hex
        plan = await self._plan(body, key.id, request_id)
        if self.inflight >= self.cfg.max_inflight_renders:
            self.metrics.rejected.labels("ingress_busy").inc()
            raise too_busy(
                "overloaded",
                f"{self.inflight} renders in progress on this replica "
                f"(limit {self.cfg.max_inflight_renders}); retry later",
                self.cfg.retry_after_s,
            )
        self.inflight += 1
        try:
            result, pngs = await asyncio.wait_for(
                self._execute(plan, retries=1, wait_on_backpressure=False), timeout=self.cfg.sync_timeout_s
            )
        except TimeoutError:
            raise ApiError(504, "timeout", f"the render took longer than {self.cfg.sync_timeout_s:.0f}s") from None
        except RendererDied as exc:
            raise too_busy("renderer_unavailable", str(exc), self.cfg.retry_after_s, 503) from None
        finally:
            self.inflight -= 1
        if want_png:
            image, png = result["images"][0], pngs[0]
            if png is None:
                raise ApiError(500, "bad_output", f"the image came out unusable ({image['problem']})")
            headers = {"X-Image-Id": image["image_id"], "X-Seed": str(image["seed"])}
            if image.get("identity_similarity") is not None:
                headers["X-Identity-Similarity"] = str(image["identity_similarity"])
            return Response(png, media_type="image/png", headers=headers)
        for image, png in zip(result["images"], pngs, strict=True):
            image["png_base64"] = base64.b64encode(png).decode() if png is not None else None
        return JSONResponse(result)

    # -- jobs ------------------------------------------------------------------------------------
    async def _run_job(self, job: Job, emit: Callable[[dict], None]) -> dict:
        body = RenderBody.model_validate(job.request["body"])
        plan = await self._plan(body, job.key_id, job.request["request_id"], job_id=job.id)
        done_images: set[int] = set()
        last_emit = [0.0]

        def on_progress(index: int, attempt: int, done: int, total: int) -> None:
            now = time.monotonic()
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

        result, pngs = await self._execute(plan, on_progress, retries=0, wait_on_backpressure=True)
        for image, png in zip(result["images"], pngs, strict=True):
            if png is not None:
                image["digest"] = await self.db(self.store.results.put, png)
                image["url"] = f"/v1/jobs/{job.id}/images/{image['index']}"
        return result

    def _job_out(self, job: Job, include_images: bool = False) -> dict:
        out: dict[str, Any] = {
            "job_id": job.id,
            "status": job.status,
            "preset": job.preset,
            "attempts": job.attempts,
            "progress": job.progress,
            "created_at": _iso(job.created_at),
            "started_at": _iso(job.started_at),
            "finished_at": _iso(job.finished_at),
            "error": {"code": job.error_code, "message": job.error_message, "field": None} if job.error_code else None,
            "result": None,
            "links": {"self": f"/v1/jobs/{job.id}", "events": f"/v1/jobs/{job.id}/events"},
        }
        if job.result is not None:
            result = json.loads(json.dumps(job.result))
            for image in result.get("images", []):
                digest = image.pop("digest", None)
                if include_images and digest:
                    image["png_base64"] = base64.b64encode(self.store.results.get(digest)).decode()
            out["result"] = result
        return out

    async def _own_job(self, request: Request, job_id: str) -> tuple[ApiKey, Job]:
        key = self._key(request, "render")
        missing = ApiError(404, "unknown_job", f"no job {job_id!r} for this key", "job_id")
        if not JOB_ID_RE.match(job_id):
            raise missing
        job = await self.db(self.store.get_job, job_id)
        if job is None or (job.key_id != key.id and "admin" not in key.scopes):
            raise missing
        return key, job

    @api.post("/v1/jobs", status_code=202, tags=["jobs"], dependencies=AUTH, response_model=JobOut)
    async def create_job(self, request: Request, body: RenderBody) -> JSONResponse:
        """Queue a render; returns the job id at once. Follow it with GET /v1/jobs/{id} or its events."""
        key = self._key(request, "render")
        request_id = request.scope.get("imagegen.request_id") or uuid.uuid4().hex
        job_id = uuid.uuid4().hex
        plan = await self._plan(body, key.id, request_id, job_id=job_id)
        if await self.db(self.store.count_active_jobs) >= self.cfg.max_queued_jobs:
            self.metrics.rejected.labels("job_queue_full").inc()
            raise too_busy(
                "job_queue_full",
                f"{self.cfg.max_queued_jobs} jobs are queued or running; retry later",
                self.cfg.retry_after_s,
            )
        stored = {"body": plan.body.model_dump(mode="json"), "request_id": request_id}
        job = await self.db(self.store.create_job, job_id, key.id, plan.preset, stored, plan.num_images)
        self.runner.wake()
        return JSONResponse(self._job_out(job), status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})

    @api.get("/v1/jobs", tags=["jobs"], dependencies=AUTH)
    async def list_jobs(self, request: Request, limit: int = Query(50, ge=1, le=500)) -> dict:
        """This key's most recent jobs (every job for an admin key)."""
        key = self._key(request, "render")
        jobs = await self.db(self.store.list_jobs, None if "admin" in key.scopes else key.id, limit)
        return {"jobs": [self._job_out(j) for j in jobs]}

    @api.get("/v1/jobs/{job_id}", tags=["jobs"], dependencies=AUTH, response_model=JobOut)
    async def get_job(self, request: Request, job_id: str, include_images: bool = Query(False)) -> JSONResponse:
        """A job's status, progress, error or result (`include_images=true`: PNGs inline as base64)."""
        _, job = await self._own_job(request, job_id)
        return JSONResponse(await self.db(self._job_out, job, include_images))

    @api.get("/v1/jobs/{job_id}/images/{index}", tags=["jobs"], dependencies=AUTH, response_class=Response)
    async def get_job_image(self, request: Request, job_id: str, index: int) -> Response:
        """One image of a finished job, as image/png."""
        _, job = await self._own_job(request, job_id)
        images = (job.result or {}).get("images", [])
        if not 0 <= index < len(images) or not images[index].get("digest"):
            raise ApiError(404, "not_found", f"job {job_id} has no image {index}", "index")
        png = await self.db(self.store.results.get, images[index]["digest"])
        return Response(png, media_type="image/png", headers={"X-Image-Id": images[index]["image_id"]})

    @api.delete("/v1/jobs/{job_id}", tags=["jobs"], dependencies=AUTH, response_model=JobOut)
    async def cancel_job(self, request: Request, job_id: str) -> JSONResponse:
        """Cancel a queued or running job (a finished one: 409)."""
        _, job = await self._own_job(request, job_id)
        if job.status in ("done", "failed"):
            raise ApiError(409, "job_finished", f"job {job_id} already ended {job.status}", "job_id")
        cancelled = await self.db(self.store.cancel_job, job_id)
        self.runner.cancel_local(job_id)
        self._notify_job(job_id)
        return JSONResponse(self._job_out(cancelled))

    @api.get("/v1/jobs/{job_id}/events", tags=["jobs"], dependencies=AUTH, response_class=StreamingResponse)
    async def job_events(self, request: Request, job_id: str) -> StreamingResponse:
        """Server-sent events: `queued`, `started`, `progress`, `retry`, then `done`, `failed` or `cancelled`.

        Each event's `id` is resumable with `Last-Event-ID`; `data` is JSON.
        """
        _, job = await self._own_job(request, job_id)
        last_header = request.headers.get("last-event-id", "0")
        last = int(last_header) if last_header.isdigit() else 0

        async def stream():
            nonlocal last
            keepalive = time.monotonic()
            while True:
                events = await self.db(self.store.events, job_id, last)
                for event in events:
                    last = event.id
                    payload = {"job_id": job_id, **event.data, "at": _iso(event.created_at)}
                    yield f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(payload)}\n\n"
                    if event.type in SSE_TERMINAL:
                        return
                if not events:
                    current = await self.db(self.store.get_job, job_id)
                    if current is None or current.status in SSE_TERMINAL:
                        return
                if time.monotonic() - keepalive > self.cfg.sse_keepalive_s:
                    keepalive = time.monotonic()
                    yield ": keep-alive\n\n"
                async with self._job_signal:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._job_signal.wait(), timeout=0.25)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Job-Status": job.status},
        )
