"""Export a character to one zip archive and import it into another registry.

Import is registration: the archive's images go through ingestion (limits, re-encoding, metadata
stripped) and the safeguards of the importing registry, with faces analysed again. These tests
use real photos, a real dlib analyser and real registries.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagegen.identity.archive import (
    MAX_MEMBERS,
    ArchiveError,
    export_character,
    import_character,
    read_archive,
)
from imagegen.identity.characters import approve_character, register_character
from imagegen.identity.ingest import ImageTooLargeError
from imagegen.identity.models import DuplicateCharacterError, ReferenceInput
from imagegen.identity.registry import Registry
from imagegen.identity.safeguards import ProtectedIdentityMatchError, protect_from_images
from imagegen.ids import InvalidTenantIdError
from tests.photos import astronaut_set, bomb_png, encode, hopper_set, no_face

from ._helpers import fake_face, make_character


@pytest.fixture
def source(isolated_home: Path) -> Registry:
    """A registry holding 'mia' (three real photos, approved), stored without analysis: cheap to set up."""
    reg = Registry.open()
    stored_raw(reg, "mia", list(astronaut_set(3)))
    yield reg
    reg.close()


@pytest.fixture
def target(tmp_path: Path) -> Registry:
    reg = Registry(f"sqlite:///{tmp_path / 'target' / 'registry.db'}", tmp_path / "target" / "blobs")
    yield reg
    reg.close()


def stored_raw(registry: Registry, character_id: str, files: list[tuple[str, bytes]]) -> None:
    """A character stored through the registry's low-level API, bytes and (fake) analyses as given."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the 144-Mpixel header case
        refs = [
            ReferenceInput(data=data, filename=name, faces={"dlib": fake_face(i, 128)})
            for i, (name, data) in enumerate(files)
        ]
        registry.characters.register(make_character(character_id, status="approved", age_check="passed"), refs)


