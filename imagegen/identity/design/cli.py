"""``imagegen characters design | turnaround | curate | register | design-delete``: the design flow locally.

The steps of ``flow.py`` with a local ``Renderer`` (the same draft-aware identity provider the
service's replicas use) and a progress bar; a design is named by its character id (one live design
per id and tenant). Every image is written under ``--out`` (default ``out/designs/ID``) as the PNG
the design stores, so ``--from candidate-03.png`` is recognised by its pixels as this design's
candidate; any other file is an upload and needs ``--provenance licensed|consented --evidence``.
"""

from __future__ import annotations

import getpass
import io
import json
import uuid
from collections.abc import Sequence
from pathlib import Path

import typer
from PIL import Image
from rich.markup import escape
from rich.table import Table

from imagegen.errors import ImagegenError
from imagegen.ids import DEFAULT_TENANT
from imagegen.terminal import console, ensure_writable_dir, progress_bar

DEFAULT_OUT = Path("out/designs")


def _flow(grid: Path | None = None):
    from imagegen.identity.design.flow import DesignFlow
    from imagegen.identity.design.grid import load_grid_config
    from imagegen.identity.design.store import DesignStore
    from imagegen.identity.registry import Registry

    store = DesignStore.open()
    store.expire()
    return DesignFlow(store, Registry.open(), grid=load_grid_config(grid))


def render_locally(preset: str, plans: Sequence, what: str) -> list:
    """Render ``plans`` with a local renderer of ``preset`` (batched, with a progress bar)."""
    from imagegen.identity.design.flow import Rendered
    from imagegen.identity.provider import identity_renderer
    from imagegen.images import png_info

    renderer = identity_renderer(preset)
    outcomes = []
    with progress_bar() as bar:
        task = bar.add_task(f"{what} ({preset})", total=len(plans))
        for start in range(0, len(plans), 4):
            chunk = plans[start : start + 4]
            for result in renderer.render([p.request for p in chunk]):
                if result.image is None:
                    outcomes.append(Rendered(None, uuid.uuid4().hex, result.metadata(), result.problem))
                else:
                    buffer = io.BytesIO()
                    result.image.save(buffer, format="PNG", pnginfo=png_info(result.metadata()))
                    outcomes.append(Rendered(buffer.getvalue(), uuid.uuid4().hex, result.metadata()))
                bar.advance(task)
    return outcomes


def _write(flow, design, kind: str, out: Path) -> list[Path]:
    """Write the design's images of ``kind`` and a contact sheet of them; returns the files."""
    from imagegen.images import contact_sheet

    out = ensure_writable_dir(out)
    written, images, labels = [], [], []
    for image in design.of_kind(kind):
        data = flow.store.blobs(design.id).get(image.blob)
        view = f"-{image.slot['view']}" if image.slot else ""
        path = out / f"{kind}-{image.index:02d}{view}.png"
        path.write_bytes(data)
        written.append(path)
        images.append(Image.open(io.BytesIO(data)).convert("RGB"))
        face = image.face or {}
        label = f"{image.index}: {face.get('note', '')}"
        if kind == "slot":
            label = f"{image.index} {'kept' if image.kept else 'dropped'}: " + (
                "not analysable" if not image.analysable else face.get("note", "")
            )
        labels.append(label[:40])
    if images:
        sheet = out / f"{kind}s.png"
        contact_sheet(images, labels, columns=min(4, len(images)), cell=160).save(sheet)
        written.append(sheet)
    return written


def _show(design, title: str) -> None:
    table = Table(title=title)
    for column in ("#", "kind", "view", "seed", "face", "analysable", "similarity", "kept"):
        table.add_column(column)
    for image in sorted(design.images, key=lambda i: (i.kind, i.index)):
        slot = image.slot or {}
        table.add_row(
            str(image.index),
            image.kind,
            escape("/".join(filter(None, (slot.get("view"), slot.get("expression"), slot.get("lighting"))))) or "-",
            str((image.recipe or {}).get("seed", "-")),
            escape((image.face or {}).get("note", "-")),
            "yes" if image.analysable else "no",
            "-" if image.similarity is None else f"{image.similarity:.3f}",
            "yes" if image.kept else "no",
        )
    console.print(table)
    if design.report:
        colour = "green" if design.report["verdict"] == "pass" else "red"
        console.print(f"report verdict: [bold {colour}]{design.report['verdict']}[/]")
        for problem in design.report.get("problems", []):
            console.print(f"  [red]x[/] {escape(problem)}")
        if design.report.get("unanalysable"):
            console.print(f"  not analysable by the face backend (left out): slots {design.report['unanalysable']}")
    if design.status == "failed":
        raise ImagegenError(f"the design's render failed: {design.error}")


def _render_or_fail(flow, design, plans, what: str) -> list:
    """Render ``plans`` here; a failed or interrupted render marks the design failed (no half-made stage)."""
    try:
        return render_locally(design.preset, plans, what)
    except ImagegenError as exc:
        flow.fail(design, str(exc))
        raise
    except BaseException:
        flow.fail(design, "interrupted")
        raise


