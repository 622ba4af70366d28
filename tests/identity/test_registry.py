"""The character registry on a real SQLite file, with its blobs in a real directory and in a bucket.

The ``registry`` fixture runs every test on both storage arms (``tests/storage/s3.py``): the blobs under
``IMAGEGEN_HOME/blobs`` (the default) and in a fresh bucket of the session's S3-compatible server.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import text

from imagegen.blobstore import BlobNotFoundError, CorruptBlobError, InvalidDigestError
from imagegen.errors import ImagegenError
from imagegen.identity.models import (
    Character,
    DuplicateCharacterError,
    InvalidCharacterError,
    InvalidCharacterIdError,
    InvalidReferenceError,
    InvalidTenantIdError,
    ProvenanceError,
    ReferenceInput,
    RegistryError,
    StaleConditioningError,
    UnknownCharacterError,
    UnknownProtectedIdentityError,
)
from imagegen.identity.registry import Registry
from imagegen.migrations import SchemaTooNewError, head
from imagegen.settings import get_settings

from ..storage.s3 import Bucket
from ._helpers import embedding, fake_face, make_character, make_refs, png_bytes

BAD_IDS = ["../x", "Mia", "a" * 200, "", "mia/../../etc", "-mia", "mia\n", "mi a"]


@pytest.fixture
def registry(storage: Bucket | None) -> Registry:
    reg = Registry.open()
    yield reg
    reg.close()


def test_open_creates_the_database_in_home_with_wal_and_foreign_keys(
    isolated_home: Path, registry: Registry, storage: Bucket | None
) -> None:
    settings = get_settings()
    assert settings.registry_url == f"sqlite:///{isolated_home / 'registry.db'}"
    assert (isolated_home / "registry.db").is_file()
    expected = str(settings.blob_root) if storage is None else f"{storage.url}/blobs"
    assert registry.blobs.location == expected
    assert registry.blobs.root == (settings.blob_root if storage is None else None)
    with registry.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    assert registry.schema_revision == head()
    dump = registry.dump()
    assert set(dump["tables"]) == {
        "characters",
        "character_tombstones",
        "reference_images",
        "face_analyses",
        "identity_centroids",
        "conditioning_cache",
        "protected_identities",
    }
    # opening again keeps the revision and the data
    with Registry.open() as again:
        assert again.dump() == dump and again.schema_revision == head()


def test_a_newer_schema_is_refused(isolated_home: Path) -> None:
    with Registry.open() as registry, registry.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_later'"))
    with pytest.raises(SchemaTooNewError, match="schema 0099_later, newer than this imagegen.*upgrade imagegen"):
        Registry.open()


def test_a_missing_database_driver_is_explained(tmp_path: Path) -> None:
    for url in ("postgresql+psycopg2://user:secret@localhost/db", "nosuchdb://user:secret@host/db"):
        with pytest.raises(RegistryError, match="needs a driver") as info:
            Registry(url, tmp_path / "blobs")
        assert "secret" not in str(info.value)


def test_in_memory_sqlite_works_across_threads(tmp_path: Path) -> None:
    with Registry("sqlite://", tmp_path / "blobs") as registry:
        registry.characters.register(make_character("mia"), make_refs(1))
        result: list[str] = []
        thread = threading.Thread(target=lambda: result.extend(registry.characters.ids()))
        thread.start()
        thread.join()
        assert result == ["mia"]


def test_register_and_get_round_trip(registry: Registry) -> None:
    refs = make_refs(4, backends=("dlib", "insightface"))
    centroid = np.mean([embedding(i) for i in range(4)], axis=0)
    stored = registry.characters.register(make_character("mia", centroids={"dlib": centroid}), refs)
    got = registry.characters.get("mia")
    assert got == stored
    assert got.id == "mia" and got.name == "Mia"
    assert got.card.look.startswith("short red hair")
    assert got.card.extra == {"palette": ["red", "teal"], "height_cm": 168}
    assert got.provenance.kind == "synthetic" and got.provenance.creator == "art-team"
    assert str(got.provenance.date) == "2024-05-01"
    assert (got.status, got.version, got.age_check) == ("draft", 1, "unverified")
    assert got.created_at is not None and got.created_at.tzinfo is UTC
    assert got.updated_at == got.created_at
    assert [r.filename for r in got.references] == [f"ref_{i:03d}.png" for i in range(4)]
    for ref, given in zip(got.references, refs, strict=True):
        assert ref.digest == registry.blobs.put(given.data)
        assert (ref.mime_type, ref.width, ref.height, ref.size) == ("image/png", 12, 10, len(given.data))
        assert registry.characters.reference_bytes("mia", ref.digest) == given.data
        assert set(ref.faces) == {"dlib", "insightface"}
        for backend in ("dlib", "insightface"):
            face, expected = ref.faces[backend], given.faces[backend]
            assert face.backend == backend
            np.testing.assert_array_equal(face.as_array(), expected.as_array())
            assert face.landmarks == expected.landmarks and face.quality == expected.quality
    np.testing.assert_array_equal(got.centroid("dlib"), centroid.astype(np.float32))
    assert got.centroid("insightface") is None
    assert registry.characters.all() == [got]
    assert registry.characters.ids() == ["mia"]
    assert registry.characters.exists("mia") and not registry.characters.exists("noa")


def test_register_accepts_a_character_model_and_keeps_given_status(registry: Registry) -> None:
    character = Character.model_validate(make_character("noa", status="approved", age_check="passed"))
    stored = registry.characters.register(character, make_refs(1))
    assert (stored.status, stored.age_check, stored.version) == ("approved", "passed", 1)
    assert registry.characters.all(status="approved") == [stored]
    assert registry.characters.all(status="draft") == []


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_invalid_id_is_refused_and_nothing_changes(registry: Registry, bad_id: str) -> None:
    registry.characters.register(make_character("mia"), make_refs(2))
    before = registry.dump()
    with pytest.raises(InvalidCharacterIdError, match="not a valid character id") as info:
        registry.characters.register(make_character(bad_id), make_refs(2, start=10))
    assert info.value.code == "invalid_character_id" and info.value.field == "character_id"
    characters = registry.characters
    for call in (characters.get, characters.delete, characters.approve, characters.exists):
        with pytest.raises(InvalidCharacterIdError):
            call(bad_id)
    assert registry.dump() == before


def test_the_design_drafts_ids_are_reserved_and_nothing_changes(registry: Registry) -> None:
    """A design renders its pick's identity under ``draft-<hex>``: a character registered under such an id would be
    rendered with (and its deletion would purge the jobs of) someone else's design draft."""
    registry.characters.register(make_character("mia"), make_refs(2))
    before = registry.dump()
    with pytest.raises(InvalidCharacterIdError, match="reserved for design drafts") as info:
        registry.characters.register(make_character("draft-3c3a05739370aaadbf21168c0fda52cc"), make_refs(2, start=10))
    assert info.value.code == "invalid_character_id"
    assert registry.dump() == before
    # the rule is the prefix, not a look-alike
    assert registry.characters.register(make_character("drafty"), make_refs(1, start=20)).id == "drafty"


