"""The design flow through the CLI, as an artist runs it (the real commands, real files, tiny-flux):
describe (tiny models render noise: every face check says "no face") -> an uploaded photo as the
pick -> turnaround with progress -> curate -> `synthetic` refused -> registered `licensed` -> a kept
reference re-rendered from its recipe within the tolerance -> the design deleted with its bytes.

The commands run in-process (each subprocess would import torch again: minutes of CI under
load); one refusal runs as a subprocess to show the user's one-line error.
"""

from __future__ import annotations

import json

from typer.testing import CliRunner

from imagegen import samples
from imagegen.cli import app
from imagegen.errors import ImagegenError
from imagegen.identity.design.recipe import pixel_digest
from tests.photos import encode
from tests.test_cli import run_cli


def cli(*args: str):
    """One `imagegen` command in this process: the result (its exception when it was refused)."""
    return CliRunner().invoke(app, list(args))


def refused(result) -> str:
    """The message of a refusal `main()` prints as one line with exit code 2."""
    assert isinstance(result.exception, ImagegenError), result.output
    return str(result.exception)


def test_design_flow_through_the_cli(tmp_path, isolated_home):
    out = tmp_path / "designs"
    card = tmp_path / "mia.yaml"
    card.write_text("look: short silver hair, green eyes\npersonality: calm\nstyle_notes: studio photo\n")
    photo = tmp_path / "astronaut.png"
    photo.write_bytes(encode(samples.astronaut()))

    described = cli(
        "characters",
        "design",
        "mia",
        "--card",
        str(card),
        "--candidates",
        "2",
        "--seed",
        "7",
        "--out",
        str(out),
    )
    assert described.exit_code == 0, described.output
    folder = out / "mia"
    design = json.loads((folder / "design.json").read_text())
    assert design["stage"] == "describe" and design["status"] == "ready"
    assert [(c["index"], c["seed"]) for c in design["candidates"]] == [(0, 7), (1, 8)]
    assert all(c["face"]["found"] is False and c["face"]["note"] == "no face" for c in design["candidates"])
    assert (folder / "candidate-00.png").exists() and (folder / "candidates.png").exists()

    # any other file is an upload: it needs the uploader's provenance
    unknown = run_cli("characters", "turnaround", "mia", "--from", str(photo), "--out", str(out))
    assert unknown.returncode == 2 and "not one of the candidates" in unknown.stderr
    assert "Traceback" not in unknown.stderr

    turned = cli(
        "characters",
        "turnaround",
        "mia",
        "--from",
        str(photo),
        "--provenance",
        "licensed",
        "--evidence",
        "public domain (NASA)",
        "--grid",
        "quick",
        "--out",
        str(out),
    )
    assert turned.exit_code == 0, turned.output
    design = json.loads((folder / "design.json").read_text())
    assert design["pick"]["source"] == "upload" and design["pick"]["provenance"]["kind"] == "licensed"
    assert [s["view"] for s in design["slots"]] == ["front", "three_quarter_left", "profile"]
    assert [s["analysable"] for s in design["slots"]] == [True, True, False]  # dlib cannot analyse a profile
    assert design["report"]["unanalysable"] == [2] and design["report"]["verdict"] == "fail"  # noise: no faces
    assert (folder / "slots.png").exists()
    old_seed = design["slots"][0]["seed"]

    curated = cli("characters", "curate", "mia", "--drop", "1", "--reroll", "0", "--out", str(out))
    assert curated.exit_code == 0, curated.output
    design = json.loads((folder / "design.json").read_text())
    assert [s["kept"] for s in design["slots"]] == [True, False, True] and design["slots"][0]["seed"] != old_seed
    assert design["stage"] == "curate"

    synthetic = cli("characters", "register", "mia", "--provenance", "synthetic")
    assert "cannot be registered as synthetic (the set starts from an upload)" in refused(synthetic)
    registered = cli(
        "characters",
        "register",
        "mia",
        "--provenance",
        "licensed",
        "--evidence",
        "NASA, public domain",
        "--out",
        str(tmp_path / "characters"),
    )
    assert registered.exit_code == 0, registered.output
    assert "registered 'mia' as draft (licensed)" in registered.stdout

    shown = json.loads(cli("characters", "show", "mia").stdout)
    evidence = shown["card"]["extra"]["design"]
    assert shown["provenance"]["kind"] == "licensed" and len(shown["references"]) == 2
    assert [r["slot"] for r in evidence["references"]] == [0, 2]
    recipe = evidence["references"][0]["recipe"]
    assert recipe["parents"] == [pixel_digest(samples.astronaut())] and recipe["method"] and recipe["seed"] != old_seed
    assert evidence["parents"] == [{"image_digest": pixel_digest(samples.astronaut()), "origin": "upload"}]

    # evidence anyone can re-render: each kept image from its recipe and the parent it names
    verified = cli("characters", "verify-recipe", "mia", "--reference", "0", "--parent", str(photo), "--json")
    assert verified.exit_code == 0, verified.output
    rows = json.loads(verified.stdout)["references"]
    assert len(rows) == 1 and rows[0]["within_tolerance"], rows
    wrong = cli("characters", "verify-recipe", "mia", "--parent", str(folder / "candidate-00.png"))
    assert "parent image" in refused(wrong)

    deleted = cli("characters", "design-delete", "mia")
    assert deleted.exit_code == 0, deleted.output
    assert not any((isolated_home / "designs").iterdir())
