"""The design flow: describe -> pick (or upload) -> turnaround -> curate -> register, as one implementation.

The CLI and the HTTP service drive the same ``DesignFlow``; only *how* images get rendered
differs, so the flow never renders itself: each step that needs images returns ``PlannedRender``s
(typed ``RenderRequest``s with what they are for) and takes back ``Rendered`` outcomes. The CLI
renders them with a local ``Renderer``; the service sends them to its renderer replicas as one
job with progress. Everything that can refuse (ids, card, preset, counts, the pick's safeguards,
the state of the design) is checked before anything is rendered or stored.

1. *describe*: N plain portraits from the card's portrait prompt, seeds ``seed + i``, each with a
   face check (``checks.py``);
2. *pick*: candidates by index, or one uploaded drawing / render / photo with the uploader's
   provenance (``consented`` / ``licensed`` + evidence), checked against the protected gallery and
   the age gate before it is used;
3. *turnaround*: one identity-conditioned render per slot of the grid (``grid.py``), conditioned on
   the pick's draft identity (``drafts.py``);
4. *curate*: the reference report over the kept slots; views the face backend cannot analyse are
   marked and left out; keep, drop or re-roll (same recipe, new seed) single slots;
5. *register*: the kept slots become the character's references, with the recipe of every one of
   them (and of their parents) in ``card.extra.design``; ``synthetic`` only when the recipe chain
   holds (``recipe.chain_problems``).
"""

from __future__ import annotations

import io
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import ValidationError

from imagegen.errors import ImagegenError, InvalidRequestError
from imagegen.faces import FaceAnalyzer, backend_family, get_analyzer
from imagegen.identity.characters import Registration, register_character
from imagegen.identity.conditioning import MAX_IDENTITY_REFERENCES
from imagegen.identity.design.checks import FaceChecker
from imagegen.identity.design.grid import GridConfig, Slot, load_grid_config
from imagegen.identity.design.recipe import chain_problems, make_recipe, pixel_digest, request_of
from imagegen.identity.design.store import DEFAULT_TTL_S, Design, DesignImage, DesignStore
from imagegen.identity.ingest import IngestedImage, ingest_image
from imagegen.identity.methods import resolve_method
from imagegen.identity.models import Card, DuplicateCharacterError, Provenance
from imagegen.identity.references import build_report
from imagegen.identity.registry import Registry
from imagegen.identity.safeguards import find_age_estimator
from imagegen.ids import validate_new_character_id, validate_tenant_id
from imagegen.pipelines.presets import get_preset
from imagegen.pipelines.types import MAX_SEED, RenderRequest
from imagegen.settings import Settings, get_settings
from imagegen.text import hidden_character

#: most candidates one describe step renders (one batched job)
MAX_CANDIDATES = 16
DEFAULT_CANDIDATES = 8
#: turnaround slot i renders with seed ``design.seed + SLOT_SEED_OFFSET + i``
SLOT_SEED_OFFSET = 1000


class DesignStateError(ImagegenError):
    """A step asked for at the wrong moment (nothing picked yet, already registered ...)."""

    code = "design_not_ready"
    field = "stage"


class DesignBusyError(DesignStateError):
    """The design is rendering; wait for its job to end."""

    code = "design_busy"
    field = "status"


class InvalidPickError(ImagegenError):
    code = "invalid_pick"
    field = "candidates"


class InvalidCurationError(ImagegenError):
    code = "invalid_curation"
    field = "slots"


class SyntheticNotAllowedError(ImagegenError):
    """``synthetic`` asked for a set whose recipe chain does not stay inside this system's renders."""

    code = "synthetic_not_allowed"
    field = "provenance"


@dataclass(frozen=True)
class PlannedRender:
    """One image a step needs: the request, what it is (candidate / slot and index), its parents."""

    kind: str
    index: int
    request: RenderRequest
    parents: tuple[str, ...] = ()
    slot: Slot | None = None


@dataclass
class Rendered:
    """What rendering one ``PlannedRender`` gave: PNG bytes and the render's metadata, or a problem."""

    png: bytes | None
    image_id: str
    metadata: dict[str, Any]
    problem: str | None = None


#: how a caller renders a step: (plans, progress(done, total)) -> outcomes in plan order
Render = Callable[[Sequence[PlannedRender]], Sequence[Rendered]]