def test_duplicate_id_is_refused_and_nothing_changes(registry: Registry) -> None:
    registry.characters.register(make_character("mia"), make_refs(2))
    before = registry.dump()
    with pytest.raises(DuplicateCharacterError, match="already registered") as info:
        registry.characters.register(make_character("mia", name="Other Mia"), make_refs(3, start=50))
    assert isinstance(info.value, ImagegenError) and info.value.code == "duplicate_character"
    assert registry.dump() == before  # not even a blob of the refused images


@pytest.mark.parametrize(
    ("provenance", "message"),
    [
        (None, "no provenance"),
        ({"kind": "stolen", "creator": "x"}, "synthetic', 'consented' or 'licensed"),
        ({"kind": "synthetic", "creator": "   "}, "creator is empty"),
        ({"kind": "synthetic"}, "creator"),
        ({"kind": "consented", "creator": "casting"}, "needs provenance.evidence"),
        ({"kind": "licensed", "creator": "agency", "evidence": "L-1", "surprise": 1}, "surprise"),
        ("synthetic", "provenance"),
    ],
)
def test_missing_or_invalid_provenance_is_refused(registry: Registry, provenance: object, message: str) -> None:
    before = registry.dump()
    with pytest.raises(ProvenanceError, match=message) as info:
        registry.characters.register(make_character("mia", provenance=provenance), make_refs(1))
    assert info.value.field == "provenance"
    data = make_character("mia")
    del data["provenance"]
    with pytest.raises(ProvenanceError, match="no provenance"):
        registry.characters.register(data, make_refs(1))
    assert registry.dump() == before


