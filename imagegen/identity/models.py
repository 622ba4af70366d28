"""Core types of the character registry (pydantic models) and the errors they raise.

A model that is given a wrong value raises one of the specific ``ImagegenError`` subclasses below
(never a bare ``pydantic.ValidationError``), with a message that says what to change, so the CLI
and the HTTP layer can show it as it is.

Face analyses are plain JSON-serialisable data (lists of floats, dicts); numpy arrays, numpy
scalars and CPU/GPU torch tensors are accepted and converted. This module does not import
``imagegen.faces``: any object with the attributes ``bbox``, ``landmarks``, ``det_score``,
``embedding``, ``model_version`` (a dataclass ``Face`` for instance) validates as a
``FaceAnalysis``.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import re
from datetime import UTC, datetime
from pathlib import PureWindowsPath
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from imagegen.blobstore import validate_digest
from imagegen.errors import ImagegenError
from imagegen.ids import DEFAULT_TENANT, validate_character_id, validate_tenant_id
from imagegen.ids import InvalidCharacterIdError as InvalidCharacterIdError  # re-exported: the registry raises it
from imagegen.ids import InvalidTenantIdError as InvalidTenantIdError  # re-exported: the registry raises it
from imagegen.ids import shown as _shown
from imagegen.text import hidden_character

#: backend, method and version names: short, no path separators
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
MAX_EMBEDDING_DIM = 8192
MAX_TEXT = 20_000

ProvenanceKind = Literal["synthetic", "consented", "licensed"]
Status = Literal["draft", "approved"]
AgeCheck = Literal["passed", "unverified", "failed"]
STATUSES: tuple[str, ...] = ("draft", "approved")
AGE_CHECKS: tuple[str, ...] = ("passed", "unverified", "failed")
PROVENANCE_KINDS: tuple[str, ...] = ("synthetic", "consented", "licensed")


# -- errors ----------------------------------------------------------------------------------------
class RegistryError(ImagegenError):
    """Base class of the character registry's errors."""

    code = "registry_error"


class InvalidCharacterError(RegistryError):
    """A character field (name, card, status...) with a wrong value."""

    code = "invalid_character"
    field = "character"


class ProvenanceError(RegistryError):
    """Missing or invalid provenance (where a character comes from)."""

    code = "invalid_provenance"
    field = "provenance"


class InvalidReferenceError(RegistryError):
    """A reference image or face analysis that cannot be stored."""

    code = "invalid_reference"
    field = "references"


class InvalidEmbeddingError(RegistryError):
    """An embedding that is not a finite 1-D vector."""

    code = "invalid_embedding"
    field = "embedding"


class DuplicateCharacterError(RegistryError):
    """A character id that is already registered."""

    code = "duplicate_character"
    field = "character_id"


class UnknownCharacterError(RegistryError):
    """A character id that is not registered."""

    code = "unknown_character"
    field = "character_id"


class UnknownProtectedIdentityError(RegistryError):
    """A protected-identity id that is not in the gallery."""

    code = "unknown_protected_identity"
    field = "identity_id"


class StaleConditioningError(RegistryError):
    """Conditioning computed from a character version that has since changed."""

    code = "stale_conditioning"
    field = "character_version"


# -- helpers ---------------------------------------------------------------------------------------
def validate_name(value: object, what: str) -> str:
    """A backend / method / version name: 1-64 characters of ``[A-Za-z0-9_.+-]``."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise InvalidCharacterError(
            f"{_shown(value)} is not a valid {what}: use 1 to 64 characters among letters, digits, "
            "'_', '.', '+' and '-', starting with a letter or a digit",
            field=what.replace(" ", "_"),
        )
    return value


def to_plain(value: Any) -> Any:
    """Numpy arrays/scalars and torch tensors to Python lists/scalars; tuples to lists."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def jsonable(value: Any, what: str) -> Any:
    """``value`` converted to plain JSON data, or ``InvalidCharacterError`` saying what is wrong.

    NaN and infinities are refused: PostgreSQL's JSON type does not store them.
    """
    value = to_plain(value)

    def check(v: Any, where: str) -> None:
        if v is None or isinstance(v, str | bool | int):
            return
        if isinstance(v, float):
            if not math.isfinite(v):
                raise InvalidCharacterError(f"{what}{where} is {v}; store finite numbers (or null) only")
            return
        if isinstance(v, list):
            for i, item in enumerate(v):
                check(item, f"{where}[{i}]")
            return
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise InvalidCharacterError(f"{what}{where} has the key {k!r}; use string keys only")
                check(item, f"{where}[{k!r}]")
            return
        raise InvalidCharacterError(
            f"{what}{where} holds a {type(v).__name__}; store JSON data only "
            "(strings, numbers, booleans, null, lists, dicts with string keys)"
        )

    check(value, "")
    return value


