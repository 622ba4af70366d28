"""The design flow's library parts with real components: the grid file, the recipe chain, the store
(tables + one folder per design, expiry, deletion), the report over turnaround slots (real photos,
dlib), and the refusals of bad input. The renders themselves are exercised by tests/design/test_cli.py
and tests/serve/test_designs.py."""

from __future__ import annotations

import io
import uuid
from datetime import timedelta

import pytest
from PIL import Image, ImageOps

from imagegen import samples
from imagegen.db import utcnow
from imagegen.errors import ImagegenError
from imagegen.identity.design.flow import DesignFlow, InvalidPickError, SyntheticNotAllowedError, design_dict
from imagegen.identity.design.grid import MAX_SLOTS, InvalidGridError, fill, load_grid_config
from imagegen.identity.design.recipe import chain_problems, make_recipe, pixel_digest
from imagegen.identity.design.store import DesignExpiredError, DesignImage, DesignStore, UnknownDesignError
from imagegen.identity.ingest import InvalidImageError
from imagegen.identity.models import Card, ProvenanceError
from imagegen.identity.registry import Registry
from tests.photos import encode


@pytest.fixture
def flow(isolated_home):
    store = DesignStore.open()
    registry = Registry.open()
    yield DesignFlow(store, registry)
    store.close()
    registry.close()


def png(image: Image.Image) -> bytes:
    return encode(image)


def test_grid_file_prompts_and_overrides():
    grid = load_grid_config()
    assert [s.view for s in grid.resolve("default")][:4] == [
        "front",
        "three_quarter_left",
        "three_quarter_right",
        "profile",
    ]
    assert len(grid.resolve(None)) == len(grid.resolve("default"))
    card = Card(look="short silver hair", style_notes="")
    prompt = grid.slot_prompt("Mia", card, grid.resolve("quick")[2]).prompt
    assert prompt.startswith("profile portrait, side view of Mia, short silver hair") and ", ," not in prompt
    assert fill("{a}, {b}, {c}", {"a": "x", "b": " ", "c": "z"}) == "x, z"
    custom = grid.resolve({"slots": [["front", "smile", "daylight"]]})
    assert [(s.view, s.expression, s.lighting) for s in custom] == [("front", "smile", "daylight")]
    for bad in (
        "nope",
        {"slots": [["front", "smile", "moonlight"]]},
        {"slots": []},
        {"slots": [["front"]]},
        {"slots": [["front", "neutral", "studio"]] * (MAX_SLOTS + 1)},
        {"slots": [], "x": 1},
    ):
        with pytest.raises(InvalidGridError):
            grid.resolve(bad)
    assert not grid.analysable("profile", "dlib") and grid.analysable("three_quarter_left", "dlib")


def _record(kind, index, digest, origin="rendered", parents=()):
    recipe = (
        make_recipe(
            {"preset": "tiny-flux", "seed": index, "method": "pulid-flux-v0.9.1" if parents else None}, parents, digest
        )
        if origin == "rendered"
        else None
    )
    return {"digest": digest, "origin": origin, "recipe": recipe, "label": f"{kind} {index}"}


def test_recipe_chain_decides_synthetic():
    candidate = _record("candidate", 0, "c" * 64)
    slot = _record("slot", 0, "s" * 64, parents=[candidate["digest"]])
    by_digest = {r["digest"]: r for r in (candidate, slot)}
    assert chain_problems([slot], by_digest) == []

    upload = _record("upload", 0, "u" * 64, origin="upload")
    from_upload = _record("slot", 1, "t" * 64, parents=[upload["digest"]])
    problems = chain_problems(
        [from_upload], {**by_digest, upload["digest"]: upload, from_upload["digest"]: from_upload}
    )
    assert problems and "upload" in problems[0]

    stranger = _record("slot", 2, "v" * 64, parents=["f" * 64])  # a parent this design never rendered
    assert "not rendered by this design" in chain_problems([stranger], {stranger["digest"]: stranger})[0]
    forged = {**slot, "recipe": {**slot["recipe"], "image_digest": "0" * 64}}  # a recipe naming another image
    assert "another image" in chain_problems([forged], by_digest)[0]