def test_unknown_character_errors_leave_the_registry_unchanged(registry: Registry) -> None:
    registry.characters.register(make_character("mia"), make_refs(1))
    before = registry.dump()
    calls = [
        lambda: registry.characters.get("noa"),
        lambda: registry.characters.delete("noa"),
        lambda: registry.characters.approve("noa"),
        lambda: registry.characters.set_status("noa", "draft"),
        lambda: registry.characters.set_age_check("noa", "passed"),
        lambda: registry.characters.update_card("noa", name="Noa"),
        lambda: registry.characters.replace_references("noa", make_refs(1, start=30)),
        lambda: registry.characters.add_references("noa", make_refs(1, start=31)),
        lambda: registry.characters.set_centroid("noa", "dlib", embedding(1)),
        lambda: registry.conditioning.put("noa", "pulid", "v1", "w" * 64, {"x": torch.ones(2)}),
        lambda: registry.conditioning.get("noa", "pulid", "v1", "w" * 64),
        lambda: registry.characters.reference_bytes("noa", "0" * 64),
    ]
    for call in calls:
        with pytest.raises(UnknownCharacterError, match="no character 'noa'") as info:
            call()
        assert info.value.code == "unknown_character"
        # HTTP clients see this message: it never says where the database is
        assert "sqlite" not in str(info.value) and str(registry.url.database) not in str(info.value)
    assert registry.dump() == before


def test_invalid_references_are_refused_before_anything_is_written(registry: Registry) -> None:
    before = registry.dump()
    with pytest.raises(InvalidReferenceError, match="not an image"):
        registry.characters.register(make_character("mia"), [{"data": b"not an image at all"}])
    with pytest.raises(InvalidReferenceError, match="same bytes"):
        registry.characters.register(make_character("mia"), make_refs(2) + make_refs(1))
    bad_face = fake_face(1)
    bad_face["embedding"] = np.array([np.nan, 1.0])
    with pytest.raises(ImagegenError, match="NaN"):
        registry.characters.register(make_character("mia"), [{"data": png_bytes(1), "faces": {"dlib": bad_face}}])
    with pytest.raises(InvalidReferenceError, match="width"):
        registry.characters.register(make_character("mia"), [{"data": png_bytes(1), "width": 999}])
    with pytest.raises(InvalidCharacterError, match="filled by the registry"):
        stored_ref = {"digest": "a" * 64, "mime_type": "image/png", "width": 1, "height": 1, "size": 1}
        registry.characters.register(make_character("mia", references=[stored_ref]))
    assert registry.dump() == before


def test_a_failure_inside_the_transaction_leaves_nothing_but_orphans_for_gc(registry: Registry) -> None:
    registry.characters.register(make_character("noa"), make_refs(1, start=90))
    before = registry.dump()

    def boom() -> None:
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        registry.characters.register(make_character("mia"), make_refs(5), _before_commit=boom)
    assert not registry.characters.exists("mia")
    after = registry.dump()
    assert after["tables"] == before["tables"]
    assert len(after["blobs"]) == len(before["blobs"]) + 5  # written first, referenced by nothing
    assert registry.gc().blobs_kept_recent == 5  # young orphans are kept by default (grace period)
    report = registry.gc(grace_s=0)
    assert report.blobs_removed == 5 and report.bytes_removed > 0
    assert registry.dump() == before
    registry.characters.register(make_character("mia"), make_refs(5))  # the id is free


def test_status_card_and_age_check_updates(registry: Registry) -> None:
    registry.characters.register(make_character("mia"), make_refs(1))
    approved = registry.characters.approve("mia")
    assert (approved.status, approved.version) == ("approved", 2)
    assert approved.updated_at > approved.created_at
    assert registry.characters.set_status("mia", "approved").version == 2  # no change, no bump
    assert registry.characters.set_status("mia", "draft").version == 3
    with pytest.raises(InvalidCharacterError, match="status 'published'"):
        registry.characters.set_status("mia", "published")
    carded = registry.characters.update_card("mia", {"look": "long black hair"}, name="Mia Rossi")
    assert (carded.card.look, carded.card.personality, carded.name, carded.version) == (
        "long black hair",
        "",
        "Mia Rossi",
        4,
    )
    assert registry.characters.update_card("mia", carded.card).version == 4
    checked = registry.characters.set_age_check("mia", "passed")
    assert (checked.age_check, checked.version) == ("passed", 4)
    with pytest.raises(InvalidCharacterError):
        registry.characters.set_age_check("mia", "maybe")


