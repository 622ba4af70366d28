"""Calibration from labelled same/different pairs of real photos, written to configuration."""

from __future__ import annotations

import itertools

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from imagegen.cli import app
from imagegen.eval.calibrate import load_pairs
from imagegen.eval.thresholds import resolve_thresholds, write_thresholds_file
from imagegen.faces import similarity
from tests.eval._faces import reference_images, render_images, write_png


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Six photos of each person on disk, and the labels file naming who each shows."""
    root = tmp_path_factory.mktemp("calibration")
    labels = {}
    for person in ("astronaut", "hopper"):
        images = reference_images(person)[:3] + render_images(person, 3, seed=60)
        for i, image in enumerate(images):
            name = f"{person}/{i}.png"
            write_png(image, root / name)
            labels[name] = person
    (root / "labels.yaml").write_text(yaml.safe_dump(labels))
    return root, labels


def test_calibrate_recovers_a_threshold_that_separates_the_two_people(labelled, dlib, _own_thresholds_file):
    root, labels = labelled
    out = root / "thresholds.yaml"
    result = CliRunner().invoke(app, ["eval", "calibrate", "--labels", str(root / "labels.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    entry = yaml.safe_load(out.read_text())["backends"]["dlib"]
    assert entry["pairs"] == {"same": 2 * 15, "different": 36}
    assert entry["eer"] == 0.0 and entry["auc"] == 1.0

    faces = {name: dlib.largest(Image.open(root / name)).face for name in labels}
    same = [similarity(faces[a], faces[b]) for a, b in itertools.combinations(labels, 2) if labels[a] == labels[b]]
    different = [similarity(faces[a], faces[b]) for a, b in itertools.combinations(labels, 2) if labels[a] != labels[b]]
    assert max(different) < entry["similarity"] < min(same)  # separates every pair of the two people
    assert entry["similarity"] == pytest.approx((max(different) + min(same)) / 2, abs=1e-3)

    # suites and gates pick the calibrated value up
    resolved = resolve_thresholds("dlib", thresholds_file=out)
    assert resolved.similarity == entry["similarity"] and resolved.similarity_source.startswith("calibrated")
    assert resolve_thresholds("dlib").similarity == 0.4  # the default file does not exist in tests
    # calibrating a backend keeps the file's other backends
    write_thresholds_file(out, "insightface", {"similarity": 0.33})
    backends = yaml.safe_load(out.read_text())["backends"]
    assert backends["insightface"] == {"similarity": 0.33} and backends["dlib"] == entry


def test_calibrate_reads_pair_lists(labelled, tmp_path):
    root, labels = labelled
    rows = [
        "a,b,same",
        "astronaut/0.png,astronaut/5.png,true",
        "astronaut/1.png,hopper/1.png,false",
        "hopper/0.png,hopper/4.png,1",
        "hopper/2.png,astronaut/3.png,no",
    ]
    (root / "pairs.csv").write_text("\n".join(rows))
    pairs = load_pairs(root / "pairs.csv")
    assert [p[2] for p in pairs] == [True, False, True, False]
    result = CliRunner().invoke(app, ["eval", "calibrate", "--pairs", str(root / "pairs.csv"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "dlib" in result.output and not (root / "thresholds-dry.yaml").exists()


def test_calibrate_needs_both_kinds_of_pairs(labelled):
    root, _ = labelled
    (root / "same-only.yaml").write_text(
        yaml.safe_dump([{"a": "astronaut/0.png", "b": "astronaut/1.png", "same": True}])
    )
    result = CliRunner().invoke(app, ["eval", "calibrate", "--pairs", str(root / "same-only.yaml"), "--dry-run"])
    assert result.exit_code != 0
    assert "both same-person and different-person pairs" in str(result.exception)