def as_embedding(value: Any, what: str = "embedding") -> list[float]:
    """A finite 1-D vector (list, numpy array, torch tensor) as a list of Python floats."""
    try:
        arr = np.asarray(to_plain(value), dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidEmbeddingError(
            f"{what} must be a 1-D vector of numbers (a list or a numpy array), got {_shown(value)}"
        ) from None
    if arr.ndim != 1 or not 1 <= arr.shape[0] <= MAX_EMBEDDING_DIM:
        raise InvalidEmbeddingError(
            f"{what} must be a 1-D vector of 1 to {MAX_EMBEDDING_DIM} numbers, got shape {arr.shape}; "
            "pass one face's embedding (flatten a (1, D) array with arr[0])"
        )
    if not np.isfinite(arr).all():
        raise InvalidEmbeddingError(f"{what} contains NaN or infinite values; recompute it from the image")
    return arr.tolist()


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


class _Model(BaseModel):
    """Base model: unknown fields are refused and errors become the class's ``ImagegenError``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    _error: ClassVar[type[RegistryError]] = InvalidCharacterError
    _what: ClassVar[str] = "value"
    _hint: ClassVar[str] = ""

    @classmethod
    def _precheck(cls, data: Any) -> Any:
        return data

    @model_validator(mode="wrap")
    @classmethod
    def _teach(cls, data: Any, handler: Any) -> Any:
        data = cls._precheck(data)
        try:
            return handler(data)
        except ValidationError as exc:
            hint = f" ({cls._hint})" if cls._hint else ""
            raise cls._error(f"invalid {cls._what}: {_describe(exc)}{hint}") from None


# -- the card and the provenance -------------------------------------------------------------------
class Card(_Model):
    """The character card: free text an artist writes, plus optional extra JSON data."""

    _what = "character card"
    _hint = "a card has the text fields look, personality, style_notes and an optional dict extra"

    look: str = Field(default="", max_length=MAX_TEXT)
    personality: str = Field(default="", max_length=MAX_TEXT)
    style_notes: str = Field(default="", max_length=MAX_TEXT)
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("extra", mode="before")
    @classmethod
    def _extra_is_json(cls, value: Any) -> Any:
        if value is None:
            return {}
        return jsonable(value, "card.extra")


class Provenance(_Model):
    """Where a character comes from: synthetic, consented (a real person who agreed) or licensed."""

    _error = ProvenanceError
    _what = "provenance"
    _hint = (
        "give kind ('synthetic', 'consented' or 'licensed'), creator (who made or supplied it), "
        "date, and evidence (where the consent form or licence is)"
    )

    kind: ProvenanceKind
    creator: str = Field(max_length=256)
    date: dt.date = Field(default_factory=lambda: datetime.now(UTC).date())
    evidence: str = Field(default="", max_length=4000)

    @field_validator("creator", "evidence", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _complete(self) -> Provenance:
        if not self.creator:
            raise ProvenanceError(
                "provenance.creator is empty: name who made or supplied this character "
                "(a person or a team), e.g. creator='studio-art-team'"
            )
        if self.kind in ("consented", "licensed") and not self.evidence:
            raise ProvenanceError(
                f"a {self.kind} character needs provenance.evidence: say where the "
                f"{'signed consent' if self.kind == 'consented' else 'licence'} is kept "
                "(a document id, a URL, a ticket)"
            )
        return self


# -- faces and references --------------------------------------------------------------------------
class FaceAnalysis(_Model):
    """One face backend's analysis of a reference image (JSON-serialisable)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, from_attributes=True)

    _error = InvalidReferenceError
    _what = "face analysis"
    _hint = "give bbox [x1, y1, x2, y2], landmarks [[x, y], ...], det_score, embedding, model_version"

    bbox: list[float] = Field(min_length=4, max_length=4)
    landmarks: list[list[float]] = Field(default_factory=list, max_length=256)
    det_score: float
    embedding: list[float]
    model_version: str = Field(min_length=1, max_length=128)
    #: the backend that produced it (filled from the key it is stored under)
    backend: str | None = None
    #: free measurements for the reference report (sharpness, pose, apparent age ...)
    quality: dict[str, Any] = Field(default_factory=dict)

    @field_validator("bbox", "landmarks", "det_score", mode="before")
    @classmethod
    def _plain(cls, value: Any) -> Any:
        return to_plain(value)

    @field_validator("landmarks")
    @classmethod
    def _points(cls, value: list[list[float]]) -> list[list[float]]:
        for point in value:
            if len(point) != 2:
                raise ValueError("each landmark is one [x, y] point")
            if not all(math.isfinite(c) for c in point):
                raise ValueError("landmarks must be finite")
        return value

    @field_validator("bbox", "det_score")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("must be finite")
        return value

    @field_validator("embedding", mode="before")
    @classmethod
    def _embedding(cls, value: Any) -> list[float]:
        return as_embedding(value, "face analysis embedding")

    @field_validator("quality", mode="before")
    @classmethod
    def _quality(cls, value: Any) -> Any:
        if value is None:
            return {}
        return jsonable(value, "face analysis quality")

    def as_array(self) -> np.ndarray:
        """The embedding as a float32 numpy array."""
        return np.asarray(self.embedding, dtype=np.float32)


def _faces_by_backend(value: Any) -> Any:
    """Check backend names and fill ``FaceAnalysis.backend`` from the key."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidReferenceError(
            f"faces must map a face backend name to its analysis, e.g. {{'dlib': {{...}}}}, got {_shown(value)}"
        )
    out: dict[str, FaceAnalysis] = {}
    for backend, analysis in value.items():
        validate_name(backend, "face backend name")
        face = analysis if isinstance(analysis, FaceAnalysis) else FaceAnalysis.model_validate(analysis)
        if face.backend not in (None, backend):
            raise InvalidReferenceError(
                f"the analysis stored under {backend!r} says it comes from backend {face.backend!r}; "
                "store each analysis under its own backend's name"
            )
        out[backend] = face.model_copy(update={"backend": backend})
    return out


def _filename(value: Any) -> Any:
    """Keep only the last component of an original filename (it is metadata, never a path)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return PureWindowsPath(value.replace("\x00", "")).name[:255]
    return value


class Reference(_Model):
    """A stored reference image: its blob digest, image facts and per-backend face analyses."""

    _error = InvalidReferenceError
    _what = "reference"

    digest: str
    mime_type: str = Field(min_length=1, max_length=64)
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    size: int = Field(ge=0)
    filename: str = ""
    faces: dict[str, FaceAnalysis] = Field(default_factory=dict)

    @field_validator("digest", mode="before")
    @classmethod
    def _digest(cls, value: Any) -> str:
        return validate_digest(value)

    @field_validator("faces", mode="before")
    @classmethod
    def _faces(cls, value: Any) -> Any:
        return _faces_by_backend(value)

    @field_validator("filename", mode="before")
    @classmethod
    def _filename(cls, value: Any) -> Any:
        return _filename(value)


class ReferenceInput(_Model):
    """A reference image to register: its (already normalised) bytes and face analyses.

    ``mime_type``, ``width`` and ``height`` are read from the image when left out; given values
    must agree with it.
    """

    _error = InvalidReferenceError
    _what = "reference image"

    data: bytes = Field(repr=False, min_length=1)
    filename: str = ""
    mime_type: str | None = None
    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)
    faces: dict[str, FaceAnalysis] = Field(default_factory=dict)

    @field_validator("data", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> Any:
        if isinstance(value, bytearray | memoryview):
            return bytes(value)
        if not isinstance(value, bytes):
            raise InvalidReferenceError(
                f"reference data must be the image file's bytes, got a {type(value).__name__}; "
                "read the file with Path.read_bytes()"
            )
        return value

    @field_validator("faces", mode="before")
    @classmethod
    def _faces(cls, value: Any) -> Any:
        return _faces_by_backend(value)

    @field_validator("filename", mode="before")
    @classmethod
    def _filename(cls, value: Any) -> Any:
        return _filename(value)

    @model_validator(mode="after")
    def _image_facts(self) -> ReferenceInput:
        from PIL import Image

        label = self.filename or "reference image"
        try:
            with Image.open(io.BytesIO(self.data)) as image:
                fmt = image.format
                width, height = image.size
                mime = Image.MIME.get(fmt or "", None)
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a bad file
            reason = str(exc).split(" <_io.")[0] or type(exc).__name__
            raise InvalidReferenceError(
                f"{label} is not an image Pillow can read ({reason}); pass PNG, JPEG or WebP bytes"
            ) from None
        if mime is None:
            raise InvalidReferenceError(f"{label} has the image format {fmt!r}, which has no MIME type")
        for given, actual, name in (
            (self.mime_type, mime, "mime_type"),
            (self.width, width, "width"),
            (self.height, height, "height"),
        ):
            if given is not None and given != actual:
                raise InvalidReferenceError(
                    f"{label}: {name} is given as {given!r} but the image says {actual!r}; "
                    f"leave {name} out to read it from the image"
                )
        # set through __dict__: validate_assignment would re-run this validator
        self.__dict__.update(mime_type=mime, width=width, height=height)
        return self


# -- the character ---------------------------------------------------------------------------------
class Character(_Model):
    """A registered (or to-be-registered) character.

    ``version``, ``created_at``, ``updated_at`` and ``references`` are filled by the registry;
    ``register`` ignores the values given for the first three. ``tenant`` owns the character: a
    key of another tenant neither sees nor renders it (the service enforces that; ``admin`` keys
    span tenants).
    """

    _what = "character"

    id: str
    tenant: str = DEFAULT_TENANT
    name: str = Field(min_length=1, max_length=200)
    card: Card = Field(default_factory=Card)
    provenance: Provenance
    status: Status = "draft"
    version: int = Field(default=1, ge=1)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    #: apparent-age gate result, filled by the safeguards module
    age_check: AgeCheck = "unverified"
    #: whether the last reference report passed (None: never recorded); a draft is previewed
    #: (``--allow-draft``) only when it did
    report_passed: bool | None = Field(default=None, strict=True)
    references: list[Reference] = Field(default_factory=list)
    #: identity centroid per face backend (mean of the references' embeddings, computed elsewhere)
    centroids: dict[str, list[float]] = Field(default_factory=dict)

    @classmethod
    def _precheck(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "id" in data:
                validate_character_id(data["id"])
            if data.get("provenance") is None:
                who = f"character {data['id']!r}" if isinstance(data.get("id"), str) else "a character"
                raise ProvenanceError(
                    f"{who} has no provenance: say where it comes from, e.g. provenance="
                    "{'kind': 'synthetic', 'creator': 'your-team', 'evidence': ''} "
                    "(kind is 'synthetic', 'consented' or 'licensed')"
                )
        return data

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, value: Any) -> str:
        return validate_character_id(value)

    @field_validator("tenant", mode="before")
    @classmethod
    def _tenant(cls, value: Any) -> str:
        return validate_tenant_id(value)

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        hidden = hidden_character(value)
        if hidden is not None:
            raise ValueError(
                f"the name holds an invisible control or text-direction character (U+{ord(hidden):04X}); "
                "use visible text"
            )
        return value.strip()

    @field_validator("created_at", "updated_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    @field_validator("centroids", mode="before")
    @classmethod
    def _centroids(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise InvalidCharacterError("centroids must map a face backend name to an embedding")
        return {validate_name(k, "face backend name"): as_embedding(v, f"centroid of {k!r}") for k, v in value.items()}

    @property
    def digests(self) -> list[str]:
        """The blob digests of the references, in order."""
        return [r.digest for r in self.references]

    def centroid(self, backend: str) -> np.ndarray | None:
        """The identity centroid for ``backend`` as float32, or None when none is stored."""
        value = self.centroids.get(backend)
        return None if value is None else np.asarray(value, dtype=np.float32)


class ProtectedIdentity(_Model):
    """An entry of the protected-identity gallery: an embedding (never an image) and a label."""

    id: int
    label: str = Field(min_length=1, max_length=200)
    backend: str
    embedding: list[float]
    note: str = ""
    created_at: datetime

    @field_validator("embedding", mode="before")
    @classmethod
    def _embedding(cls, value: Any) -> list[float]:
        return as_embedding(value, "protected identity embedding")

    def as_array(self) -> np.ndarray:
        return np.asarray(self.embedding, dtype=np.float32)


def dumps_json(value: Any) -> str:
    """Stable JSON for manifests and dumps."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False, indent=2, default=str)
