"""A character's library, as its page shows it: references, contact sheet, reference report, recent renders.

Every call names its ``Caller``; a character of another tenant is answered exactly like a missing
one (``tenancy.character_for``), and so is a render or an image of it.

The reference report and contact sheet are rebuilt from what registration stored — each
reference's bytes and its face analysis (box, landmarks, embedding, face count) — with the same
``references.build_report`` / ``contact_sheet`` code registration ran, so no face model is
loaded and the report is the one the character was registered or last approved with. They are
kept per (character, version, backend) in a small cache: a new version (references changed,
approval) or a delete (versions never restart) never serves an old sheet.

Recent renders are the ``character_renders`` rows the render service writes for every served
image of a character (sync renders and jobs): prompt, method, identity weight, seed, similarity,
the gate's threshold and whether it passed. A job's image stays fetchable while its job is kept
(``job_ttl_s``); a synchronous render's PNG went back in its response and was never stored.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from imagegen.faces import Face, FaceResult
from imagegen.faces.similarity import metric_for
from imagegen.identity.models import Character, Reference
from imagegen.identity.registry import Registry
from imagegen.serve.audit import AuditWriter
from imagegen.serve.errors import ApiError
from imagegen.serve.store import ServeStore
from imagegen.serve.tenancy import Caller, character_for

#: contact sheets and reports kept in memory (each a few hundred KB)
CACHE_SIZE = 16


@dataclass(frozen=True)
class ReferenceSheet:
    """A character's reference report (JSON-ready) and its contact sheet (PNG bytes)."""

    report: dict[str, Any]
    contact_sheet: bytes


def chosen_backend(character: Character, preferred: str) -> str:
    """The face backend whose stored analyses describe ``character``: ``preferred`` (the service's) if it has
    any, else the first one it has."""
    have = set(character.centroids) | {b for ref in character.references for b in ref.faces}
    if preferred in have or not have:
        return preferred
    return sorted(have)[0]


def stored_result(reference: Reference, backend: str) -> FaceResult:
    """The face analysis registration stored for ``reference``, as the ``FaceResult`` it came from.

    Only the largest face was stored: the others (``face_count`` in its quality record) count for
    the report's "several faces" flag and are given as placeholders.
    """
    size = (reference.width, reference.height)
    analysis = reference.faces.get(backend)
    if analysis is None:
        return FaceResult(None, image_size=size)
    landmarks = np.asarray(analysis.landmarks, dtype=np.float32)
    if landmarks.size != 10:  # a backend that stored no 5-point landmarks: yaw is then unknown
        landmarks = np.zeros((5, 2), dtype=np.float32)
    face = Face(
        bbox=tuple(analysis.bbox),
        landmarks=landmarks,
        det_score=analysis.det_score,
        embedding=np.asarray(analysis.embedding, dtype=np.float32),
        backend=backend,
        model_version=analysis.model_version,
    )
    others = int(analysis.quality.get("face_count", 1) or 1) - 1
    placeholder = [Face(bbox=(0, 0, 0, 0), landmarks=np.zeros((5, 2)), det_score=0.0) for _ in range(max(0, others))]
    return FaceResult(face, placeholder, image_size=size)


def build_sheet(registry: Registry, character: Character, backend: str) -> ReferenceSheet:
    """The report and contact sheet of ``character``'s stored references (blocking; no face model)."""
    from imagegen.identity.characters import ingest_all
    from imagegen.identity.references import build_report, contact_sheet

    files = [
        (ref.filename or ref.digest[:12], registry.characters.reference_bytes(character.id, ref.digest))
        for ref in character.references
    ]
    images = ingest_all(files, max_request_pixels=None)
    results = [stored_result(ref, backend) for ref in character.references]
    versions = [r.face.model_version for r in results if r.face is not None]
    report = build_report(images, results, backend, versions[0] if versions else "")
    payload = {
        "character": character.id,
        "version": character.version,
        "status": character.status,
        "age_check": character.age_check,
        "source": "stored analyses",
        **report.to_dict(),
    }
    buffer = io.BytesIO()
    contact_sheet([i.image for i in images], results, report).save(buffer, format="PNG")
    return ReferenceSheet(payload, buffer.getvalue())


def face_summary(reference: Reference, backend: str) -> dict[str, Any]:
    """What the page shows under a reference: whether a face was found and the report's measurements."""
    analysis = reference.faces.get(backend)
    if analysis is None:
        return {"found": False, "backend": backend, "flags": ["no_face"], "usable": False}
    quality = analysis.quality
    return {
        "found": True,
        "backend": backend,
        "det_score": analysis.det_score,
        "bbox": list(analysis.bbox),
        "count": quality.get("face_count", 1),
        "face_px": quality.get("face_px"),
        "sharpness": quality.get("sharpness"),
        "yaw_deg": quality.get("yaw_deg"),
        "similarity": quality.get("similarity"),
        "outlier": bool(quality.get("outlier", False)),
        "usable": bool(quality.get("usable", True)),
        "flags": list(quality.get("flags", [])),
    }


