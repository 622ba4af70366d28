"""Request and response bodies of the HTTP API (they are what /docs shows)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from imagegen.identity.registry.characters import DeleteReport
from imagegen.pipelines.types import RenderRequest


class RenderBody(RenderRequest):
    """A render: every ``RenderRequest`` field, plus the preset, the image count and the consistency gate.

    Image *i* uses seed ``seed + i``; attempt *a* of the gate for image *i* uses
    ``seed + i + a * num_images`` (the "next seed" that no other image of the request uses).
    A missing seed is drawn once per request and reported.

    Strict: numbers and booleans must be JSON numbers and booleans (``"2"`` or ``true`` for an
    integer is a 422, not 2 or 1); an integer is still a valid float (``"guidance": 3``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    preset: str = Field(default="tiny-flux", min_length=1, max_length=64, description="Model preset.")
    num_images: int = Field(default=1, ge=1, description="Images to render (the server caps it).")
    #: consistency gate: the similarity (face backend's scale) each image must reach; needs a character
    min_identity_similarity: float | None = Field(default=None, ge=-1, le=1)
    #: consistency gate: render attempts per image (each a new seed) before giving up
    max_attempts: int | None = Field(default=None, ge=1)

    def render_request(self) -> RenderRequest:
        return RenderRequest(**self.model_dump(include=set(RenderRequest.model_fields)))


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class GateAttempt(BaseModel):
    seed: int
    similarity: float | None = None
    passed: bool = False
    problem: str | None = None


class GateReport(BaseModel):
    min_identity_similarity: float
    backend: str
    passed: bool
    winning_seed: int | None
    attempts: list[GateAttempt]


class ImageOut(BaseModel):
    index: int
    image_id: str
    seed: int
    width: int | None = None
    height: int | None = None
    png_base64: str | None = None
    url: str | None = None
    problem: str | None = None
    identity_similarity: float | None = None
    gate: GateReport | None = None
    watermark: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)


class RenderOut(BaseModel):
    request_id: str
    preset: str
    character: str | None = None
    character_version: int | None = None
    images: list[ImageOut]
    timings: dict[str, float] = Field(default_factory=dict)


class DesignJobResult(BaseModel):
    """What a design job (a rendering step of ``/v1/designs``) ends with; its images live in the design."""

    design_id: str
    #: the step: ``describe``, ``turnaround`` or ``reroll``
    op: str
    #: the design's stage and status once the step was recorded
    stage: str
    status: str
    #: images the step rendered (``GET /v1/designs/{design_id}`` lists them)
    rendered: int = 0
    #: always empty: a design job's images are fetched through its design, not ``/v1/jobs/{id}/images``
    images: list[ImageOut] = Field(default_factory=list)


class JobOut(BaseModel):
    job_id: str
    #: ``render``: ``POST /v1/jobs`` (result: ``RenderOut``); ``design``: a step of ``/v1/designs``
    #: (result: ``DesignJobResult``)
    kind: Literal["render", "design"] = "render"
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    preset: str
    attempts: int
    progress: dict[str, Any] = Field(default_factory=dict)
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    error: ErrorDetail | None = None
    result: RenderOut | DesignJobResult | None = None
    links: dict[str, str] = Field(default_factory=dict)


class JobList(BaseModel):
    jobs: list[JobOut]


class CharacterSummary(BaseModel):
    id: str
    #: the tenant that owns the character (a key sees only its own tenant's; admin sees all)
    tenant: str
    name: str
    status: Literal["draft", "approved"]
    version: int
    references: int
    provenance: dict[str, Any]
    age_check: str | None = None
    centroid_backends: list[str] = Field(default_factory=list)
    created_at: str | None = None
    updated_at: str | None = None


class CharacterList(BaseModel):
    characters: list[CharacterSummary]


class RegistrationOut(BaseModel):
    """A registration or an approval: the character, its reference report and its age check."""

    character: CharacterSummary
    report: dict[str, Any]
    age_check: dict[str, Any]


class DeleteOut(BaseModel):
    #: what deleting a character removed (blobs another character still uses are kept and counted)
    deleted: DeleteReport
    #: what went from the service's own records: jobs (rows and events), their result images,
    #: audit rows redacted to the watermark tag, hashes, times and key id
    renders: dict[str, int] = {}