def test_pixel_digest_names_pixels_not_files():
    image = samples.astronaut()
    reencoded = Image.open(io.BytesIO(encode(image, "PNG", compress_level=1)))
    assert pixel_digest(image) == pixel_digest(reencoded)
    changed = image.copy()
    changed.putpixel((0, 0), (0, 0, 1))
    assert pixel_digest(changed) != pixel_digest(image)


def _design(flow, **kw):
    design, plans = flow.start(
        character_id=kw.pop("character_id", "mia"),
        name="Mia",
        card={"look": "silver hair"},
        preset="tiny-flux",
        candidates=kw.pop("candidates", 2),
        seed=5,
        tenant=kw.pop("tenant", "acme"),
        **kw,
    )
    return design, plans


def _add_candidates(flow, design, images):
    stored = []
    for i, image in enumerate(images):
        digest = pixel_digest(image)
        stored.append(
            (
                DesignImage(
                    uuid.uuid4().hex,
                    "candidate",
                    i,
                    digest,
                    "rendered",
                    recipe=make_recipe({"preset": "tiny-flux", "seed": 5 + i}, [], digest),
                    face={"found": False, "age": None, "protected_match": False, "note": "no face"},
                ),
                png(image),
            )
        )
    flow.store.add_images(design.id, stored)
    return flow.store.update(design.id, status="ready")


def test_bad_input_changes_nothing(flow):
    for kwargs, field in (
        ({"candidates": 0}, "candidates"),
        ({"candidates": 17}, "candidates"),
        ({"candidates": True}, "candidates"),
        ({"character_id": "../x"}, "character_id"),
    ):
        with pytest.raises(ImagegenError) as refused:
            _design(flow, **kwargs)
        assert refused.value.field == field
    with pytest.raises(ImagegenError):
        flow.start(character_id="mia", name="Mia", card={"look": "x", "nonsense": 1}, preset="tiny-flux", tenant="acme")
    with pytest.raises(ImagegenError) as long_card:  # a card too long for a prompt: refused before anything is stored
        flow.start(character_id="mia", name="Mia", card={"look": "x " * 3000}, preset="tiny-flux", tenant="acme")
    assert long_card.value.field == "card"
    assert flow.store.list(None) == []

    design, plans = _design(flow)
    assert [p.request.seed for p in plans] == [5, 6] and all(p.request.character is None for p in plans)
    design = _add_candidates(flow, design, [samples.astronaut(), samples.no_face_image()])
    for indices in ([2], [-1], [], [0, 0], ["0"], [True], [0, 1, 0, 1, 0]):
        with pytest.raises(InvalidPickError):
            flow.pick_candidates(design, indices)
    with pytest.raises(InvalidImageError):
        flow.pick_upload(
            design, "notes.png", b"this is not an image", {"kind": "licensed", "who": "me", "evidence": "x"}
        )
    with pytest.raises(SyntheticNotAllowedError):
        flow.pick_upload(design, "photo.png", png(samples.astronaut()), {"kind": "synthetic", "who": "me"})
    with pytest.raises(ProvenanceError):  # licensed needs evidence
        flow.pick_upload(design, "photo.png", png(samples.astronaut()), {"kind": "licensed", "who": "me"})
    after = flow.store.get(design.id)
    assert after.pick is None and len(after.images) == 2  # nothing half-written
    with pytest.raises(ImagegenError):  # no turnaround before a pick
        flow.turnaround(after, "quick")


def portraits() -> list[Image.Image]:
    """Four views of one real face, cropped close (small images keep dlib quick)."""
    face = samples.astronaut()
    crops = [face.crop((110, 10, 330, 230)), face.crop((125, 25, 345, 245)), face.crop((95, 0, 315, 220))]
    return [*crops, ImageOps.mirror(crops[0])]