class DesignFlow:
    """The steps of the design flow over a ``DesignStore`` and the character ``Registry``."""

    def __init__(
        self,
        store: DesignStore,
        registry: Registry,
        settings: Settings | None = None,
        analyzer: FaceAnalyzer | None = None,
        grid: GridConfig | None = None,
    ):
        self.store = store
        self.registry = registry
        self.settings = settings or get_settings()
        self._analyzer = analyzer
        self.grid = grid or load_grid_config()
        self._checker: FaceChecker | None = None

    @property
    def analyzer(self) -> FaceAnalyzer:
        if self._analyzer is None:
            self._analyzer = get_analyzer()
        return self._analyzer

    @property
    def checker(self) -> FaceChecker:
        if self._checker is None:
            self._checker = FaceChecker(self.analyzer, self.registry, find_age_estimator(self.settings), self.settings)
        return self._checker

    # -- 1. describe -------------------------------------------------------------------------------
    def start(
        self,
        *,
        character_id: str,
        name: str,
        card: Card | dict | None,
        preset: str,
        candidates: int = DEFAULT_CANDIDATES,
        seed: int | None = None,
        tenant: str,
        key_id: str | None = None,
        ttl_s: float = DEFAULT_TTL_S,
    ) -> tuple[Design, list[PlannedRender]]:
        """Create a design (``describe``, rendering) and plan its candidates; everything validated first."""
        character_id = validate_new_character_id(character_id)  # the character it becomes
        tenant = validate_tenant_id(tenant)
        name = (name or "").strip()
        if not 1 <= len(name) <= 200:
            raise InvalidRequestError("name must be 1 to 200 characters", field="name")
        if hidden_character(name) is not None:
            raise InvalidRequestError("name holds an invisible control or text-direction character", field="name")
        card_model = card if isinstance(card, Card) else Card.model_validate(card or {})
        get_preset(preset)  # an unknown preset: UnknownPresetError
        if isinstance(candidates, bool) or not isinstance(candidates, int) or not 1 <= candidates <= MAX_CANDIDATES:
            raise InvalidRequestError(f"candidates must be 1 to {MAX_CANDIDATES}", field="candidates")
        if seed is None:
            seed = random.SystemRandom().randrange(2**32)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED - 2 * SLOT_SEED_OFFSET:
            raise InvalidRequestError(f"seed must be 0 to {MAX_SEED - 2 * SLOT_SEED_OFFSET}", field="seed")
        if self.registry.characters.exists(character_id):
            raise DuplicateCharacterError(
                f"a character with id {character_id!r} is already registered; design under another id"
            )
        prompts = self.grid.portrait_prompt(name, card_model)
        _request(prompt=prompts.prompt, negative_prompt=prompts.negative_prompt)  # too long a card: refused here
        design = self.store.create(
            tenant=tenant,
            key_id=key_id,
            character_id=character_id,
            name=name,
            card=card_model.model_dump(mode="json"),
            preset=preset,
            seed=seed,
            ttl_s=ttl_s,
        )
        return design, self.candidate_plans(design, candidates)

    def candidate_plans(self, design: Design, count: int) -> list[PlannedRender]:
        prompts = self.grid.portrait_prompt(design.name, Card.model_validate(design.card))
        return [
            PlannedRender(
                "candidate",
                i,
                _request(prompt=prompts.prompt, negative_prompt=prompts.negative_prompt, seed=design.seed + i),
            )
            for i in range(count)
        ]

    def record_candidates(self, design: Design, plans: Sequence[PlannedRender], results: Sequence[Rendered]) -> Design:
        """Store the candidates with their recipes and face checks; the design is ``ready`` to pick."""
        images = self._rendered_images(plans, results)
        if not images:
            return self.fail(design, _why_none(results))
        self.store.add_images(design.id, images)
        return self.store.update(design.id, stage="describe", status="ready", error=None)

    # -- 2. pick -----------------------------------------------------------------------------------
    def pick_candidates(self, design: Design, indices: Sequence[int]) -> Design:
        """Pick candidates by index (1 to 4 of them): the turnaround's identity comes from them."""
        self._editable(design)
        candidates = {c.index: c for c in design.of_kind("candidate")}
        if not isinstance(indices, list | tuple) or not indices:
            raise InvalidPickError("pick at least one candidate: candidates: [index, ...]")
        if len(indices) > MAX_IDENTITY_REFERENCES:
            raise InvalidPickError(f"pick at most {MAX_IDENTITY_REFERENCES} candidates")
        chosen = []
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int) or index not in candidates:
                known = ", ".join(str(i) for i in sorted(candidates)) or "none"
                raise InvalidPickError(f"no candidate {str(index)[:20]!r}; this design's candidates are: {known}")
            if candidates[index] in chosen:
                raise InvalidPickError(f"candidate {index} is picked twice")
            chosen.append(candidates[index])
        self.checker.refuse_pick([(c.label, self._image(design, c), c.digest) for c in chosen])
        self.store.drop_draft_tensors(design.id)
        pick = {"source": "candidates", "image_ids": [c.id for c in chosen], "provenance": None}
        return self.store.update(design.id, pick=pick, stage="pick", status="ready", error=None)

    def pick_upload(
        self, design: Design, filename: str, data: bytes, provenance: dict[str, Any], *, creator: str | None = None
    ) -> Design:
        """Pick an uploaded drawing, render or photo: the uploader's provenance (``creator`` when it names no
        ``who``), and every safeguard first."""
        self._editable(design)
        checked = upload_provenance(provenance, creator)
        image = ingest_image(data, filename or "upload")
        digest = pixel_digest(image.image)
        face = self.checker.refuse_pick([(image.filename, image.image, digest)])[0]
        upload = DesignImage(
            id=uuid.uuid4().hex,
            kind="upload",
            index=len(design.of_kind("upload")),
            digest=digest,
            origin="upload",
            face=face.to_dict(),
        )
        self.store.add_images(design.id, [(upload, image.png_bytes)])
        self.store.drop_draft_tensors(design.id)
        pick = {"source": "upload", "image_ids": [upload.id], "provenance": checked}
        return self.store.update(design.id, pick=pick, stage="pick", status="ready", error=None)

    def pick_file(self, design: Design, filename: str, data: bytes, provenance: dict[str, Any] | None) -> Design:
        """The CLI's ``--from FILE``: one of this design's candidates (by its pixels), else an upload."""
        try:
            with Image.open(io.BytesIO(data)) as opened:
                digest = pixel_digest(opened)
        except Exception:  # noqa: BLE001 - not an image: the upload path says so properly
            digest = ""
        for candidate in design.of_kind("candidate"):
            if candidate.digest == digest:
                return self.pick_candidates(design, [candidate.index])
        if provenance is None:
            raise InvalidPickError(
                f"{filename} is not one of the candidates this design rendered; to start from your own image, "
                "give its provenance: --provenance licensed|consented --evidence ...",
                field="from",
            )
        return self.pick_upload(design, filename, data, provenance)

    # -- 3. turnaround -----------------------------------------------------------------------------
    def turnaround(self, design: Design, grid: str | dict | list | None = None, method: str | None = None):
        """Plan the turnaround over ``grid`` and mark the design rendering; returns (design, plans)."""
        if design.pick is None:
            raise DesignStateError("pick a candidate or upload an image before the turnaround")
        self._editable(design)
        slots = self.grid.resolve(grid)
        chosen = resolve_method(get_preset(design.preset), method or design.method)
        parents = tuple(self._picked(design))
        card = Card.model_validate(design.card)
        plans = []
        for i, slot in enumerate(slots):
            prompts = self.grid.slot_prompt(design.name, card, slot)
            request = _request(
                prompt=prompts.prompt,
                negative_prompt=prompts.negative_prompt,
                seed=design.seed + SLOT_SEED_OFFSET + i,
                character=design.draft_key,
                method=chosen,
                identity_weight=self.grid.identity_weight,
            )
            plans.append(PlannedRender("slot", i, request, parents, slot))
        claimed = self.store.claim(
            design.id,
            ["ready", "failed"],
            stage="turnaround",
            status="rendering",
            method=chosen,
            grid=[s.to_dict() for s in slots],
            error=None,
        )
        if not claimed:
            raise DesignBusyError("the design is rendering; wait for its job to end")
        return self.store.get(design.id), plans

    def record_slots(self, design: Design, plans: Sequence[PlannedRender], results: Sequence[Rendered]) -> Design:
        """Replace the design's slots with a new turnaround's, then run the report."""
        images = self._rendered_images(plans, results)
        if not images:
            return self.fail(design, _why_none(results))
        self.store.replace_images(design.id, [s.id for s in design.of_kind("slot")], images)
        return self.report(self.store.get(design.id))

    # -- 4. curate ---------------------------------------------------------------------------------
    def curate(
        self, design: Design, *, drop: Sequence[int] = (), keep: Sequence[int] = (), reroll: Sequence[int] = ()
    ) -> tuple[Design, list[PlannedRender]]:
        """Keep / drop slots (the report re-runs) and plan re-rolls (same recipe, a new seed)."""
        slots = {s.index: s for s in design.of_kind("slot")}
        if not slots:
            raise DesignStateError("the design has no turnaround yet")
        self._editable(design)
        for name, values in (("drop", drop), ("keep", keep), ("reroll", reroll)):
            if not isinstance(values, list | tuple) or len(values) > len(slots):
                raise InvalidCurationError(f"{name} must be a list of slot indices", field=name)
            for value in values:
                if isinstance(value, bool) or not isinstance(value, int) or value not in slots:
                    known = f"0 to {max(slots)}"
                    raise InvalidCurationError(f"{name}: no slot {str(value)[:20]!r} (slots are {known})", field=name)
        both = set(drop) & (set(keep) | set(reroll))
        if both:
            raise InvalidCurationError(f"slots {sorted(both)} are both dropped and kept or re-rolled", field="drop")
        updates = {slots[i].id: {"kept": False} for i in drop}
        updates.update({slots[i].id: {"kept": True} for i in keep})
        if updates:
            self.store.set_image_fields(design.id, updates)
        if not reroll:
            return self.report(self.store.get(design.id)), []
        rng = random.SystemRandom()
        plans = []
        for i in sorted(set(reroll)):
            old = slots[i]
            request = request_of(old.recipe or {}, character=design.draft_key)
            request = request.model_copy(update={"seed": rng.randrange(2**32)})
            plans.append(
                PlannedRender("slot", i, request, tuple(self._picked(design)), Slot(**(old.slot or {})))  # type: ignore[arg-type]
            )
        if not self.store.claim(design.id, ["ready", "failed"], status="rendering", error=None):
            raise DesignBusyError("the design is rendering; wait for its job to end")
        return self.store.get(design.id), plans

    def record_rerolls(self, design: Design, plans: Sequence[PlannedRender], results: Sequence[Rendered]) -> Design:
        images = self._rendered_images(plans, results)
        if not images:
            return self.fail(design, _why_none(results))
        done = {image.index for image, _ in images}
        old = [s.id for s in design.of_kind("slot") if s.index in done]
        self.store.replace_images(design.id, old, images)
        return self.report(self.store.get(design.id))

    def report(self, design: Design) -> Design:
        """The reference report over the kept, analysable slots; per-slot scores; the design ``ready`` to curate."""
        family = backend_family(self.analyzer.name)
        slots = design.of_kind("slot")
        analysed: list[tuple[DesignImage, IngestedImage, Any]] = []
        updates: dict[str, dict[str, Any]] = {}
        protected, young = [], []
        for slot in slots:
            image = self._image(design, slot)
            result = self.checker.analyse(image, slot.digest)
            check = self.checker.check(image, slot.label, result)
            analysable = self.grid.analysable((slot.slot or {}).get("view", "front"), family)
            updates[slot.id] = {"face": check.to_dict(), "analysable": analysable, "similarity": None, "outlier": False}
            if not slot.kept:
                continue
            protected += [slot.index] if check.protected_match else []
            young += [slot.index] if check.age is not None and check.age < self.settings.min_apparent_age else []
            if analysable:
                name = f"slot {slot.index} ({(slot.slot or {}).get('view', '?')})"
                png = self.store.blobs(design.id).get(slot.blob)
                analysed.append((slot, IngestedImage(name, image, png, "PNG"), result))
        built = build_report(
            [a[1] for a in analysed], [a[2] for a in analysed], self.analyzer.name, self.analyzer.model_version
        )
        for (slot, _, _), quality in zip(analysed, built.images, strict=True):
            updates[slot.id].update(similarity=quality.similarity, outlier=quality.outlier)
        self.store.set_image_fields(design.id, updates)
        problems = list(built.reasons)
        if protected:
            problems.append(f"slots {protected} match a protected identity")
        if young:
            problems.append(f"slots {young} look younger than {self.settings.min_apparent_age}")
        kept = [s for s in slots if s.kept]
        if not kept:
            problems.append("every slot is dropped: keep or re-roll some")
        data = built.to_dict()
        for entry, (slot, _, _) in zip(data["images"], analysed, strict=True):
            entry["slot"] = slot.index
        coverage: dict[str, int] = {}
        for slot in kept:
            view = (slot.slot or {}).get("view", "?")
            coverage[view] = coverage.get(view, 0) + 1
        report = {
            **data,
            "verdict": "fail" if problems else "pass",
            "problems": problems,
            "unanalysable": [s.index for s in kept if not updates[s.id]["analysable"]],
            "yaw_coverage": coverage,
            "kept": len(kept),
        }
        return self.store.update(design.id, report=report, stage="curate", status="ready", error=None)

    # -- 5. register -------------------------------------------------------------------------------
    def register(self, design: Design, provenance: dict[str, Any], *, creator: str | None = None) -> Registration:
        """Register the kept slots as a draft character; ``synthetic`` only when the recipe chain holds."""
        if design.stage == "registered":
            raise DesignStateError("this design is registered already")
        if design.stage != "curate":
            raise DesignStateError("render and curate a turnaround before registering")
        self._editable(design)
        kept = [s for s in design.of_kind("slot") if s.kept]
        if not kept:
            raise DesignStateError("every slot is dropped: keep some before registering")
        if not isinstance(provenance, dict):
            raise InvalidRequestError("provenance must be an object with kind, who and evidence", field="provenance")
        kind = provenance.get("kind")
        by_digest = {i.digest: i.chain_record() for i in design.images}
        if kind == "synthetic":
            problems = chain_problems([s.chain_record() for s in kept], by_digest)
            if problems:
                starts = " (the set starts from an upload)" if (design.pick or {}).get("source") == "upload" else ""
                raise SyntheticNotAllowedError(
                    f"this set cannot be registered as synthetic{starts}: "
                    + "; ".join(problems[:4])
                    + ". Register it as licensed or consented, with evidence"
                )
        record = {
            "kind": kind,
            "creator": provenance.get("who") or provenance.get("creator") or creator or "",
            "evidence": provenance.get("evidence") or "",
        }
        if kind == "synthetic" and not record["evidence"]:
            record["evidence"] = (
                f"imagegen design {design.id}: every reference rendered by imagegen (card.extra.design)"
            )
        Provenance.model_validate(record)  # a clear ProvenanceError before anything else
        card = dict(design.card)
        card["extra"] = {**dict(card.get("extra") or {}), "design": self._evidence(design, kept, by_digest)}
        files = [(_slot_filename(s), self.store.blobs(design.id).get(s.blob)) for s in kept]
        registration = register_character(
            self.registry,
            character_id=design.character_id,
            name=design.name,
            provenance=record,
            files=files,
            card=card,
            settings=self.settings,
            tenant=design.tenant,
        )
        self.store.update(design.id, stage="registered", status="ready", error=None)
        return registration

    def _evidence(self, design: Design, kept: list[DesignImage], by_digest: dict) -> dict[str, Any]:
        """What the character keeps of its design: every reference's recipe and its parents' recipes."""
        parents: dict[str, Any] = {}
        for slot in kept:
            for digest in (slot.recipe or {}).get("parents") or []:
                image = by_digest.get(digest, {})
                parents[digest] = image.get("recipe") or {"image_digest": digest, "origin": image.get("origin")}
        return {
            "design_id": design.id,
            "pick": (design.pick or {}).get("source"),
            "references": [
                {"reference": i, "slot": s.index, **(s.slot or {}), "recipe": s.recipe} for i, s in enumerate(kept)
            ],
            "parents": list(parents.values()),
        }

    # -- helpers -----------------------------------------------------------------------------------
    def fail(self, design: Design, why: str) -> Design:
        return self.store.update(design.id, status="failed", error=why)

    def _editable(self, design: Design) -> None:
        if design.stage == "registered":
            raise DesignStateError("this design is registered already; start a new one to change it")
        if design.status == "rendering":
            raise DesignBusyError("the design is rendering; wait for its job to end")

    def _image(self, design: Design, image: DesignImage) -> Image.Image:
        return Image.open(io.BytesIO(self.store.blobs(design.id).get(image.blob))).convert("RGB")

    def _picked(self, design: Design) -> list[str]:
        by_id = {i.id: i for i in design.images}
        return [by_id[i].digest for i in (design.pick or {}).get("image_ids", []) if i in by_id]

    def _rendered_images(
        self, plans: Sequence[PlannedRender], results: Sequence[Rendered]
    ) -> list[tuple[DesignImage, bytes]]:
        out = []
        for plan, result in zip(plans, results, strict=True):
            if result.png is None:
                continue
            image = Image.open(io.BytesIO(result.png)).convert("RGB")
            digest = pixel_digest(image)
            check = self.checker.check(image, f"{plan.kind} {plan.index}", digest=digest)
            out.append(
                (
                    DesignImage(
                        id=result.image_id,
                        kind=plan.kind,
                        index=plan.index,
                        digest=digest,
                        origin="rendered",
                        recipe=make_recipe(result.metadata, plan.parents, digest),
                        face=check.to_dict(),
                        slot=plan.slot.to_dict() if plan.slot else None,
                    ),
                    result.png,
                )
            )
        return out


