"""One JSON error shape for every failure: ``{"error": {"code", "message", "field"}}``.

``ImagegenError`` subclasses carry ``code`` and ``field``; ``status_for`` maps a code to the HTTP
status (unknown things 404, conflicts 409, too large 413, invalid input 422, the rest 400;
capacity problems 429 / 503 with ``Retry-After``).
"""

from __future__ import annotations

from typing import Any

from imagegen.errors import ImagegenError

NOT_FOUND = {
    "unknown_character",
    "unknown_preset",
    "unknown_protected_identity",
    "unknown_job",
    "unknown_key",
    "not_found",
}
CONFLICT = {
    "duplicate_character",
    "approval_refused",
    "character_not_renderable",
    "age_unverified",
    "age_check_failed",
    "job_finished",
}
TOO_LARGE = {"image_too_large", "upload_too_large"}
UNPROCESSABLE_PREFIXES = ("invalid_",)
UNPROCESSABLE = {
    "validation_error",
    "no_face",
    "embedding_mismatch",
    "protected_identity",
    "age_gate",
    "safeguard_refused",
    "stale_conditioning",
    "not_an_image",
    "unsupported_method",
    "identity_error",
}
UNAVAILABLE = {
    "model_not_available",
    "renderer_unavailable",
    "renderer_overloaded",
    "registry_error",
    "storage_unavailable",
}
INTERNAL = {"config_error", "unknown_face_backend", "bad_output", "render_failed", "internal_error"}


def status_for(code: str) -> int:
    if code in NOT_FOUND:
        return 404
    if code in CONFLICT:
        return 409
    if code in TOO_LARGE:
        return 413
    if code in UNPROCESSABLE or code.startswith(UNPROCESSABLE_PREFIXES):
        return 422
    if code in UNAVAILABLE:
        return 503
    if code in INTERNAL:
        return 500
    return 400


class ApiError(Exception):
    """An error response: status, code, message, field and extra headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    @classmethod
    def from_imagegen(cls, exc: ImagegenError) -> ApiError:
        return cls(status_for(exc.code), exc.code, str(exc), exc.field)

    @classmethod
    def from_code(cls, code: str, message: str, field: str | None = None, **kwargs: Any) -> ApiError:
        return cls(status_for(code), code, message, field, **kwargs)

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.field)


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


def too_busy(code: str, message: str, retry_after_s: int, status: int = 429) -> ApiError:
    return ApiError(status, code, message, None, {"Retry-After": str(int(retry_after_s))})


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """A pydantic / FastAPI validation failure as one 422: the first problem names the field."""
    parts, field = [], None
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header", "form")]
        where = ".".join(loc)
        if field is None and where:
            field = where
        msg = str(err.get("msg", "invalid value"))
        parts.append(f"{where}: {msg}" if where else msg)
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more")
    return ApiError(422, "validation_error", "; ".join(parts) or "invalid request", field)
