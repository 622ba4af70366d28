"""Export a character to one zip archive and import it into another registry."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from imagegen.identity.archive import ArchiveError, export_character, import_character, read_archive
from imagegen.identity.models import DuplicateCharacterError
from imagegen.identity.registry import Registry

from ._helpers import embedding, make_character, make_refs


@pytest.fixture
def source(isolated_home: Path) -> Registry:
    reg = Registry.open()
    reg.characters.register(
        make_character("mia", centroids={"dlib": embedding(3)}),
        make_refs(3, backends=("dlib", "insightface")),
    )
    reg.characters.approve("mia")
    reg.characters.set_age_check("mia", "passed")
    yield reg
    reg.close()


@pytest.fixture
def target(tmp_path: Path) -> Registry:
    reg = Registry(f"sqlite:///{tmp_path / 'target' / 'registry.db'}", tmp_path / "target" / "blobs")
    yield reg
    reg.close()


def rewrite(src: Path, dst: Path, change: dict[str, bytes | None], add: dict[str, bytes] | None = None) -> Path:
    """Copy a zip, replacing (or dropping, with None) some members and adding others."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename in change:
                if change[info.filename] is not None:
                    zout.writestr(info.filename, change[info.filename])
            else:
                zout.writestr(info, zin.read(info))
        for name, data in (add or {}).items():
            zout.writestr(zipfile.ZipInfo(name), data)
    return dst


def test_round_trip(source: Registry, target: Registry, tmp_path: Path) -> None:
    archive = export_character(source, "mia", tmp_path / "mia.zip")
    original = source.characters.get("mia")
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("manifest.json"))
    assert names[0] == "manifest.json"
    assert sorted(names[1:]) == sorted(f"blobs/{r.digest}" for r in original.references)
    assert manifest["format"] == "imagegen-character" and manifest["format_version"] == 1
    assert set(manifest["files"]) == set(names[1:])
    assert all(entry["sha256"] == name.split("/")[1] for name, entry in manifest["files"].items())
    assert not list(tmp_path.glob(".mia.zip.tmp-*"))

    imported = import_character(target, archive)
    assert imported == target.characters.get("mia")
    same = ("id", "name", "card", "provenance", "references", "centroids")
    assert imported.model_dump(include=set(same)) == original.model_dump(include=set(same))
    np.testing.assert_array_equal(imported.centroid("dlib"), embedding(3))
    # safeguards run again in the new registry, unless asked otherwise
    assert (imported.status, imported.age_check, imported.version) == ("draft", "unverified", 1)
    for ref in original.references:
        expected = source.characters.reference_bytes("mia", ref.digest)
        assert target.characters.reference_bytes("mia", ref.digest) == expected
    assert target.verify() == []

    with pytest.raises(ArchiveError, match="already exists"):
        export_character(source, "mia", archive)
    export_character(source, "mia", archive, overwrite=True)


def test_keep_status(source: Registry, target: Registry, tmp_path: Path) -> None:
    imported = import_character(target, export_character(source, "mia", tmp_path / "a.zip"), keep_status=True)
    assert (imported.status, imported.age_check) == ("approved", "passed")


def test_existing_id_is_refused(source: Registry, tmp_path: Path) -> None:
    archive = export_character(source, "mia", tmp_path / "mia.zip")
    before = source.dump()
    with pytest.raises(DuplicateCharacterError):
        import_character(source, archive)
    assert source.dump() == before


def _first_blob(archive: Path) -> str:
    with zipfile.ZipFile(archive) as zf:
        return next(n for n in zf.namelist() if n.startswith("blobs/"))


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
