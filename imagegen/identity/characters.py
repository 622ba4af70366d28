"""Registering and approving characters: ingestion, analysis, safeguards and the registry, in order.

This is the one place that strings the identity parts together, so the CLI and the HTTP API do
exactly the same thing, and archive import (``identity/archive.py``) registers through
``register_character`` too. Everything that can refuse (ids, images, provenance, the protected
gallery, the age gate) runs *before* the registry is touched: a refused registration changes
nothing. Images are checked from their raw bytes and headers before any is decoded
(``identity/ingest.py``: per-image and per-request pixel limits, duplicates by hash), so an upload
that is cheap to send cannot be expensive to refuse.

Every registration and approval records whether the reference report passed
(``Character.report_passed``): ``render --allow-draft`` renders only drafts whose report passed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagegen.errors import ImagegenError
from imagegen.faces import FaceAnalyzer, FaceResult, get_analyzer
from imagegen.identity.ingest import MAX_REQUEST_PIXELS, IngestedImage, ingest_images
from imagegen.identity.models import (
    Card,
    Character,
    DuplicateCharacterError,
    FaceAnalysis,
    Provenance,
    ReferenceInput,
)
from imagegen.identity.references import ReferenceReport, analyze_set, contact_sheet, set_centroid
from imagegen.identity.registry import Registry
from imagegen.identity.safeguards import AgeCheck, check_age, check_protected, find_age_estimator
from imagegen.ids import DEFAULT_TENANT, validate_new_character_id, validate_tenant_id
from imagegen.settings import Settings, get_settings

MAX_REFERENCES = 32


class ApprovalError(ImagegenError):
    code = "approval_refused"
    field = "status"


@dataclass
class Registration:
    """What registering (or re-checking) a character produced."""

    character: Character
    report: ReferenceReport
    age: AgeCheck
    images: list[IngestedImage]
    results: list[FaceResult]

    def write_artifacts(self, directory: Path) -> dict[str, Path]:
        """The reference report (JSON) and the contact sheet (PNG) into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        report_path = directory / f"{self.character.id}-report.json"
        sheet_path = directory / f"{self.character.id}-contact-sheet.png"
        payload = {"character": self.character.id, "age_check": self.age.__dict__, **self.report.to_dict()}
        report_path.write_text(json.dumps(payload, indent=2, default=str))
        contact_sheet([i.image for i in self.images], self.results, self.report).save(sheet_path)
        return {"report": report_path, "contact_sheet": sheet_path}


def ingest_all(
    files: list[tuple[str, bytes]], *, max_request_pixels: int | None = MAX_REQUEST_PIXELS
) -> list[IngestedImage]:
    """Every reference of one request through ingestion (limits and duplicates before any decode).

    ``max_request_pixels=None`` skips the per-request pixel budget: for references that are
    stored already (they passed ingestion once, and may predate the budget).
    """
    if not files:
        raise ImagegenError("a character needs at least one reference image", field="references")
    if len(files) > MAX_REFERENCES:
        raise ImagegenError(f"{len(files)} references is more than the {MAX_REFERENCES} allowed", field="references")
    return ingest_images(files, max_request_pixels=max_request_pixels)


def analyze_and_check(
    registry: Registry, images: list[IngestedImage], analyzer: FaceAnalyzer, settings: Settings
) -> tuple[list[FaceResult], ReferenceReport, AgeCheck]:
    """The reference report plus the safeguards that refuse outright (protected gallery, age gate)."""
    results, report = analyze_set(images, analyzer)
    names = [i.filename for i in images]
    check_protected(registry, results, names, analyzer.name)
    age = check_age(
        [np.asarray(i.image) for i in images],
        results,
        names,
        find_age_estimator(settings),
        settings.min_apparent_age,
        settings.strict_age_gate,
    )
    return results, report, age


def _face_analysis(result: FaceResult, report: ReferenceReport, index: int) -> dict[str, FaceAnalysis]:
    if result.face is None:
        return {}
    quality = report.to_dict()["images"][index]
    return {report.backend: FaceAnalysis.model_validate({**result.face.to_dict(), "quality": quality})}


def register_character(
    registry: Registry,
    *,
    character_id: str,
    name: str,
    provenance: Provenance | dict,
    files: list[tuple[str, bytes]],
    card: Card | dict | None = None,
    analyzer: FaceAnalyzer | None = None,
    settings: Settings | None = None,
    tenant: str = DEFAULT_TENANT,
    max_request_pixels: int = MAX_REQUEST_PIXELS,
) -> Registration:
    """Validate, analyse, check and store a new character (as ``draft``, owned by ``tenant``); all or nothing.

    ``max_request_pixels``: the budget over all references' headers (``ingest.MAX_REQUEST_PIXELS``).
    """
    settings = settings or get_settings()
    character = Character(
        id=validate_new_character_id(character_id),
        name=name,
        card=card or Card(),
        provenance=provenance,
        tenant=validate_tenant_id(tenant),
    )
    if registry.characters.exists(character.id):  # fail before the (slow) analysis
        raise DuplicateCharacterError(
            f"a character with id {character.id!r} is already registered; pick another id or delete it first"
        )
    images = ingest_all(files, max_request_pixels=max_request_pixels)
    results, report, age = analyze_and_check(registry, images, analyzer or get_analyzer(), settings)
    centroid = set_centroid(results, report)
    stored = character.model_copy(
        update={
            "age_check": age.status,
            "report_passed": report.passed,
            "centroids": {} if centroid is None else {report.backend: centroid.tolist()},
        }
    )
    references = [
        ReferenceInput(data=image.png_bytes, filename=image.filename, faces=_face_analysis(result, report, index))
        for index, (image, result) in enumerate(zip(images, results, strict=True))
    ]
    saved = registry.characters.register(stored, references)
    return Registration(saved, report, age, images, results)


def recheck_character(
    registry: Registry,
    character_id: str,
    analyzer: FaceAnalyzer | None = None,
    settings: Settings | None = None,
) -> Registration:
    """Re-run the analysis and every safeguard on a stored character's references.

    The protected gallery may have grown and an age estimator may have been installed since the
    character was registered, so approval checks again instead of trusting old results.
    """
    settings = settings or get_settings()
    character = registry.characters.get(character_id)
    files = [
        (ref.filename or ref.digest[:12], registry.characters.reference_bytes(character.id, ref.digest))
        for ref in character.references
    ]
    images = ingest_all(files, max_request_pixels=None)
    results, report, age = analyze_and_check(registry, images, analyzer or get_analyzer(), settings)
    return Registration(character, report, age, images, results)


def approve_character(
    registry: Registry,
    character_id: str,
    analyzer: FaceAnalyzer | None = None,
    settings: Settings | None = None,
) -> Registration:
    """Approve a character whose references pass the report and the safeguards.

    The fresh report's verdict is recorded either way (``report_passed``), so a draft whose
    report no longer passes is not rendered with ``--allow-draft`` either.
    """
    settings = settings or get_settings()
    check = recheck_character(registry, character_id, analyzer, settings)
    registry.characters.set_report_passed(character_id, check.report.passed)
    if not check.report.passed:
        raise ApprovalError(
            f"'{character_id}' cannot be approved: its reference report fails: " + "; ".join(check.report.reasons)
        )
    registry.characters.set_age_check(character_id, check.age.status)
    approved = registry.characters.approve(character_id)
    return Registration(approved, check.report, check.age, check.images, check.results)