def rewrite(src: Path, dst: Path, change: dict[str, bytes | None], add: dict[str, bytes] | None = None) -> Path:
    """Copy a zip, replacing (or dropping, with None) some members and adding others (deflated)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename in change:
                if change[info.filename] is not None:
                    zout.writestr(info.filename, change[info.filename], compress_type=zipfile.ZIP_DEFLATED)
            else:
                zout.writestr(info, zin.read(info))
        for name, data in (add or {}).items():
            zout.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
    return dst


def _first_blob(archive: Path) -> str:
    with zipfile.ZipFile(archive) as zf:
        return next(n for n in zf.namelist() if n.startswith("blobs/"))


def test_round_trip(source: Registry, target: Registry, tmp_path: Path, dlib) -> None:
    register_character(
        source,
        character_id="ava",
        name="Ava",
        provenance={"kind": "synthetic", "creator": "art-team"},
        card={"look": "red hair", "personality": "curious", "style_notes": "warm light"},
        files=list(astronaut_set(3)),
        analyzer=dlib,
    )
    approve_character(source, "ava", dlib)
    archive = export_character(source, "ava", tmp_path / "ava.zip")
    original = source.characters.get("ava")
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("manifest.json"))
    assert names[0] == "manifest.json"
    assert sorted(names[1:]) == sorted(f"blobs/{r.digest}" for r in original.references)
    assert manifest["format"] == "imagegen-character" and manifest["format_version"] == 1
    assert set(manifest["files"]) == set(names[1:])
    assert all(entry["sha256"] == name.split("/")[1] for name, entry in manifest["files"].items())
    assert not list(tmp_path.glob(".ava.zip.tmp-*"))

    registration = import_character(target, archive, analyzer=dlib)
    imported = registration.character
    assert imported == target.characters.get("ava")
    same = ("id", "name", "card", "provenance")
    assert imported.model_dump(include=set(same)) == original.model_dump(include=set(same))
    # re-ingesting a stored (already normalised) reference gives back the same bytes, and the same faces
    assert [r.digest for r in imported.references] == [r.digest for r in original.references]
    np.testing.assert_allclose(imported.centroid("dlib"), original.centroid("dlib"), atol=1e-5)
    # safeguards run again in the new registry: a draft, checked here, in the default tenant
    assert (imported.status, imported.age_check, imported.version) == ("draft", "unverified", 1)
    assert (imported.tenant, imported.report_passed) == ("default", True)
    assert registration.report.passed
    for ref in original.references:
        expected = source.characters.reference_bytes("ava", ref.digest)
        assert target.characters.reference_bytes("ava", ref.digest) == expected
    assert target.verify() == []

    with pytest.raises(ArchiveError, match="already exists"):
        export_character(source, "ava", archive)
    export_character(source, "ava", archive, overwrite=True)


def test_tenant_is_the_importers(source: Registry, target: Registry, tmp_path: Path, dlib) -> None:
    archive = export_character(source, "mia", tmp_path / "mia.zip")
    before = target.dump()
    with pytest.raises(InvalidTenantIdError):
        import_character(target, archive, tenant="Not A Tenant", analyzer=dlib)
    assert target.dump() == before
    assert import_character(target, archive, tenant="acme", analyzer=dlib).character.tenant == "acme"


def test_keep_status_approves_only_when_the_checks_pass_here(
    source: Registry, target: Registry, tmp_path: Path, dlib
) -> None:
    imported = import_character(
        target, export_character(source, "mia", tmp_path / "a.zip"), keep_status=True, analyzer=dlib
    ).character
    # approved again here; the age check is this deployment's (no estimator installed: unverified)
    assert (imported.status, imported.age_check, imported.report_passed) == ("approved", "unverified", True)

    # an archive that says "approved" for a set whose report fails lands as a draft
    stored_raw(source, "mixed", [*astronaut_set(3), no_face()])
    registration = import_character(
        target, export_character(source, "mixed", tmp_path / "b.zip"), keep_status=True, analyzer=dlib
    )
    assert not registration.report.passed
    assert (registration.character.status, registration.character.report_passed) == ("draft", False)


def test_existing_id_is_refused(source: Registry, tmp_path: Path, dlib) -> None:
    archive = export_character(source, "mia", tmp_path / "mia.zip")
    before = source.dump()
    with pytest.raises(DuplicateCharacterError):
        import_character(source, archive, analyzer=dlib)
    assert source.dump() == before


def test_imported_references_lose_their_exif(source: Registry, target: Registry, tmp_path: Path, dlib) -> None:
    exif = Image.Exif()
    exif[0x010F] = "SecretCameraMaker"
    exif[0x8825] = {2: (51.0, 30.0, 0.0)}  # GPS latitude
    name, data = astronaut_set(2)[1]
    photo = Image.open(io.BytesIO(data))
    jpeg = encode(photo, "JPEG", quality=92, exif=exif.tobytes())
    stored_raw(source, "exif", [("astronaut.png", astronaut_set(1)[0][1]), ("with-exif.jpg", jpeg)])
    assert b"SecretCameraMaker" in source.characters.reference_bytes(
        "exif", source.characters.get("exif").references[1].digest
    )
    archive = export_character(source, "exif", tmp_path / "exif.zip")

    imported = import_character(target, archive, analyzer=dlib).character
    for ref in imported.references:
        stored = target.characters.reference_bytes("exif", ref.digest)
        reopened = Image.open(io.BytesIO(stored))
        assert ref.mime_type == "image/png" and reopened.format == "PNG"
        assert not reopened.getexif() and "exif" not in reopened.info and b"SecretCameraMaker" not in stored
    # the archive's (forged) face analyses are replaced by this registry's own
    assert all(len(ref.faces["dlib"].embedding) == 128 for ref in imported.references)
    assert imported.references[1].faces["dlib"].model_version != "fake-face-1"


def test_a_member_with_a_144_mpixel_header_is_refused(source: Registry, target: Registry, tmp_path: Path, dlib):
    stored_raw(source, "huge", [("astronaut.png", astronaut_set(1)[0][1]), ("huge.png", bomb_png(12000, 12000))])
    archive = export_character(source, "huge", tmp_path / "huge.zip")
    before = target.dump()
    with pytest.raises(ImageTooLargeError, match="12000x12000 pixels is over the limit") as info:
        import_character(target, archive, analyzer=dlib)
    assert info.value.code == "image_too_large"
    assert target.dump() == before


def test_forged_embeddings_do_not_dodge_the_protected_gallery(
    source: Registry, target: Registry, tmp_path: Path, dlib
) -> None:
    from imagegen.identity.characters import ingest_all

    protect_from_images(target, "Grace Hopper", ingest_all([hopper_set(1)[0]]), dlib)
    # the archive claims random embeddings for a real person's photos
    stored_raw(source, "hopperish", list(hopper_set(2)))
    archive = export_character(source, "hopperish", tmp_path / "h.zip")
    before = target.dump()
    with pytest.raises(ProtectedIdentityMatchError, match="Grace Hopper"):
        import_character(target, archive, analyzer=dlib)
    assert target.dump() == before


def test_a_zip_bomb_is_refused_from_the_directory_before_inflating(
    source: Registry, target: Registry, tmp_path: Path
) -> None:
    archive = export_character(source, "mia", tmp_path / "mia.zip")
    bomb = rewrite(archive, tmp_path / "bomb.zip", {_first_blob(archive): bytes(64 << 20)})
    assert bomb.stat().st_size < 1 << 20  # 64 MiB of zeros deflates to a few tens of KB
    before = target.dump()
    with pytest.raises(ArchiveError, match="would unpack to 67,108,864 bytes .*refused before unpacking"):
        import_character(target, bomb)
    assert target.dump() == before


def _patch_sizes(path: Path, member: str, claimed: int) -> None:
    """Make the zip directory (central and local headers) claim ``claimed`` uncompressed bytes for ``member``."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    struct.pack_into("<I", raw, info.header_offset + 22, claimed)  # local header: uncompressed size
    central = raw.rfind(b"PK\x01\x02" + raw[info.header_offset + 4 : info.header_offset + 6])
    name = member.encode()
    while raw[central + 46 : central + 46 + len(name)] != name:
        central = raw.rfind(b"PK\x01\x02", 0, central)
    struct.pack_into("<I", raw, central + 24, claimed)  # central directory: uncompressed size
    path.write_bytes(bytes(raw))