def upload_provenance(provenance: Any, creator: str | None = None) -> dict[str, Any]:
    """The uploader's provenance of a picked upload: consented or licensed, with who and evidence."""
    if not isinstance(provenance, dict):
        raise InvalidRequestError(
            'an upload needs its provenance: {"kind": "licensed"|"consented", "who": ..., "evidence": ...}',
            field="provenance",
        )
    kind = provenance.get("kind")
    if kind == "synthetic":
        raise SyntheticNotAllowedError(
            "an uploaded image is not synthetic: nothing in this system rendered it. Give its provenance as "
            "licensed or consented, with evidence"
        )
    record = {
        "kind": kind,
        "creator": provenance.get("who") or provenance.get("creator") or creator or "",
        "evidence": provenance.get("evidence") or "",
    }
    checked = Provenance.model_validate(record)
    return {"kind": checked.kind, "who": checked.creator, "evidence": checked.evidence}


def design_dict(design: Design) -> dict[str, Any]:
    """A design as the API and ``--json`` show it (the shape of the Studio contract)."""
    by_id = {i.id: i for i in design.images}
    pick = None
    if design.pick is not None:
        pick = {
            "source": design.pick.get("source"),
            "image_ids": [i for i in design.pick.get("image_ids", []) if i in by_id],
            "provenance": design.pick.get("provenance"),
        }
    return {
        "design_id": design.id,
        "character_id": design.character_id,
        "name": design.name,
        "card": design.card,
        "preset": design.preset,
        "method": design.method,
        "stage": design.stage,
        "status": design.status,
        "job_id": design.job_id,
        "error": design.error,
        "created_at": design.created_at.isoformat(),
        "expires_at": design.expires_at.isoformat(),
        "candidates": [
            {"index": c.index, "seed": (c.recipe or {}).get("seed"), "image_id": c.id, "face": c.face}
            for c in design.of_kind("candidate")
        ],
        "uploads": [{"index": u.index, "image_id": u.id, "face": u.face} for u in design.of_kind("upload")],
        "pick": pick,
        "slots": [
            {
                "index": s.index,
                **(s.slot or {"view": None, "expression": None, "lighting": None}),
                "seed": (s.recipe or {}).get("seed"),
                "image_id": s.id,
                "kept": s.kept,
                "analysable": s.analysable,
                "face": s.face,
                "similarity": s.similarity,
                "outlier": s.outlier,
            }
            for s in design.of_kind("slot")
        ],
        "report": design.report,
    }


def _request(**fields: Any) -> RenderRequest:
    """A ``RenderRequest`` from a card's prompt; pydantic's complaint (a card too long) as one clear error."""
    try:
        return RenderRequest(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidRequestError(f"the card makes an invalid {where}: {first['msg']}", field="card") from None


def _slot_filename(slot: DesignImage) -> str:
    s = slot.slot or {}
    return f"slot{slot.index:02d}-{s.get('view', 'view')}-{s.get('expression', '')}-{s.get('lighting', '')}.png"


def _why_none(results: Sequence[Rendered]) -> str:
    problems = sorted({r.problem or "unknown" for r in results})
    return f"no image came out usable ({', '.join(problems) or 'nothing rendered'})"
