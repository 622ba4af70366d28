"""Registering and approving characters end to end: real faces, real registry, real safeguards."""

from __future__ import annotations

import pytest
from PIL import Image

from imagegen import samples
from imagegen.errors import ImagegenError
from imagegen.identity.characters import ApprovalError, approve_character, register_character
from imagegen.identity.ingest import ImageTooLargeError, InvalidImageError, UploadTooLargeError
from imagegen.identity.models import (
    DuplicateCharacterError,
    InvalidCharacterIdError,
    InvalidReferenceError,
    ProvenanceError,
)
from imagegen.identity.registry import Registry
from imagegen.identity.safeguards import AgeGateError, ProtectedIdentityMatchError, protect_from_images
from imagegen.ids import DEFAULT_TENANT, InvalidTenantIdError
from imagegen.settings import get_settings
from imagegen.standins.faces import write_genderage_model
from tests.photos import astronaut_set, bomb_png, encode, hopper_set, no_face

SYNTHETIC = {"kind": "synthetic", "creator": "artist@example.com"}


@pytest.fixture
def registry(isolated_home):
    with Registry.open() as registry:
        yield registry


def register(registry, dlib, character_id="mia", files=None, provenance=SYNTHETIC, name="Mia"):
    return register_character(
        registry,
        character_id=character_id,
        name=name,
        provenance=provenance,
        card={"look": "red hair, freckles", "personality": "curious", "style_notes": "warm light"},
        files=list(files if files is not None else astronaut_set(4)),
        analyzer=dlib,
    )


def test_register_stores_references_embeddings_and_centroid(registry, dlib, tmp_path):
    registration = register(registry, dlib)
    stored = registry.characters.get("mia")
    assert stored.status == "draft" and stored.age_check == "unverified"
    assert len(stored.references) == 4 and all("dlib" in ref.faces for ref in stored.references)
    assert len(stored.centroids["dlib"]) == 128
    assert stored.references[0].faces["dlib"].quality["face_found"] is True
    paths = registration.write_artifacts(tmp_path)
    assert paths["contact_sheet"].stat().st_size > 10_000 and paths["report"].read_text().startswith("{")


def test_approve_needs_a_passing_report(registry, dlib):
    register(registry, dlib, "good")
    assert approve_character(registry, "good", dlib).character.status == "approved"
    register(registry, dlib, "mixed", files=[*astronaut_set(4), no_face()])
    with pytest.raises(ApprovalError, match="no face found in: coffee.png"):
        approve_character(registry, "mixed", dlib)
    assert registry.characters.get("mixed").status == "draft"