def test_a_member_that_lies_about_its_size_is_cut_off_while_inflating(
    source: Registry, target: Registry, tmp_path: Path
) -> None:
    archive = export_character(source, "mia", tmp_path / "mia.zip")
    name = _first_blob(archive)
    with zipfile.ZipFile(archive) as zf:
        real_size = zf.getinfo(name).file_size
    liar = rewrite(archive, tmp_path / "liar.zip", {name: bytes(64 << 20)})
    _patch_sizes(liar, name, real_size)
    with zipfile.ZipFile(liar) as zf:
        assert zf.getinfo(name).file_size == real_size  # the directory passes the size checks
    before = target.dump()
    with pytest.raises(ArchiveError, match="cannot be read"):
        import_character(target, liar)
    assert target.dump() == before


def test_too_many_members_are_refused(source: Registry, target: Registry, tmp_path: Path) -> None:
    archive = export_character(source, "mia", tmp_path / "mia.zip")
    extra = {f"blobs/{i:064x}": b"x" for i in range(MAX_MEMBERS)}
    crowded = rewrite(archive, tmp_path / "crowded.zip", {}, add=extra)
    with pytest.raises(ArchiveError, match=f"more than {MAX_MEMBERS}"):
        import_character(target, crowded)
    assert target.characters.all() == []


def test_tampered_blob_is_refused_before_anything_is_written(
    source: Registry, target: Registry, tmp_path: Path
) -> None:
    archive = export_character(source, "mia", tmp_path / "mia.zip")
    name = _first_blob(archive)
    with zipfile.ZipFile(archive) as zf:
        data = bytearray(zf.read(name))
    data[len(data) // 2] ^= 0xFF
    bad = rewrite(archive, tmp_path / "bad.zip", {name: bytes(data)})
    before = target.dump()
    with pytest.raises(ArchiveError, match="checksum mismatch"):
        import_character(target, bad)
    assert target.dump() == before


def test_tampered_bytes_on_disk_are_refused(source: Registry, target: Registry, tmp_path: Path) -> None:
    archive = export_character(source, "mia", tmp_path / "mia.zip")
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(_first_blob(archive))
    raw[info.header_offset + 30 + len(info.filename) + 40] ^= 0x01  # a byte inside the stored blob
    bad = tmp_path / "flipped.zip"
    bad.write_bytes(bytes(raw))
    before = target.dump()
    with pytest.raises(ArchiveError):
        import_character(target, bad)
    assert target.dump() == before


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("format_version"), "format version"),
        (lambda m: m.update(format="zip-of-cats"), "not an imagegen character archive"),
        (lambda m: m.update(extra_field=1), "schema"),
        (lambda m: m["character"].pop("provenance"), "provenance"),
        (lambda m: m["character"].update(id="../../evil"), "not a valid character id"),
        (lambda m: m["files"].popitem(), "lacks|does not list"),
        (lambda m: m["character"]["references"].pop(), "do not match"),
        (lambda m: next(iter(m["files"].values())).update(sha256="0" * 64), "not its digest"),
    ],
)
def test_invalid_manifest_is_refused(source: Registry, target: Registry, tmp_path: Path, edit, message) -> None:
    archive = export_character(source, "mia", tmp_path / "mia.zip")
    with zipfile.ZipFile(archive) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    edit(manifest)
    bad = rewrite(archive, tmp_path / "bad.zip", {"manifest.json": json.dumps(manifest).encode()})
    before = target.dump()
    with pytest.raises(ArchiveError, match=message):
        import_character(target, bad)
    assert target.dump() == before


@pytest.mark.parametrize(
    "member", ["../evil", "/etc/evil", "blobs/../../evil", "C:/evil", "blobs\\evil", "./manifest2.json"]
)
def test_unsafe_member_paths_are_refused(source: Registry, target: Registry, tmp_path: Path, member: str) -> None:
    archive = export_character(source, "mia", tmp_path / "mia.zip")
    bad = rewrite(archive, tmp_path / "bad.zip", {}, add={member: b"payload"})
    before = target.dump()
    with pytest.raises(ArchiveError, match="refused"):
        import_character(target, bad)
    assert target.dump() == before
    assert not (tmp_path / "evil").exists()


def test_unlisted_member_and_garbage_files_are_refused(source: Registry, target: Registry, tmp_path: Path) -> None:
    archive = export_character(source, "mia", tmp_path / "mia.zip")
    extra = rewrite(archive, tmp_path / "extra.zip", {}, add={"blobs/" + "a" * 64: b"x"})
    with pytest.raises(ArchiveError, match="does not list"):
        read_archive(extra)
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"this is not a zip file")
    with pytest.raises(ArchiveError, match="not a readable zip"):
        import_character(target, garbage)
    with pytest.raises(ArchiveError, match="not a file"):
        import_character(target, tmp_path / "missing.zip")
    assert target.characters.all() == []
