"""``eval score`` on renders made anywhere, ``eval compare`` on two runs, the report in a browser."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import pytest
import yaml
from typer.testing import CliRunner

from imagegen.cli import app
from imagegen.eval.metrics import PUBLIC_IMAGE_KEYS
from imagegen.eval.scoring import FaceScorer
from imagegen.identity.characters import register_character
from imagegen.identity.registry import Registry
from imagegen.settings import get_settings
from tests.eval._browser import assert_shows_images, screenshot
from tests.eval._faces import no_face_images, reference_images, render_images, write_png
from tests.photos import encode

PROVENANCE = {"kind": "licensed", "creator": "tests", "evidence": "public-domain sample photos (imagegen.samples)"}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A registry holding both people as characters (real ingestion, analysis and safeguards)."""
    home = tmp_path_factory.mktemp("eval-score-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMAGEGEN_HOME", str(home))
        get_settings.cache_clear()
        with Registry.open() as registry:
            for person in ("astronaut", "hopper"):
                files = [(f"{person}-{i}.png", encode(im)) for i, im in enumerate(reference_images(person))]
                register_character(
                    registry, character_id=person, name=person.title(), provenance=PROVENANCE, files=files
                )
        yield home
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    """A directory of renders "made elsewhere": 10 of the astronaut, 6 of Hopper, in sub-folders."""
    root = tmp_path_factory.mktemp("renders")
    manifest = []
    for person, count, seed in (("astronaut", 10, 20), ("hopper", 6, 40)):
        for i, image in enumerate(render_images(person, count, seed)):
            name = f"{person}/{i:02d}.png"
            write_png(image, root / name)
            manifest.append({"file": name, "character": person, "tags": {"angle": "frontal" if i % 2 else "side"}})
    (root.parent / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return root


@pytest.fixture(scope="module")
def scored(registered, renders, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    result = CliRunner().invoke(
        app, ["eval", "score", str(renders), "--manifest", str(renders.parent / "manifest.yaml"), "--out", str(out)]
    )
    return out, result


def test_score_writes_the_run_directory_with_one_entry_per_file(scored, renders):
    out, result = scored
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "score" and metrics["verdict"] == "pass"
    images = metrics["images"]
    assert [e["file"] for e in images] == sorted(p.relative_to(renders).as_posix() for p in renders.rglob("*.png"))
    assert all(tuple(e) == PUBLIC_IMAGE_KEYS for e in images)
    assert all(e["face_found"] and e["passed"] and e["reasons"] == [] and e["similarity"] > 0.6 for e in images)
    assert {e["character"] for e in images} == {"astronaut", "hopper"}
    assert metrics["overall"]["verification"]["auc"] == 1.0
    assert metrics["characters"]["hopper"]["rank1_accuracy"] == 1.0
    assert set(metrics["tags"]["angle"]) == {"frontal", "side"}
    run = json.loads((out / "run.json").read_text())
    assert run["identities"]["astronaut"]["source"] == "registry"  # stored dlib embeddings reused
    ET.parse(out / "junit.xml")


def test_score_one_character_flags_the_strangers(registered, renders, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, path in enumerate(sorted((renders / "astronaut").glob("*.png"))[:8]):
        shutil.copy(path, mixed / f"{i:02d}.png")
    shutil.copy(renders / "hopper" / "00.png", mixed / "08-stranger.png")
    write_png(no_face_images(1)[0], mixed / "09-coffee.png")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["eval", "score", str(mixed), "--character", "astronaut", "--against", "hopper", "--out", str(out)]
    )
    assert result.exit_code == 1, result.output  # 80% pass and detection 90%: rank-1 0.89 fails its gate
    images = {e["file"]: e for e in json.loads((out / "metrics.json").read_text())["images"]}
    assert [f for f, e in images.items() if not e["passed"]] == ["08-stranger.png", "09-coffee.png"]
    assert images["09-coffee.png"] == {
        "file": "09-coffee.png",
        "character": "astronaut",
        "face_found": False,
        "similarity": None,
        "passed": False,
        "reasons": ["no face detected"],
    }
    assert any("identity leakage: looks more like hopper" in r for r in images["08-stranger.png"]["reasons"])
    # report only: same scores, exit 0
    quiet = CliRunner().invoke(
        app, ["eval", "score", str(mixed), "--character", "astronaut", "--no-gate", "--out", str(tmp_path / "q")]
    )
    assert quiet.exit_code == 0 and "UNGATED" in quiet.output


def test_compare_detects_a_regression_injected_into_a_copy_of_a_run(scored, tmp_path):
    a, _ = scored
    same = tmp_path / "same"
    shutil.copytree(a, same)
    unchanged = CliRunner().invoke(app, ["eval", "compare", str(a), str(same), "--json", str(tmp_path / "c0.json")])
    assert unchanged.exit_code == 0, unchanged.output
    assert "no significant regression" in unchanged.output

    # inject: four astronaut renders now barely look like her, one lost its face
    b = tmp_path / "regressed"
    shutil.copytree(a, b)
    details = json.loads((b / "scores.json").read_text())
    astronaut = [d for d in details["images"] if d["character"] == "astronaut"]
    for d in astronaut[:4]:
        d["similarity"] = d["similarities"]["astronaut"] = round(d["similarity"] - 0.45, 4)
        d["passed"], d["reasons"] = False, ["similarity below the threshold (injected)"]
    astronaut[4].update(face_found=False, similarity=None, passed=False, reasons=["no face detected"])
    (b / "scores.json").write_text(json.dumps(details))
    result = CliRunner().invoke(app, ["eval", "compare", str(a), str(b), "--json", str(tmp_path / "c1.json")])
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "c1.json").read_text())
    flagged = {(r["scope"], r["group"], r["metric"]) for r in report["rows"] if r["regression"] and r["gated"]}
    assert ("character", "astronaut", "mean_similarity") in flagged
    assert ("character", "astronaut", "pass_rate") in flagged
    assert not any(g == "hopper" for _, g, _ in flagged)  # the untouched character did not regress
    row = next(
        r
        for r in report["rows"]
        if (r["scope"], r["group"], r["metric"]) == ("character", "astronaut", "mean_similarity")
    )
    assert row["paired"] and row["ci"][1] < 0 and row["delta"] < -0.15
    assert any(r["scope"] == "tag" and r["regression"] and not r["gated"] for r in report["rows"])


def test_score_workers_give_the_same_faces(renders):
    paths = sorted(renders.rglob("*.png"))[:6]
    with FaceScorer("dlib", 1) as one, FaceScorer("dlib", 2) as two:
        a, b = one.analyze(paths), two.analyze(paths)
    assert [r.face.embedding.tolist() for r in a] == [r.face.embedding.tolist() for r in b]


def test_score_report_opens_in_headless_chromium(scored, tmp_path):
    out, _ = scored
    assert_shows_images(screenshot(out / "report.html", tmp_path))