def test_conditioning_cache_round_trip(registry: Registry) -> None:
    registry.characters.register(make_character("mia"), make_refs(2))
    tensors = {
        "id_tokens": torch.randn(1, 32, 16),
        "id_weight": torch.tensor([0.8], dtype=torch.bfloat16),
        "view": torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous
    }
    key = ("mia", "pulid-flux", "v0.9.1", "ab" * 32)
    assert registry.conditioning.get(*key) is None
    digest = registry.conditioning.put(*key, tensors, {"encoder": "eva-clip", "layers": [1, 2]})
    entry = registry.conditioning.get_entry(*key)
    assert entry is not None and entry.digest == digest and entry.character_version == 1
    assert entry.meta == {"encoder": "eva-clip", "layers": [1, 2]}
    got = registry.conditioning.get(*key)
    assert set(got) == set(tensors)
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
    # another method version is another entry; putting the same key again replaces it
    assert registry.conditioning.get("mia", "pulid-flux", "v1.0", "ab" * 32) is None
    new_digest = registry.conditioning.put(*key, {"id_tokens": torch.zeros(2)})
    assert not registry.blobs.exists(digest) and registry.blobs.exists(new_digest)
    assert torch.equal(registry.conditioning.get(*key)["id_tokens"], torch.zeros(2))
    assert len(registry.dump()["tables"]["conditioning_cache"]) == 1
    with pytest.raises(InvalidCharacterError, match="method"):
        registry.conditioning.put("mia", "../pulid", "v1", "x", {"a": torch.ones(1)})


def test_stale_conditioning_is_refused(registry: Registry) -> None:
    registry.characters.register(make_character("mia"), make_refs(2))
    version = registry.characters.get("mia").version
    registry.characters.replace_references("mia", make_refs(2, start=5))
    before = registry.dump()
    with pytest.raises(StaleConditioningError, match="version 2"):
        registry.conditioning.put(
            "mia", "ipadapter", "faceid-plus", "w", {"a": torch.ones(1)}, expected_version=version
        )
    assert registry.dump() == before
    registry.conditioning.put("mia", "ipadapter", "faceid-plus", "w", {"a": torch.ones(1)}, expected_version=2)


def test_reference_changes_invalidate_conditioning_and_centroids(registry: Registry) -> None:
    first = make_refs(3)
    registry.characters.register(make_character("mia", centroids={"dlib": embedding(0)}), first)
    key = ("mia", "pulid-sdxl", "v1.1", "c" * 64)
    cache_digest = registry.conditioning.put(*key, {"t": torch.ones(3)})

    replaced = registry.characters.replace_references("mia", make_refs(2, start=1))  # keeps ref 1, drops 0
    assert replaced.version == 2
    assert [r.filename for r in replaced.references] == ["ref_001.png", "ref_002.png"]
    assert replaced.centroids == {}
    assert registry.conditioning.get(*key) is None
    assert not registry.blobs.exists(cache_digest)
    assert not registry.blobs.exists(first_digest(first[0]))
    assert registry.blobs.exists(first_digest(first[1]))

    registry.characters.set_centroid("mia", "dlib", embedding(7))
    registry.conditioning.put(*key, {"t": torch.ones(3)})
    added = registry.characters.add_references("mia", make_refs(1, start=40))
    assert added.version == 3 and len(added.references) == 3
    assert added.references[-1].filename == "ref_040.png"
    assert registry.conditioning.get(*key) is None and added.centroids == {}
    with pytest.raises(InvalidReferenceError, match="already one of"):
        registry.characters.add_references("mia", make_refs(1, start=40))

    removed = registry.characters.remove_references("mia", [first_digest(make_refs(1, start=1)[0])])
    assert removed.version == 4
    assert [r.filename for r in removed.references] == ["ref_002.png", "ref_040.png"]
    with pytest.raises(InvalidReferenceError, match="has no reference"):
        registry.characters.remove_references("mia", ["0" * 64])
    with pytest.raises(InvalidDigestError):
        registry.characters.remove_references("mia", ["../../x"])
    assert sorted(registry.blobs.digests()) == sorted(r.digest for r in removed.references)


def first_digest(ref: ReferenceInput) -> str:
    import hashlib

    return hashlib.sha256(ref.data).hexdigest()


