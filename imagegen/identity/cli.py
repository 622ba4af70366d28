"""``imagegen characters ...`` and ``imagegen protect ...``: the artist's side of the registry."""

from __future__ import annotations

import getpass
import json
from datetime import date
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from imagegen.errors import ImagegenError
from imagegen.ids import DEFAULT_TENANT, validate_tenant_id

characters_app = typer.Typer(help="Register, inspect, approve, export and delete characters.", no_args_is_help=True)
protect_app = typer.Typer(
    help="The protected-identity gallery (embeddings of people who must not be rendered).", no_args_is_help=True
)
console = Console(width=200)


def _registry():
    from imagegen.identity.registry import Registry

    return Registry.open()


def _read_files(paths: list[Path]) -> list[tuple[str, bytes]]:
    files = []
    for path in paths:
        try:
            files.append((path.name, path.read_bytes()))
        except OSError as exc:
            raise ImagegenError(f"cannot read {path}: {exc.strerror or exc}", field="images") from exc
    return files


def _read_card(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        card = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ImagegenError(f"cannot read the card {path}: {exc}", field="card") from exc
    if not isinstance(card, dict):
        raise ImagegenError(f"{path}: a card is a mapping with look, personality, style_notes", field="card")
    return card


def print_report(registration) -> None:
    report = registration.report
    table = Table(title=f"reference report: {registration.character.id}")
    for column in ("#", "file", "face", "px", "sharpness", "yaw", "similarity", "flags"):
        table.add_column(column)
    for q in report.images:
        table.add_row(
            str(q.index),
            escape(q.filename),
            "yes" if q.face_found else "no",
            "-" if q.face_px is None else f"{q.face_px:.0f}",
            "-" if q.sharpness is None else f"{q.sharpness:.0f}",
            "-" if q.yaw_deg is None else f"{q.yaw_deg:.0f}",
            "-" if q.similarity is None else f"{q.similarity:.3f}",
            ", ".join(q.flags) or "ok",
        )
    console.print(table)
    colour = "green" if report.passed else "red"
    consistency = "n/a" if report.consistency is None else f"{report.consistency:.3f}"
    console.print(
        f"verdict: [bold {colour}]{report.verdict}[/]  consistency {consistency} "
        f"(threshold {report.threshold}, backend {report.backend})  age check: {registration.age.status}"
    )
    for reason in report.reasons:
        console.print(f"  [red]x[/] {escape(reason)}")
    for warning in report.warnings:
        console.print(f"  [yellow]![/] {escape(warning)}")


@characters_app.command("add")
def add(
    character_id: str = typer.Argument(..., metavar="ID", help="Slug: a-z, 0-9, '-' and '_', up to 64 characters."),
    name: str = typer.Option(..., help="Display name."),
    images: list[Path] = typer.Argument(..., metavar="PATHS...", help="Reference images (PNG/JPEG/WebP)."),
    images_marker: bool = typer.Option(False, "--images", help="Optional marker before the image paths."),
    provenance: str = typer.Option(..., help="synthetic | consented | licensed"),
    creator: str = typer.Option(None, help="Who made or holds the rights (default: the current user)."),
    evidence: str = typer.Option("", help="Consent form / licence reference (required unless synthetic)."),
    made_on: str = typer.Option(None, "--date", help="Provenance date, YYYY-MM-DD (default: today)."),
    card: Path = typer.Option(None, help="YAML card: look, personality, style_notes."),
    out: Path = typer.Option(Path("out/characters"), help="Where the report and contact sheet go."),
    tenant: str = typer.Option(DEFAULT_TENANT, help="The tenant that owns the character."),
) -> None:
    """Register a character from reference images; prints the report and writes the contact sheet."""
    from imagegen.identity.characters import register_character

    registry = _registry()
    registration = register_character(
        registry,
        character_id=character_id,
        name=name,
        provenance={
            "kind": provenance,
            "creator": creator or getpass.getuser(),
            "evidence": evidence,
            "date": made_on or date.today().isoformat(),
        },
        card=_read_card(card),
        files=_read_files(images),
        tenant=tenant,
    )
    print_report(registration)
    for label, path in registration.write_artifacts(out).items():
        console.print(f"{label}: {path}")
    console.print(f"registered '{registration.character.id}' as {registration.character.status}")


@characters_app.command("list")
def list_characters() -> None:
    """Every registered character."""
    table = Table(title="characters")
    for column in ("id", "name", "status", "version", "references", "provenance", "age check"):
        table.add_column(column)
    for c in _registry().characters.all():
        table.add_row(
            c.id, escape(c.name), c.status, str(c.version), str(len(c.references)), c.provenance.kind, c.age_check
        )
    console.print(table)


@characters_app.command("show")
def show(character_id: str = typer.Argument(..., metavar="ID")) -> None:
    """One character as JSON (card, provenance, references; no embeddings)."""
    character = _registry().characters.get(character_id)
    data = character.model_dump(mode="json")
    for ref in data["references"]:
        for face in ref["faces"].values():
            face.pop("embedding", None)
    data["centroids"] = sorted(data["centroids"])
    console.print_json(json.dumps(data))


@characters_app.command("report")
def report(
    character_id: str = typer.Argument(..., metavar="ID"),
    out: Path = typer.Option(Path("out/characters"), help="Where the report and contact sheet go."),
) -> None:
    """Re-analyse a character's references: the report, safeguards and contact sheet."""
    from imagegen.identity.characters import recheck_character

    registration = recheck_character(_registry(), character_id)
    print_report(registration)
    for label, path in registration.write_artifacts(out).items():
        console.print(f"{label}: {path}")


@characters_app.command("approve")
def approve(character_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Approve a character: its reference report must pass and the safeguards must agree."""
    from imagegen.identity.characters import approve_character

    registration = approve_character(_registry(), character_id)
    console.print(f"approved '{character_id}' (version {registration.character.version})")


@characters_app.command("prepare")
def prepare(
    character_id: str = typer.Argument(..., metavar="ID"),
    preset: str = typer.Option("tiny-flux", help="Preset whose identity method to prepare for."),
    method: str = typer.Option(None, help="Identity method (default: the preset's)."),
    allow_draft: bool = typer.Option(False, help="Prepare a character that is not approved yet."),
) -> None:
    """Compute and cache a character's identity tensors now, instead of on its first render."""
    from imagegen.identity.provider import RegistryIdentity
    from imagegen.pipelines.loading import pick_device, pick_dtype
    from imagegen.pipelines.presets import get_preset

    chosen = get_preset(preset)
    identity = RegistryIdentity(_registry(), allow_draft=allow_draft)
    identity.renderable(character_id)  # unknown or draft: refused before any model loads
    device = pick_device(identity.settings)
    method_obj = identity.load(identity.resolve_method(chosen, method), chosen, device, pick_dtype(chosen, device))
    tensors = identity.tensors_for(character_id, method_obj)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items())
    state = "computed" if identity.conditioning_cache.computed else "already cached"
    console.print(f"{method_obj.name} for '{character_id}': {state} ({shapes})")


@characters_app.command("delete")
def delete(character_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Delete a character and every byte of it; says how much was removed."""
    removed = _registry().characters.delete(character_id)
    console.print(
        f"deleted '{character_id}': {removed.references} references, {removed.face_analyses} face analyses, "
        f"{removed.conditioning} cached tensors, {removed.blobs_removed} blobs, {removed.bytes_removed:,} bytes removed"
    )


@characters_app.command("export")
def export(character_id: str = typer.Argument(..., metavar="ID"), file: Path = typer.Argument(...)) -> None:
    """Write one portable archive (manifest + checksums + images)."""
    from imagegen.identity.archive import export_character

    console.print(str(export_character(_registry(), character_id, file)))


@characters_app.command("import")
def import_(
    file: Path = typer.Argument(..., help="An archive written by `characters export`."),
    tenant: str = typer.Option(DEFAULT_TENANT, help="The tenant that owns the imported character."),
    keep_status: bool = typer.Option(
        False, help="Approve an archive's approved character here too, when this deployment's report passes."
    ),
) -> None:
    """Import an archive: checked completely, then registered like an upload (re-ingested, re-analysed,
    protected-identity and age checks); it arrives as a draft."""
    from imagegen.identity.archive import import_character

    registration = import_character(_registry(), file, keep_status=keep_status, tenant=validate_tenant_id(tenant))
    print_report(registration)
    character = registration.character
    console.print(
        f"imported '{character.id}' with {len(character.references)} references as {character.status} "
        f"(tenant {character.tenant})"
    )


@protect_app.command("add")
def protect_add(
    label: str = typer.Argument(..., help="Who this protects."),
    images: list[Path] = typer.Argument(..., metavar="PATHS...", help="Face photos; only embeddings are kept."),
    images_marker: bool = typer.Option(False, "--images", help="Optional marker before the image paths."),
    note: str = typer.Option("", help="Why, or on whose request."),
) -> None:
    """Add a protected identity from photos (the photos themselves are not stored)."""
    from imagegen.faces import get_analyzer
    from imagegen.identity.characters import ingest_all
    from imagegen.identity.safeguards import protect_from_images

    ids = protect_from_images(_registry(), label, ingest_all(_read_files(images)), get_analyzer(), note=note)
    console.print(f"protected '{escape(label)}': {len(ids)} embedding(s), ids {ids}")


@protect_app.command("list")
def protect_list() -> None:
    """The protected identities (labels and backends; never images)."""
    table = Table(title="protected identities")
    for column in ("id", "label", "backend", "note", "added"):
        table.add_column(column)
    for p in _registry().gallery.all():
        table.add_row(str(p.id), escape(p.label), p.backend, escape(p.note), str(p.created_at))
    console.print(table)


@protect_app.command("remove")
def protect_remove(protected_id: int = typer.Argument(..., metavar="ID")) -> None:
    """Remove one protected-identity embedding."""
    _registry().gallery.remove(protected_id)
    console.print(f"removed protected identity {protected_id}")
