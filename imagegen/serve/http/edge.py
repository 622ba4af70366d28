"""What every HTTP request passes before a route: request id, body limit, API key, rate, metrics, errors, timing.

``EdgeMiddleware`` is pure ASGI (streams pass through): request id, body-size limit (413 before
the body is parsed), API-key check (401 before the body is parsed; health routes and the Studio
page's own static files are exempt), the key's request rate (429 + Retry-After, ``serve/limits.py``),
the nesting depth of JSON bodies (422 while the body arrives, before anything parses it: deep JSON
made the parser recurse into a 500), metrics and the ``Server-Timing`` header (``http/timing.py``).
The error handlers answer every failure in one JSON shape.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from imagegen.errors import ImagegenError
from imagegen.serve.config import IngressConfig
from imagegen.serve.dispatch import renderer_overloaded
from imagegen.serve.errors import ApiError, error_body, validation_error
from imagegen.serve.http.jsonlimits import DepthScanner, JsonTooDeep
from imagegen.serve.http.studio import PUBLIC_STUDIO_PATHS
from imagegen.serve.http.timing import SCOPE_KEY, ServerTiming

log = logging.getLogger(__name__)

PUBLIC_PATHS = {"/healthz", "/readyz"}
#: routes whose POST body is an image upload (``max_upload_bytes``, not ``max_body_bytes``)
UPLOAD_PATHS = {"/v1/characters", "/v1/provenance/check"}
DOC_PATHS = {"/docs", "/openapi.json", "/docs/oauth2-redirect"}
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
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


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the {limit:,}-byte limit of this route")


class JsonBodyTooDeep(HTTPException):
    """Raised from the body stream, so FastAPI's body reading passes it on (an HTTPException) unparsed."""

    def __init__(self, max_depth: int):
        super().__init__(422, f"the JSON body is nested deeper than {max_depth} levels")


def is_json(content_type: str) -> bool:
    """Whether FastAPI would parse a body of this content type as JSON (none given counts)."""
    media = content_type.split(";")[0].strip().lower()
    return media in ("", "application/json") or (media.startswith("application/") and media.endswith("+json"))


def error_response(error: ApiError, request_id: str | None = None) -> JSONResponse:
    headers = dict(error.headers)
    if request_id:
        headers.setdefault("X-Request-Id", request_id)
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class EdgeMiddleware:
    """Request id, body limit, API key and metrics for every HTTP request (reads ``app.state.ingress``)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ingress = getattr(scope["app"].state, "ingress", None)
        cfg = ingress.cfg if ingress else IngressConfig()
        timing = scope[SCOPE_KEY] = ServerTiming()
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
                timing.mark("respond" if "parse" in timing.phases else "route")
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode()),
                    (b"server-timing", timing.header().encode()),
                ]
            await send(message)

        async def reply(error: ApiError) -> None:
            await error_response(error, request_id)(scope, receive, send_wrapper)

        try:
            upload = path in UPLOAD_PATHS or (path.startswith("/v1/designs/") and path.endswith("/pick"))
            limit = cfg.max_upload_bytes if (upload and method == "POST") else cfg.max_body_bytes
            length = headers.get("content-length")
            if length is not None and not length.isdigit():
                await reply(ApiError(400, "bad_request", "the Content-Length header is not a number"))
                return
            if length is not None and int(length) > limit:
                await reply(ApiError(413, "payload_too_large", BodyTooLarge(limit).detail))
                return
            public = path in PUBLIC_PATHS or path in PUBLIC_STUDIO_PATHS or (path in DOC_PATHS and cfg.public_docs)
            if not public:
                if ingress is None:
                    await reply(ApiError(503, "not_ready", "the service is starting", headers={"Retry-After": "2"}))
                    return
                try:
                    scope["imagegen.key"] = key = await ingress.authenticate(headers)
                    ingress.limits.admit(key)
                except ApiError as exc:
                    await reply(exc)
                    return
            timing.mark("auth")
            received = 0
            scanner = DepthScanner(cfg.max_json_depth) if is_json(headers.get("content-type", "")) else None

            async def receive_wrapper() -> dict:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    chunk = message.get("body", b"")
                    received += len(chunk)
                    if not message.get("more_body", False):
                        timing.mark("body")
                    if received > limit:
                        raise BodyTooLarge(limit)
                    if scanner is not None:
                        try:
                            scanner.feed(chunk)
                        except JsonTooDeep:
                            raise JsonBodyTooDeep(scanner.max_depth) from None
                return message

            try:
                await self.app(scope, receive_wrapper, send_wrapper)
            except BodyTooLarge as exc:
                if not status_holder["started"]:
                    await reply(ApiError(413, "payload_too_large", exc.detail))
            except JsonBodyTooDeep as exc:
                if not status_holder["started"]:
                    await reply(ApiError(422, "json_too_deep", exc.detail))
        finally:
            if ingress is not None:
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                status = str(status_holder["status"])
                ingress.metrics.requests.labels(template, method, status).inc()
                ingress.metrics.latency.labels(template, method).observe(time.perf_counter() - timing.started)


def request_id_of(request: Request) -> str | None:
    return request.scope.get("imagegen.request_id")


def install_error_handlers(api: FastAPI) -> None:
    """One JSON error shape for every failure, with the request id."""

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc, request_id_of(request))

    @api.exception_handler(ImagegenError)
    async def _imagegen_error(request: Request, exc: ImagegenError) -> JSONResponse:
        error = ApiError.from_imagegen(exc)
        if exc.code == "invalid_character_id" and request.url.path in ("/v1/renders", "/v1/jobs"):
            error.field = "character"  # the body field is `character` (the registry says character_id)
        return error_response(error, request_id_of(request))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(exc.errors())), request_id_of(request))

    @api.exception_handler(ValidationError)
    async def _pydantic_error(request: Request, exc: ValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors(include_url=False)), request_id_of(request))

    @api.exception_handler(JsonBodyTooDeep)
    async def _json_too_deep(request: Request, exc: JsonBodyTooDeep) -> JSONResponse:
        return error_response(ApiError(422, "json_too_deep", str(exc.detail)), request_id_of(request))

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = STATUS_CODES.get(exc.status_code, "http_error")
        error = ApiError(exc.status_code, code, str(exc.detail), None, dict(exc.headers or {}))
        return error_response(error, request_id_of(request))

    @api.exception_handler(BackPressureError)
    async def _backpressure(request: Request, exc: BackPressureError) -> JSONResponse:
        ingress = getattr(request.app.state, "ingress", None)
        retry = ingress.cfg.retry_after_s if ingress else 2
        return error_response(renderer_overloaded(exc, retry), request_id_of(request))

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        body = error_body(
            "internal_error", f"unexpected server error ({type(exc).__name__}); request id {request_id_of(request)}"
        )
        return JSONResponse(body, status_code=500)