def test_delete_purges_every_byte_except_shared_blobs(isolated_home: Path, registry: Registry) -> None:
    marker = "zqxmarker-personality-of-mia"
    mia_refs = make_refs(3)
    shared = mia_refs[2]
    registry.characters.register(
        make_character("mia", card={"personality": marker}, centroids={"dlib": embedding(1)}), mia_refs
    )
    registry.characters.register(make_character("noa"), make_refs(2, start=20) + [shared])
    registry.conditioning.put("mia", "pulid-flux", "v0.9.1", "w1", {"id": torch.randn(4, 8)})
    registry.conditioning.put("mia", "ipadapter", "faceid", "w2", {"id": torch.randn(4, 8)})
    registry.conditioning.put("noa", "pulid-flux", "v0.9.1", "w1", {"id": torch.randn(4, 8)})
    noa_before = registry.characters.get("noa")
    noa_cache = registry.conditioning.get("noa", "pulid-flux", "v0.9.1", "w1")
    mia = registry.characters.get("mia")
    mia_only = {r.digest for r in mia.references} - {r.digest for r in noa_before.references}
    mia_cache = {
        registry.conditioning.get_entry("mia", m, v, w).digest
        for m, v, w in [("pulid-flux", "v0.9.1", "w1"), ("ipadapter", "faceid", "w2")]
    }
    blob_bytes = sum(registry.blobs.size(d) for d in mia_only | mia_cache)

    report = registry.characters.delete("mia")

    assert report.character_id == "mia"
    assert (report.references, report.face_analyses, report.centroids, report.conditioning) == (3, 3, 1, 2)
    assert report.blobs_removed == len(mia_only | mia_cache) == 4
    assert report.bytes_removed == blob_bytes
    assert report.blobs_shared == 1
    for digest in mia_only | mia_cache:
        assert not registry.blobs.exists(digest)
        assert not any(digest in f for f in registry.blobs.files())
    dump = registry.dump()
    # the one trace kept: the id's tombstone (id, last version, time), so versions never restart
    assert [(t["id"], t["last_version"]) for t in dump["tables"].pop("character_tombstones")] == [("mia", 1)]
    text_dump = json.dumps(dump["tables"])
    assert '"mia"' not in text_dump and marker not in text_dump
    assert not registry.characters.exists("mia")
    # the other character is untouched, its shared image included
    assert registry.characters.get("noa") == noa_before
    assert registry.characters.reference_bytes("noa", first_digest(shared)) == shared.data
    assert torch.equal(registry.conditioning.get("noa", "pulid-flux", "v0.9.1", "w1")["id"], noa_cache["id"])
    assert registry.verify() == []
    # not even in SQLite's free pages or the write-ahead log
    registry.close()
    for path in isolated_home.glob("registry.db*"):
        assert marker.encode() not in path.read_bytes(), path
    with pytest.raises(UnknownCharacterError):
        Registry.open().characters.delete("mia")


def test_gc_removes_only_unreferenced_blobs(registry: Registry) -> None:
    registry.characters.register(make_character("mia"), make_refs(2))
    registry.conditioning.put("mia", "pulid-flux", "v1", "w", {"x": torch.ones(1)})
    kept = set(registry.blobs.digests())
    orphan = registry.blobs.put(b"orphan from a killed process")
    assert registry.gc().blobs_removed == 0
    report = registry.gc(grace_s=0)
    assert (report.blobs_removed, report.bytes_removed) == (1, len(b"orphan from a killed process"))
    assert not registry.blobs.exists(orphan)
    assert set(registry.blobs.digests()) == kept == registry.referenced_digests()


def test_corrupted_reference_is_reported(registry: Registry) -> None:
    stored = registry.characters.register(make_character("mia"), make_refs(2))
    digest = stored.references[0].digest
    registry.blobs.objects.put(registry.blobs.key(digest), b"bit rot")  # the stored bytes change underneath
    with pytest.raises(CorruptBlobError, match="corrupt") as info:
        registry.characters.reference_bytes("mia", digest)
    assert registry.blobs.location not in str(info.value)  # HTTP clients see it: no paths, no bucket
    registry.blobs.objects.delete(registry.blobs.key(digest))
    with pytest.raises(BlobNotFoundError, match="missing") as info:
        registry.characters.reference_bytes("mia", digest)
    assert registry.blobs.location not in str(info.value)
    problems = registry.verify()
    assert len(problems) == 1 and digest in problems[0]