def _report(flow, design, title: str, kind: str, target: Path) -> None:
    """Show the design, write its ``kind`` images and ``design.json`` into ``target``."""
    from imagegen.identity.design.flow import design_dict

    _show(design, title)
    for path in _write(flow, design, kind, target):
        console.print(str(path))
    (target / "design.json").write_text(json.dumps(design_dict(design), indent=2))


def _provenance(kind: str | None, creator: str | None, evidence: str) -> dict | None:
    if kind is None:
        return None
    return {"kind": kind, "who": creator or getpass.getuser(), "evidence": evidence}


def design(
    character_id: str = typer.Argument(..., metavar="ID", help="The character id the design will register as."),
    card: Path = typer.Option(..., help="YAML card: look, personality, style_notes."),
    candidates: int = typer.Option(8, help="How many candidate portraits to render (1-16)."),
    name: str = typer.Option(None, help="Display name (default: the id)."),
    preset: str = typer.Option("tiny-flux", help="Model preset."),
    seed: int = typer.Option(None, help="Seed of candidate 0 (candidate i: seed + i). Random if unset."),
    out: Path = typer.Option(DEFAULT_OUT, help="Images go to OUT/ID/."),
    tenant: str = typer.Option(DEFAULT_TENANT, help="The tenant that owns the design."),
) -> None:
    """Describe: render candidate portraits from a card, each with a face check; writes them and a sheet."""
    from imagegen.identity.cli import _read_card

    flow = _flow()
    card_data = _read_card(card)
    target = ensure_writable_dir(out / character_id)
    started, plans = flow.start(
        character_id=character_id,
        name=name or character_id,
        card=card_data,
        preset=preset,
        candidates=candidates,
        seed=seed,
        tenant=tenant,
    )
    try:
        results = render_locally(preset, plans, "candidates")
    except BaseException:
        flow.store.delete(started.id)  # nothing half-made stays behind
        raise
    done = flow.record_candidates(started, plans, results)
    _report(flow, done, f"design of {character_id}: candidates", "candidate", target)
    console.print(
        f"design {done.id} ({len(done.of_kind('candidate'))} candidates); next: "
        f"imagegen characters turnaround {character_id} --from {target}/candidate-00.png"
    )


def turnaround(
    character_id: str = typer.Argument(..., metavar="ID"),
    from_: list[Path] = typer.Option(
        ..., "--from", help="The pick: a candidate PNG of this design, or your own image."
    ),
    provenance: str = typer.Option(None, help="For your own image: licensed | consented."),
    creator: str = typer.Option(None, help="Who made or holds the rights of your image (default: you)."),
    evidence: str = typer.Option("", help="Where the licence or consent is kept."),
    grid: str = typer.Option("default", help="A grid of configs/turnaround.yaml (default, quick ...)."),
    grid_file: Path = typer.Option(None, help="Another grid file than configs/turnaround.yaml."),
    method: str = typer.Option(None, help="Identity method (default: the preset's)."),
    out: Path = typer.Option(DEFAULT_OUT, help="Images go to OUT/ID/."),
    tenant: str = typer.Option(DEFAULT_TENANT),
) -> None:
    """Pick (a candidate or your own image) and render the turnaround grid from it; runs the report."""

    flow = _flow(grid_file)
    target = ensure_writable_dir(out / character_id)
    current = flow.store.find(tenant, character_id)
    files = []
    for path in from_:
        try:
            files.append((path.name, path.read_bytes()))
        except OSError as exc:
            raise ImagegenError(f"cannot read {path}: {exc.strerror or exc}", field="from") from exc
    prov = _provenance(provenance, creator, evidence)
    if len(files) == 1:
        current = flow.pick_file(current, files[0][0], files[0][1], prov)
    else:  # several: all must be this design's candidates
        indices = []
        for filename, data in files:
            picked = flow.pick_file(current, filename, data, None)
            indices.append(next(c.index for c in picked.of_kind("candidate") if c.id == picked.pick["image_ids"][0]))
            current = picked
        current = flow.pick_candidates(current, indices)
    planned, plans = flow.turnaround(current, grid, method)
    results = _render_or_fail(flow, planned, plans, "turnaround")
    _report(flow, flow.record_slots(planned, plans, results), f"design of {character_id}: turnaround", "slot", target)


