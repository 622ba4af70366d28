"""Export a character to one portable zip archive, and import it into another registry.

Layout of an archive::

    manifest.json          format, format_version, exported_at, the character (card, provenance,
                           references with their face analyses, centroids) and, for every other
                           member, its sha256 and size
    blobs/<sha256>         one reference image per member, named by its digest

Cached conditioning tensors are not exported: they depend on method weights and are recomputed
where the character is imported.

An archive is untrusted input, like an upload. ``import_character`` reads and checks the whole
archive (member names, member count, sizes from the zip directory and again while inflating, the
manifest schema, every checksum) before it writes anything, then registers the character through
``identity.characters.register_character``: the same path as an upload, so each reference is
re-ingested (pixel limits from its header, shrunk, re-encoded with every metadata chunk
stripped), its faces are analysed again by this deployment's analyser (the archive's face
analyses and centroids are not trusted: a forged embedding could dodge the protected gallery),
and the protected-identity and age checks run. It refuses members with absolute paths, ``..``,
backslashes, links or unexpected names, and an id that is already registered.

An imported character is a ``draft`` owned by the tenant the importer names. With
``keep_status`` an archive's ``approved`` character is approved here too, through
``approve_character``, and only when this deployment's report passes; otherwise it stays a draft.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import zipfile
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from imagegen.blobstore import sha256_hex, validate_digest
from imagegen.errors import ImagegenError
from imagegen.identity.characters import MAX_REFERENCES, Registration, approve_character, register_character
from imagegen.identity.ingest import MAX_BYTES
from imagegen.identity.models import Character, RegistryError
from imagegen.identity.registry import Registry
from imagegen.ids import DEFAULT_TENANT

if TYPE_CHECKING:
    from imagegen.faces import FaceAnalyzer
    from imagegen.settings import Settings

ARCHIVE_FORMAT = "imagegen-character"
ARCHIVE_VERSION = 1
MANIFEST_NAME = "manifest.json"
BLOB_DIR = "blobs"
#: the manifest: card, provenance and face analyses (embeddings as JSON) of up to MAX_REFERENCES images
MAX_MANIFEST_BYTES = 16 << 20
#: one reference image: what an upload may be
MAX_MEMBER_BYTES = MAX_BYTES
#: everything unpacked, all members together
MAX_TOTAL_BYTES = 256 << 20
#: the manifest and one member per reference
MAX_MEMBERS = MAX_REFERENCES + 1
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_FILE_ATTR = (stat.S_IFREG | 0o644) << 16


class ArchiveError(RegistryError):
    """A character archive that cannot be written or is not safe/valid to import."""

    code = "invalid_archive"
    field = "archive"


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str
    size: int = Field(ge=0, le=MAX_MEMBER_BYTES)

    @field_validator("sha256")
    @classmethod
    def _digest(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be 64 lowercase hex characters")
        return value


class Manifest(BaseModel):
    """The schema of ``manifest.json``."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["imagegen-character"]
    format_version: Literal[1]
    exported_at: datetime
    character: dict[str, Any]
    files: dict[str, FileEntry]


def _blob_member(digest: str) -> str:
    return f"{BLOB_DIR}/{validate_digest(digest)}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# -- export ----------------------------------------------------------------------------------------