def test_report_leaves_out_views_the_backend_cannot_analyse(flow):
    design, _ = _design(flow)
    photos = portraits()
    views = ["front", "three_quarter_left", "three_quarter_right", "front", "profile"]
    images = [*photos, samples.no_face_image()]  # the profile slot: no face for a frontal detector
    slots = []
    for i, (view, image) in enumerate(zip(views, images, strict=True)):
        digest = pixel_digest(image)
        slots.append(
            (
                DesignImage(
                    uuid.uuid4().hex,
                    "slot",
                    i,
                    digest,
                    "rendered",
                    recipe=make_recipe({"seed": i}, [], digest),
                    slot={"view": view, "expression": "neutral", "lighting": "studio"},
                ),
                png(image),
            )
        )
    flow.store.add_images(design.id, slots)
    reported = flow.report(flow.store.get(design.id))
    shown = design_dict(reported)
    assert [s["analysable"] for s in shown["slots"]] == [True, True, True, True, False]
    assert reported.report["verdict"] == "pass", reported.report["problems"]
    assert reported.report["unanalysable"] == [4] and len(reported.report["images"]) == 4
    assert all(s["similarity"] is not None for s in shown["slots"][:4]) and shown["slots"][4]["similarity"] is None
    assert shown["slots"][4]["face"]["found"] is False and shown["slots"][0]["face"]["found"] is True

    # the same faceless image at a front view fails the set; dropping it passes again
    flow.store.replace_images(
        design.id,
        [reported.of_kind("slot")[4].id],
        [
            (
                DesignImage(
                    uuid.uuid4().hex,
                    "slot",
                    4,
                    pixel_digest(samples.no_face_image()),
                    "rendered",
                    slot={"view": "front", "expression": "neutral", "lighting": "studio"},
                ),
                png(samples.no_face_image()),
            )
        ],
    )
    failing = flow.report(flow.store.get(design.id))
    assert failing.report["verdict"] == "fail" and any("no face" in p for p in failing.report["problems"])
    kept, _ = flow.curate(failing, drop=[4])
    assert kept.report["verdict"] == "pass" and design_dict(kept)["slots"][4]["kept"] is False


def test_designs_are_owned_expire_and_leave_no_bytes(flow, isolated_home):
    design, _ = _design(flow)
    design = _add_candidates(flow, design, [samples.astronaut()])
    folder = isolated_home / "designs" / design.id
    assert any(folder.rglob("*")) and flow.store.list("acme") and not flow.store.list("other")
    with pytest.raises(UnknownDesignError):
        flow.store.find("other", "mia")  # another tenant's design is not found by id either
    flow.store.set_expiry(design.id, utcnow() - timedelta(seconds=1))
    with pytest.raises(DesignExpiredError):
        flow.store.get(design.id)
    assert flow.store.list(None) == []
    gone = flow.store.expire()
    assert [g.design_id for g in gone] == [design.id] and gone[0].images == 1 and gone[0].bytes_removed > 0
    assert not folder.exists()
    with pytest.raises(UnknownDesignError):
        flow.store.get(design.id, expired_too=True)
    for hostile in ("../../etc", "A" * 32, "0" * 31, ""):
        with pytest.raises(UnknownDesignError):
            flow.store.get(hostile)


def test_design_bytes_live_in_the_deployments_storage(isolated_home):
    """A bucket (obstore's in-memory store here) holds a design's images and draft identity, read by any
    node, and deleting the design leaves no object under its prefix."""
    import torch

    from imagegen.storage import open_storage

    objects = open_storage("memory:///")
    with DesignStore(f"sqlite:///{isolated_home / 'registry.db'}", objects.child("designs")) as store:
        design = store.create(
            tenant="acme", key_id=None, character_id="mia", name="Mia", card={}, preset="tiny-flux", seed=1
        )
        image = samples.astronaut()
        store.add_images(
            design.id, [(DesignImage(uuid.uuid4().hex, "upload", 0, pixel_digest(image), "upload"), png(image))]
        )
        store.put_draft_tensors(design.id, "pulid", {"id": torch.ones(2, 3)})
        assert torch.equal(store.draft_tensors(design.id, "pulid")["id"], torch.ones(2, 3))
        stored = store.get(design.id)
        assert Image.open(io.BytesIO(store.image_bytes(stored, stored.images[0].id))).size == image.size
        assert len(list(objects.list(f"designs/{design.id}"))) == 2
        gone = store.delete(design.id)
        assert gone.files == 2 and gone.bytes_removed > 0 and list(objects.list("designs")) == []
        assert store.draft_tensors(design.id, "pulid") is None