class LibraryService:
    """A character's references, contact sheet, report and recent renders, for the HTTP layer."""

    def __init__(
        self,
        registry: Registry,
        store: ServeStore,
        db: Callable[..., Any],
        gate_backend: str,
        audit: AuditWriter,
    ):
        self.registry = registry
        self.store = store
        self.db = db
        self.audit = audit
        self.backend = metric_for(gate_backend).backend
        #: building a sheet decodes every reference: one at a time, beside the database pool
        self.cpu_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="library")
        self._sheets: OrderedDict[tuple[str, int, str], ReferenceSheet] = OrderedDict()
        self._lock = threading.Lock()

    async def character(self, caller: Caller, character_id: str) -> Character:
        return await self.db(character_for, self.registry, character_id, caller)

    # -- references ------------------------------------------------------------------------------
    async def references(self, caller: Caller, character_id: str) -> list[dict[str, Any]]:
        character = await self.character(caller, character_id)
        backend = chosen_backend(character, self.backend)
        return [
            {
                "index": index,
                "image_id": ref.digest,
                "filename": ref.filename,
                "mime_type": ref.mime_type,
                "width": ref.width,
                "height": ref.height,
                "size": ref.size,
                "url": f"/v1/characters/{character.id}/references/{index}",
                "face": face_summary(ref, backend),
            }
            for index, ref in enumerate(character.references)
        ]

    async def reference_image(self, caller: Caller, character_id: str, index: int) -> tuple[bytes, str]:
        """(bytes, media type) of reference ``index`` of the character."""
        character = await self.character(caller, character_id)
        if not 0 <= index < len(character.references):
            raise ApiError(
                404,
                "not_found",
                f"character {character.id!r} has {len(character.references)} references (0 to "
                f"{len(character.references) - 1}); there is no reference {index}",
                "index",
            )
        ref = character.references[index]
        data = await self.db(self.registry.characters.reference_bytes, character.id, ref.digest)
        return data, ref.mime_type

    # -- report and contact sheet ----------------------------------------------------------------
    async def sheet(self, caller: Caller, character_id: str) -> ReferenceSheet:
        character = await self.character(caller, character_id)
        backend = chosen_backend(character, self.backend)
        key = (character.id, character.version, backend)
        with self._lock:
            cached = self._sheets.get(key)
            if cached is not None:
                self._sheets.move_to_end(key)
                return cached
        built = await asyncio.get_running_loop().run_in_executor(
            self.cpu_pool, build_sheet, self.registry, character, backend
        )
        with self._lock:
            self._sheets[key] = built
            while len(self._sheets) > CACHE_SIZE:
                self._sheets.popitem(last=False)
        return built

    # -- recent renders --------------------------------------------------------------------------
    async def renders(self, caller: Caller, character_id: str, limit: int) -> list[dict[str, Any]]:
        """The caller's tenant's most recent renders of the character (every tenant's for admin), newest first."""
        character = await self.character(caller, character_id)
        await self.audit.flush()  # this replica's renders are in the store before it is read
        rows = await self.db(self.store.recent_renders, character.id, caller.tenant_filter, limit)
        stored = await self.db(self._stored_images, rows)
        return [self._render_out(character.id, row, row["image_id"] in stored) for row in rows]

    def _stored_images(self, rows: list[dict[str, Any]]) -> dict[str, str]:
        """image id -> result digest, for the rows whose job still holds the image (blocking)."""
        found: dict[str, str] = {}
        for job_id in {row["job_id"] for row in rows if row["job_id"]}:
            job = self.store.get_job(job_id)
            for image in (job.result or {}).get("images", []) if job is not None else []:
                if image.get("digest") and image.get("image_id"):
                    found[image["image_id"]] = image["digest"]
        return found

    @staticmethod
    def _render_out(character_id: str, row: dict[str, Any], stored: bool) -> dict[str, Any]:
        created = row["created_at"]
        return {
            "request_id": row["request_id"],
            "image_id": row["image_id"],
            "created_at": created.isoformat() if created is not None else None,
            "prompt": row["prompt"],
            "preset": row["preset"],
            "method": row["method"],
            "identity_weight": row["identity_weight"],
            "seed": row["seed"],
            "width": row["width"],
            "height": row["height"],
            "character_version": row["character_version"],
            "similarity": row["similarity"],
            "threshold": row["threshold"],
            "passed": row["passed"],
            "backend": row["backend"],
            "scored": row["similarity"] is not None,
            "job_id": row["job_id"],
            "image_index": row["image_index"],
            "image_url": f"/v1/characters/{character_id}/renders/{row['image_id']}" if stored else None,
        }

    async def render_image(self, caller: Caller, character_id: str, image_id: str) -> bytes:
        """The PNG of one recent render, while its job keeps it (404 ``not_found`` otherwise)."""
        character = await self.character(caller, character_id)
        await self.audit.flush()
        row = await self.db(self.store.character_render, character.id, image_id)
        missing = ApiError(
            404,
            "not_found",
            f"no stored image {image_id!r} of character {character.id!r}: a synchronous render's PNG is only in "
            "its response, a job's until the job expires",
            "image_id",
        )
        if row is None or not caller.sees(row["tenant"]) or not row["job_id"]:
            raise missing
        digest = (await self.db(self._stored_images, [row])).get(image_id)
        if digest is None:
            raise missing
        return await self.db(self.store.results.get, digest)