def export_character(
    registry: Registry, character_id: str, path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write character ``character_id`` to the zip archive ``path`` (atomically); returns the path."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ArchiveError(f"{path} already exists; choose another file name or pass overwrite=True")
    character = registry.characters.get(character_id)
    blobs: dict[str, bytes] = {}
    for ref in character.references:
        blobs[_blob_member(ref.digest)] = registry.characters.reference_bytes(character_id, ref.digest)
    manifest = {
        "format": ARCHIVE_FORMAT,
        "format_version": ARCHIVE_VERSION,
        "exported_at": datetime.now(UTC).isoformat(),
        "character": character.model_dump(mode="json"),
        "files": {name: {"sha256": sha256_hex(data), "size": len(data)} for name, data in blobs.items()},
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True, indent=2, allow_nan=False).encode()

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    try:
        with open(tmp, "xb") as fh:
            with zipfile.ZipFile(fh, "w") as zf:
                info = zipfile.ZipInfo(MANIFEST_NAME, date_time=_ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = _FILE_ATTR
                zf.writestr(info, manifest_bytes)
                for name in sorted(blobs):
                    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
                    info.compress_type = zipfile.ZIP_STORED  # images are compressed already
                    info.external_attr = _FILE_ATTR
                    zf.writestr(info, blobs[name])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


# -- import ----------------------------------------------------------------------------------------
def _check_member_name(name: str) -> None:
    """Refuse names that could escape a directory if anyone ever extracted the archive."""
    if not name or name.startswith(("/", "\\")) or "\\" in name or "\x00" in name or re.match(r"^[A-Za-z]:", name):
        raise ArchiveError(
            f"the archive member {name!r} has an absolute or non-portable path; this archive was not "
            "written by export_character and is refused"
        )
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ArchiveError(
            f"the archive member {name!r} contains '..', '.' or an empty path component; this "
            "archive was not written by export_character and is refused"
        )


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """The member's bytes, never more than ``limit`` of them inflated (whatever the directory said)."""
    try:
        with zf.open(info) as fh:
            data = fh.read(limit + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as exc:
        raise ArchiveError(
            f"the archive member {info.filename!r} cannot be read ({exc}); the archive is damaged or "
            "was modified after export, export the character again"
        ) from None
    if len(data) > limit:
        raise ArchiveError(f"the archive member {info.filename!r} inflates to more than {limit:,} bytes; refused")
    return data


def _member_limit(name: str) -> int:
    return MAX_MANIFEST_BYTES if name == MANIFEST_NAME else MAX_MEMBER_BYTES


def _check_directory(path: Path, infos: list[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
    """Names, types, count and sizes from the zip directory, before a single member is inflated."""
    if len(infos) > MAX_MEMBERS:
        raise ArchiveError(
            f"{path} has {len(infos)} members, more than {MAX_MEMBERS} (a manifest and at most "
            f"{MAX_REFERENCES} references); refused"
        )
    by_name: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        _check_member_name(info.filename)
        file_type = stat.S_IFMT(info.external_attr >> 16)  # 0 when the writer set no type
        if info.is_dir() or (file_type and file_type != stat.S_IFREG):
            raise ArchiveError(f"the archive member {info.filename!r} is not a regular file; refused")
        if info.filename in by_name:
            raise ArchiveError(f"the archive member {info.filename!r} appears twice; refused")
        limit = _member_limit(info.filename)
        if info.file_size > limit:
            raise ArchiveError(
                f"the archive member {info.filename!r} would unpack to {info.file_size:,} bytes (says the zip "
                f"directory), over the {limit:,}-byte limit; refused before unpacking"
            )
        total += info.file_size
        by_name[info.filename] = info
    if total > MAX_TOTAL_BYTES:
        raise ArchiveError(
            f"{path} would unpack to {total:,} bytes (says the zip directory), over the {MAX_TOTAL_BYTES:,}-byte "
            "limit; refused before unpacking"
        )
    if MANIFEST_NAME not in by_name:
        raise ArchiveError(f"{path} has no {MANIFEST_NAME}; it is not a character archive")
    return by_name


def read_archive(path: str | os.PathLike[str]) -> tuple[Character, list[tuple[str, bytes]]]:
    """Read and check an archive completely; returns the character and its references' files.

    The files are ``(filename, bytes)`` as an upload would give them, in the character's
    reference order, each verified against its checksum; nothing is decoded and nothing is
    written. Raises ``ArchiveError`` for anything wrong with the archive.
    """
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"{path} is not a file; give the path of an archive from export_character")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{path} is not a readable zip archive ({exc}); export the character again") from None
    with zf:
        by_name = _check_directory(path, zf.infolist())
        raw_manifest = _read_member(zf, by_name[MANIFEST_NAME], MAX_MANIFEST_BYTES)
        manifest = _parse_manifest(raw_manifest)
        listed = set(manifest.files)
        present = set(by_name) - {MANIFEST_NAME}
        if present - listed:
            raise ArchiveError(
                f"the archive holds members the manifest does not list: {sorted(present - listed)[:3]}; "
                "it was modified after export and is refused"
            )
        if listed - present:
            raise ArchiveError(
                f"the manifest lists members the archive lacks: {sorted(listed - present)[:3]}; "
                "the archive is incomplete, export it again"
            )

        try:
            character = Character.model_validate(manifest.character)
        except ImagegenError as exc:
            raise ArchiveError(f"{MANIFEST_NAME} holds an invalid character: {exc}") from None

        needed = {_blob_member(ref.digest): ref.digest for ref in character.references}
        if set(needed) != listed:
            raise ArchiveError(
                f"{MANIFEST_NAME}: the files do not match the character's references "
                "(each reference needs exactly one blobs/<digest> member); refused"
            )

        contents: dict[str, bytes] = {}
        unpacked = len(raw_manifest)
        for name, entry in sorted(manifest.files.items()):
            if entry.sha256 != needed[name]:
                raise ArchiveError(f"{MANIFEST_NAME}: the checksum listed for {name!r} is not its digest")
            data = _read_member(zf, by_name[name], min(entry.size, MAX_MEMBER_BYTES))
            unpacked += len(data)
            if unpacked > MAX_TOTAL_BYTES:  # the directory may lie; what was inflated does not
                raise ArchiveError(f"{path} unpacks to more than {MAX_TOTAL_BYTES:,} bytes; refused")
            if len(data) != entry.size or sha256_hex(data) != entry.sha256:
                raise ArchiveError(
                    f"checksum mismatch for {name!r}: the archive was damaged or modified after "
                    "export; export the character again"
                )
            contents[name] = data

    files = [(ref.filename or ref.digest[:12], contents[_blob_member(ref.digest)]) for ref in character.references]
    return character, files


def _parse_manifest(raw: bytes) -> Manifest:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArchiveError(f"{MANIFEST_NAME} is not valid JSON ({exc}); export the character again") from None
    if not isinstance(data, dict):
        raise ArchiveError(f"{MANIFEST_NAME} must hold a JSON object")
    if data.get("format") != ARCHIVE_FORMAT:
        raise ArchiveError(f"this is not an imagegen character archive (format {data.get('format')!r})")
    if data.get("format_version") != ARCHIVE_VERSION:
        raise ArchiveError(
            f"the archive has format version {data.get('format_version')!r}; this imagegen reads "
            f"version {ARCHIVE_VERSION} (upgrade imagegen, or export with the same version)"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False))
        raise ArchiveError(f"{MANIFEST_NAME} does not follow the archive schema: {details}") from None


def import_character(
    registry: Registry,
    path: str | os.PathLike[str],
    *,
    keep_status: bool = False,
    tenant: str = DEFAULT_TENANT,
    analyzer: FaceAnalyzer | None = None,
    settings: Settings | None = None,
) -> Registration:
    """Import a character archive into ``registry`` as ``tenant``'s; returns the registration.

    The archive is checked completely, then the character is registered by
    ``register_character`` exactly as an upload would be (re-ingested references, fresh face
    analyses and centroid, protected-identity and age checks; all or nothing), starting at
    version 1 as a ``draft``. With ``keep_status`` an archive's ``approved`` character is then
    approved by ``approve_character`` when this deployment's reference report passes; it stays
    a draft when it does not. Raises ``DuplicateCharacterError`` when the id is already registered.
    """
    character, files = read_archive(path)
    registration = register_character(
        registry,
        character_id=character.id,
        name=character.name,
        provenance=character.provenance,
        card=character.card,
        files=files,
        analyzer=analyzer,
        settings=settings,
        tenant=tenant,
    )
    if keep_status and character.status == "approved" and registration.report.passed:
        registration = approve_character(registry, character.id, analyzer, settings)
    return registration