def curate(
    character_id: str = typer.Argument(..., metavar="ID"),
    drop: list[int] = typer.Option(None, "--drop", help="Slot to drop (repeat for more)."),
    keep: list[int] = typer.Option(None, "--keep", help="Slot to keep again."),
    reroll: list[int] = typer.Option(None, "--reroll", help="Slot to render again with a new seed."),
    out: Path = typer.Option(DEFAULT_OUT, help="Images go to OUT/ID/."),
    tenant: str = typer.Option(DEFAULT_TENANT),
) -> None:
    """Keep, drop or re-roll turnaround slots; the report runs again."""

    flow = _flow()
    target = ensure_writable_dir(out / character_id)
    current = flow.store.find(tenant, character_id)
    updated, plans = flow.curate(current, drop=list(drop or []), keep=list(keep or []), reroll=list(reroll or []))
    if plans:
        results = _render_or_fail(flow, updated, plans, "re-rolls")
        updated = flow.record_rerolls(updated, plans, results)
    _report(flow, updated, f"design of {character_id}: curated", "slot", target)


def register(
    character_id: str = typer.Argument(..., metavar="ID"),
    provenance: str = typer.Option(
        ..., help="synthetic (only for sets rendered here from start to end) | licensed | consented"
    ),
    creator: str = typer.Option(None, help="Who made it or holds the rights (default: the current user)."),
    evidence: str = typer.Option("", help="Licence / consent reference (required unless synthetic)."),
    out: Path = typer.Option(Path("out/characters"), help="Where the report and contact sheet go."),
    tenant: str = typer.Option(DEFAULT_TENANT),
) -> None:
    """Register the design's kept slots as a draft character, each reference with its recipe."""
    from imagegen.identity.cli import print_report

    flow = _flow()
    current = flow.store.find(tenant, character_id)
    registration = flow.register(current, _provenance(provenance, creator, evidence) or {})
    print_report(registration)
    for label, path in registration.write_artifacts(out).items():
        console.print(f"{label}: {path}")
    console.print(
        f"registered '{character_id}' as {registration.character.status} ({registration.character.provenance.kind}); "
        f"next: imagegen characters approve {character_id}"
    )


def design_delete(
    character_id: str = typer.Argument(..., metavar="ID"), tenant: str = typer.Option(DEFAULT_TENANT)
) -> None:
    """Delete the design of ID and every byte it made (images, draft identity)."""
    flow = _flow()
    gone = flow.store.delete(flow.store.find(tenant, character_id).id)
    console.print(f"deleted design {gone.design_id}: {gone.images} images, {gone.bytes_removed:,} bytes")


def verify_recipe(
    character_id: str = typer.Argument(..., metavar="ID"),
    reference: list[int] = typer.Option(None, "--reference", help="Reference index to re-render (default: all)."),
    parent: list[Path] = typer.Option(None, "--parent", help="A parent image that is an upload (yours)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document instead of a table."),
) -> None:
    """Re-render a designed character's references from their recipes and compare with the stored ones."""
    from imagegen.identity.design.verify import difference, rerender, rerender_chain
    from imagegen.identity.registry import Registry

    registry = Registry.open()
    character = registry.characters.get(character_id)
    evidence = (character.card.extra or {}).get("design")
    if not isinstance(evidence, dict) or not evidence.get("references"):
        raise ImagegenError(f"'{character_id}' was not registered from a design: it has no recipes", field="ID")
    parents = {p.get("image_digest"): p for p in evidence.get("parents") or [] if isinstance(p, dict)}
    supplied = []
    for path in parent or []:
        try:
            supplied.append(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))
        except (OSError, ValueError) as exc:
            raise ImagegenError(f"cannot read the parent image {path}: {exc}", field="parent") from exc
    entries = evidence["references"]
    chosen = reference or list(range(len(entries)))
    rows = []
    for index in chosen:
        if not 0 <= index < len(entries):
            raise ImagegenError(f"'{character_id}' has references 0 to {len(entries) - 1}", field="reference")
        recipe = entries[index]["recipe"]
        if supplied:
            image = rerender(recipe, supplied)
        else:
            image = rerender_chain(recipe, parents)
        stored_ref = character.references[index]
        stored = Image.open(io.BytesIO(registry.characters.reference_bytes(character.id, stored_ref.digest)))
        rows.append({"reference": index, "seed": recipe.get("seed"), **difference(image, stored).to_dict()})
    if as_json:
        print(json.dumps({"character": character_id, "references": rows}, indent=2))
    else:
        table = Table(title=f"recipes of {character_id} re-rendered")
        for column in ("reference", "seed", "max |diff|", "mean |diff|", "within tolerance"):
            table.add_column(column)
        for row in rows:
            table.add_row(
                str(row["reference"]),
                str(row["seed"]),
                f"{row['max_abs']:.0f}",
                f"{row['mean_abs']:.3f}",
                "yes" if row["within_tolerance"] else "NO",
            )
        console.print(table)
    if not all(row["within_tolerance"] for row in rows):
        raise ImagegenError("a re-render is outside the tolerance: the recipe does not reproduce the stored image")


def add_design_commands(app: typer.Typer) -> None:
    """Put the design commands into ``imagegen characters``."""
    app.command("design")(design)
    app.command("turnaround")(turnaround)
    app.command("curate")(curate)
    app.command("register")(register)
    app.command("design-delete")(design_delete)
    app.command("verify-recipe")(verify_recipe)