def test_protected_identities_store_embeddings_only(registry: Registry) -> None:
    a = registry.gallery.add("Famous Actor", "insightface", embedding(1, 512), note="press kit")
    b = registry.gallery.add("Politician", "dlib", embedding(2, 128))
    assert a.id != b.id and a.created_at.tzinfo is UTC
    np.testing.assert_array_equal(a.as_array(), embedding(1, 512))
    assert registry.gallery.all() == [a, b]
    assert registry.gallery.all(backend="dlib") == [b]
    before = registry.dump()
    assert before["blobs"] == []  # nothing but rows: no image is ever stored
    with pytest.raises(UnknownProtectedIdentityError):
        registry.gallery.remove(9999)
    with pytest.raises(ImagegenError, match="1-D vector"):
        registry.gallery.add("x", "dlib", np.ones((2, 3)))
    with pytest.raises(InvalidCharacterError, match="label"):
        registry.gallery.add("  ", "dlib", embedding(3))
    assert registry.dump() == before
    registry.gallery.remove(a.id)
    assert registry.gallery.all() == [b]


def test_concurrent_registrations_from_threads(registry: Registry) -> None:
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            registry.characters.register(make_character(f"char-{k}"), make_refs(3, start=10 * k))
            registry.characters.approve(f"char-{k}")
            registry.characters.all()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    characters = registry.characters.all()
    assert [c.id for c in characters] == sorted(f"char-{k}" for k in range(8))
    assert all(c.version == 2 and len(c.references) == 3 for c in characters)
    assert registry.verify() == []


def test_characters_belong_to_a_tenant(registry: Registry) -> None:
    mia = registry.characters.register(make_character("mia"), make_refs(1))
    noa = registry.characters.register(make_character("noa", tenant="acme"), make_refs(1, start=5))
    ada = registry.characters.register(make_character("ada", tenant="acme", status="approved"), make_refs(1, start=9))
    assert (mia.tenant, noa.tenant) == ("default", "acme")
    assert registry.characters.get("noa").tenant == "acme"
    assert [c.id for c in registry.characters.all()] == ["ada", "mia", "noa"]  # None: every tenant
    assert registry.characters.all(tenant="acme") == [ada, noa]
    assert registry.characters.all(tenant="acme", status="draft") == [noa]
    assert registry.characters.ids(tenant="default") == ["mia"] and registry.characters.ids(tenant="nobody") == []
    before = registry.dump()
    for bad in ("Acme", "../x", ""):
        with pytest.raises(InvalidTenantIdError, match="not a valid tenant id") as info:
            registry.characters.register(make_character("eve", tenant=bad), make_refs(1, start=20))
        assert info.value.field == "tenant"
        with pytest.raises(InvalidTenantIdError):
            registry.characters.all(tenant=bad)
    assert registry.dump() == before


def test_report_passed_is_stored_and_changed_without_a_version_bump(registry: Registry) -> None:
    stored = registry.characters.register(make_character("mia", report_passed=True), make_refs(1))
    assert (stored.report_passed, stored.version) == (True, 1)
    assert registry.characters.register(make_character("noa"), make_refs(1, start=3)).report_passed is None
    failed = registry.characters.set_report_passed("mia", False)
    assert (failed.report_passed, failed.version) == (False, 1) and failed.updated_at > stored.updated_at
    assert registry.characters.get("mia").report_passed is False
    before = registry.dump()
    with pytest.raises(InvalidCharacterError, match="True or False"):
        registry.characters.set_report_passed("mia", "yes")  # type: ignore[arg-type]
    with pytest.raises(UnknownCharacterError):
        registry.characters.set_report_passed("eve", True)
    with pytest.raises(InvalidCharacterError, match="report_passed"):
        registry.characters.register(make_character("eve", report_passed="yes"), make_refs(1, start=7))
    assert registry.dump() == before


def test_versions_never_restart_for_a_reused_id(registry: Registry) -> None:
    registry.characters.register(make_character("mia"), make_refs(1))
    registry.characters.approve("mia")
    assert registry.characters.update_card("mia", name="Mia Two").version == 3
    registry.characters.delete("mia")
    again = registry.characters.register(make_character("mia"), make_refs(1, start=40))
    assert again.version == 4 and again.status == "draft"
    assert registry.characters.approve("mia").version == 5
    registry.characters.delete("mia")
    assert registry.characters.register(make_character("mia"), make_refs(1, start=41)).version == 6
    # another id is not affected
    assert registry.characters.register(make_character("noa"), make_refs(1, start=42)).version == 1