@pytest.mark.parametrize(
    "change, error",
    [
        ({"character_id": "../etc"}, InvalidCharacterIdError),
        ({"character_id": "Mia"}, InvalidCharacterIdError),
        ({"character_id": "m" * 200}, InvalidCharacterIdError),
        ({"character_id": "draft-3c3a05739370aaadbf21168c0fda52cc"}, InvalidCharacterIdError),  # designs' drafts
        ({"name": "\x00\x01<img src=x onerror=alert(1)>"}, ImagegenError),  # control characters
        ({"name": "Mia \u202eevil"}, ImagegenError),  # a right-to-left override
        ({"provenance": {"kind": "consented", "creator": "x"}}, ProvenanceError),
        ({"provenance": {"kind": "stolen", "creator": "x"}}, ProvenanceError),
        ({"provenance": {"kind": "synthetic", "creator": ""}}, ProvenanceError),
        ({"files": [("empty.png", b"")]}, InvalidImageError),
        ({"files": [*astronaut_set(2), ("junk.png", b"GIF89a not really")]}, InvalidImageError),
        ({"files": []}, ImagegenError),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(registry, dlib, change, error):
    register(registry, dlib, "existing")
    before = registry.dump()
    kwargs = {"character_id": "new", "files": astronaut_set(2), "provenance": SYNTHETIC, **change}
    with pytest.raises(error):
        register(registry, dlib, **kwargs)
    assert registry.dump() == before


def test_duplicate_id_is_refused_before_analysis(registry, dlib):
    register(registry, dlib)
    before = registry.dump()
    with pytest.raises(DuplicateCharacterError):
        register(registry, dlib)
    assert registry.dump() == before


def test_protected_identity_blocks_registration(registry, dlib):
    from imagegen.identity.characters import ingest_all

    protect_from_images(registry, "Grace Hopper", ingest_all([hopper_set(1)[0]]), dlib, note="real person")
    stored = registry.gallery.all()
    assert len(stored) == 1 and len(stored[0].embedding) == 128  # an embedding, no image
    before = registry.dump()
    with pytest.raises(ProtectedIdentityMatchError, match="Grace Hopper"):
        register(registry, dlib, "hopperish", files=[*astronaut_set(2), hopper_set(2)[1]])
    assert registry.dump() == before
    register(registry, dlib, "fictional")  # a different face is still welcome


@pytest.fixture
def age_estimator_installed(isolated_home, monkeypatch):
    """An insightface root with a genderage stand-in; returns a function setting its answer."""
    root = isolated_home / "insightface"

    def install(age: float) -> None:
        write_genderage_model(root / "models" / "buffalo_l" / "genderage.onnx", apparent_age=age)

    monkeypatch.setenv("IMAGEGEN_INSIGHTFACE_ROOT", str(root))
    get_settings.cache_clear()
    return install


def test_age_gate_refuses_young_looking_references(registry, dlib, age_estimator_installed):
    age_estimator_installed(19)
    before = registry.dump()
    with pytest.raises(AgeGateError, match="younger than 25"):
        register(registry, dlib)
    assert registry.dump() == before


def test_a_stand_in_age_model_never_vouches(registry, dlib, age_estimator_installed, monkeypatch):
    age_estimator_installed(41)
    registration = register(registry, dlib)
    assert registration.age.status == "unverified" and registration.age.ages == [41.0] * 4
    assert "standin" in registration.age.estimator
    assert registry.characters.get("mia").age_check == "unverified"
    monkeypatch.setenv("IMAGEGEN_STRICT_AGE_GATE", "true")
    get_settings.cache_clear()
    with pytest.raises(AgeGateError, match="stand-in"):
        register(registry, dlib, "mia2")


def test_age_gate_passes_adults_and_records_it(registry, dlib, isolated_home, monkeypatch):
    """A genderage model that is not a stand-in (the stand-in with its marker removed plays a real one)."""
    import onnx

    path = isolated_home / "insightface" / "models" / "buffalo_l" / "genderage.onnx"
    write_genderage_model(path, apparent_age=41)
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(path))
    monkeypatch.setenv("IMAGEGEN_INSIGHTFACE_ROOT", str(isolated_home / "insightface"))
    get_settings.cache_clear()
    registration = register(registry, dlib)
    assert registration.age.status == "passed" and registration.age.ages == [41.0] * 4
    assert registry.characters.get("mia").age_check == "passed"


def test_strict_gate_refuses_without_an_estimator(registry, dlib, monkeypatch):
    monkeypatch.setenv("IMAGEGEN_STRICT_AGE_GATE", "true")
    get_settings.cache_clear()
    with pytest.raises(AgeGateError, match="no apparent-age estimator"):
        register(registry, dlib)
    assert registry.characters.all() == []


def test_approval_rechecks_the_protected_gallery(registry, dlib):
    from imagegen.identity.characters import ingest_all

    register(registry, dlib)
    protect_from_images(registry, "the astronaut", ingest_all([astronaut_set(1)[0]]), dlib)
    with pytest.raises(ProtectedIdentityMatchError):
        approve_character(registry, "mia", dlib)
    assert registry.characters.get("mia").status == "draft"


def test_protecting_a_face_suspends_characters_that_already_use_it(registry, dlib):
    """A face protected after approval: its character goes back to draft with a failed report, and
    neither the service policy nor a preview (--allow-draft) renders it; other characters are untouched."""
    from imagegen.identity.characters import ingest_all
    from imagegen.identity.provider import refusal

    register(registry, dlib)  # mia: the astronaut
    approve_character(registry, "mia", dlib)
    register(registry, dlib, "other", files=list(hopper_set(2)))
    protect_from_images(registry, "the astronaut", ingest_all([astronaut_set(1)[0]]), dlib)
    mia, other = registry.characters.get("mia"), registry.characters.get("other")
    assert (mia.status, mia.report_passed) == ("draft", False)
    assert refusal(mia, allow_draft=True, allow_unverified_age=True) is not None
    assert other.report_passed is not False


def test_tenant_and_report_verdict_are_stored(registry, dlib):
    register_character(
        registry,
        character_id="owned",
        name="O",
        provenance=SYNTHETIC,
        files=list(astronaut_set(3)),
        analyzer=dlib,
        tenant="acme",
    )
    stored = registry.characters.get("owned")
    assert (stored.tenant, stored.report_passed) == ("acme", True)
    assert register(registry, dlib).character.tenant == DEFAULT_TENANT
    register(registry, dlib, "mixed", files=[*astronaut_set(3), no_face()])
    assert registry.characters.get("mixed").report_passed is False
    with pytest.raises(ApprovalError):
        approve_character(registry, "mixed", dlib)
    assert registry.characters.get("mixed").report_passed is False
    assert approve_character(registry, "owned", dlib).character.report_passed is True
    before = registry.dump()
    with pytest.raises(InvalidTenantIdError):
        register_character(
            registry,
            character_id="nobody",
            name="N",
            provenance=SYNTHETIC,
            files=list(astronaut_set(2)),
            analyzer=dlib,
            tenant="../acme",
        )
    assert registry.dump() == before


def test_hostile_uploads_are_refused_before_decoding_and_change_nothing(registry, dlib):
    """The issue's case (eight blank 6000x6000 PNGs) and a 144-Mpixel header, through registration."""
    blank = encode(Image.new("RGB", (6000, 6000), "white"))
    register(registry, dlib, "existing")
    before = registry.dump()
    with pytest.raises(InvalidReferenceError, match="same bytes") as info:
        register(registry, dlib, "blanks", files=[(f"blank-{i}.png", blank) for i in range(8)])
    assert info.value.code == "invalid_reference"
    with pytest.raises(ImageTooLargeError) as info:
        register(registry, dlib, "huge", files=[*astronaut_set(2), ("huge.png", bomb_png(12000, 12000))])
    assert info.value.code == "image_too_large"
    with pytest.raises(UploadTooLargeError):
        register(registry, dlib, "many", files=[(f"big-{i}.png", bomb_png(6000, 6000 - i)) for i in range(8)])
    with pytest.raises(UploadTooLargeError, match="over the 500,000-pixel limit"):  # the budget is a parameter
        register_character(
            registry,
            character_id="small-budget",
            name="S",
            provenance=SYNTHETIC,
            files=list(astronaut_set(3)),
            analyzer=dlib,
            max_request_pixels=500_000,
        )
    assert registry.dump() == before


def test_large_references_are_stored_shrunk_with_their_faces_found(registry, dlib):
    big = samples.astronaut().resize((3072, 3072), Image.Resampling.BICUBIC)
    registration = register(registry, dlib, files=[("big.png", encode(big)), *astronaut_set(3)[1:]])
    stored = registry.characters.get("mia").references[0]
    assert (stored.width, stored.height) == (1536, 1536) and "dlib" in stored.faces
    assert registration.report.images[0].face_found and registration.report.passed
