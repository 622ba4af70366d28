"""``imagegen eval run`` end to end: suite -> Ray ActorPool of RendererActor -> scores -> run directory.

Real tiny pipelines in real Ray actors, real registry, real dlib; the renders are noise, so the
smoke suite (report-only) must say so clearly, and a gated suite on the same models must fail.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import pytest
import yaml
from typer.testing import CliRunner

from imagegen.cli import app
from imagegen.errors import ImagegenError
from imagegen.eval.metrics import PUBLIC_IMAGE_KEYS
from imagegen.images import read_png_metadata
from imagegen.settings import get_settings
from tests.eval._browser import assert_shows_images, screenshot


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One IMAGEGEN_HOME for the module (the session's model cache stays shared)."""
    path = tmp_path_factory.mktemp("eval-run-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMAGEGEN_HOME", str(path))
        get_settings.cache_clear()
        yield path
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def smoke_run(ray_cluster, home, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    result = CliRunner().invoke(app, ["eval", "run", "smoke", "--out", str(out)])
    return out, result


def test_smoke_suite_runs_end_to_end_through_ray(smoke_run):
    out, result = smoke_run
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "UNGATED: the pipeline ran end to end and scored 16 images; no face detected in any render" in result.output
    for name in ("metrics.json", "scores.json", "run.json", "report.html", "junit.xml", "suite.yaml"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert metrics["verdict"] == "ungated" and metrics["gated"] is False
    assert run["rendered"] == 16 and run["cached"] == 0 and metrics["skipped"] == []
    # two actors per preset, both from the pool, every render accounted for
    for preset in ("tiny-flux", "tiny-sdxl"):
        actors = run["actors"][preset]
        assert len(actors) == 2 and len({a["pid"] for a in actors}) == 2
        assert sum(a["rendered"] for a in actors) == 8
    images = metrics["images"]
    assert len(images) == 16
    assert all(tuple(entry) == PUBLIC_IMAGE_KEYS for entry in images)
    assert all(not e["face_found"] and e["similarity"] is None and e["reasons"] == ["no face detected"] for e in images)
    assert metrics["characters"]["smoke-astronaut"]["detection_rate"] == 0.0
    assert metrics["tags"]["lighting"].keys() == {"studio", "night"}
    # identity cells went through the preset's identity method with the registered character
    identity_files = [e["file"] for e in images if "__default-w1__" in e["file"]]
    assert len(identity_files) == 8
    recipe = read_png_metadata(out / identity_files[0])
    assert recipe["character"] in ("smoke-astronaut", "smoke-hopper")
    assert recipe["method"].startswith("pulid-") and recipe["identity_weight"] == 1.0
    assert recipe["eval"]["suite"] == "smoke"
    plain = read_png_metadata(out / next(e["file"] for e in images if "__none__" in e["file"]))
    assert plain["character"] is None


def test_a_rerun_only_scores_and_compares_with_a_baseline(smoke_run, tmp_path):
    out, _ = smoke_run
    baseline = tmp_path / "baseline"
    shutil.copytree(out, baseline)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    result = CliRunner().invoke(app, ["eval", "run", "smoke", "--out", str(out), "--baseline", str(baseline)])
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["rendered"] == 0 and run["cached"] == 16
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes
    comparison = json.loads((out / "metrics.json").read_text())["comparison"]
    assert comparison["failed"] is False and comparison["gated_regressions"] == []
    assert all(row["delta"] == 0 for row in comparison["rows"])


def test_junit_parses(smoke_run):
    out, _ = smoke_run
    root = ET.parse(out / "junit.xml").getroot()
    assert root.tag == "testsuites"
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert {"smoke.gates", "smoke.images"} <= set(suites)  # (+ smoke.compare after the rerun with a baseline)
    images = suites["smoke.images"].findall("testcase")
    assert len(images) == 16 and suites["smoke.images"].get("skipped") == "16"  # ungated: reported, not failed
    assert root.get("failures") == "0"
    faces = [c for c in suites["smoke.gates"].findall("testcase") if c.get("name") == "faces detected"]
    assert "no face detected in any of the 8 images" in faces[0].find("skipped").get("message")


def test_report_opens_in_headless_chromium_and_shows_the_renders(smoke_run, tmp_path):
    out, _ = smoke_run
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 16 + 2  # 16 renders, heatmap, distributions
    assert 'src="http' not in page and "<script" not in page  # self-contained
    assert_shows_images(screenshot(out / "report.html", tmp_path))


MINI = {
    "name": "mini",
    "gated": True,
    "presets": ["tiny-flux"],
    "methods": [{"name": "none"}, {"name": "pulid-sdxl-v1.1"}],
    "on_unsupported": "skip",
    "characters": [{"id": "mini-astronaut", "sample": "astronaut", "register": True}],
    "prompts": [{"text": "portrait of {name}", "tags": {"angle": "frontal"}}],
    "seeds": [1, 2],
    "steps": 2,
    "workers": 1,
    "bootstrap": {"samples": 100},
}


def test_a_gated_suite_without_faces_fails_and_unsupported_cells_are_skipped(ray_cluster, home, tmp_path):
    suite = tmp_path / "mini.yaml"
    suite.write_text(yaml.safe_dump(MINI))
    out = tmp_path / "mini-run"
    result = CliRunner().invoke(app, ["eval", "run", str(suite), "--out", str(out)])
    assert result.exit_code == 1, result.output + repr(result.exception)
    assert "FAIL: no face detected in any of the 2 images (detection rate 0%)" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["images"]) == 2 and len(metrics["skipped"]) == 2
    assert all("pulid-sdxl-v1.1" in s["reason"] for s in metrics["skipped"])
    root = ET.parse(out / "junit.xml").getroot()
    assert int(root.get("failures")) > 0
    assert root.find("testsuite[@name='mini.skipped']").get("skipped") == "2"

    # the same refusal fails the run when the suite does not allow skipping
    suite.write_text(yaml.safe_dump({**MINI, "on_unsupported": "fail"}))
    failed = CliRunner().invoke(app, ["eval", "run", str(suite), "--out", str(out)])
    assert isinstance(failed.exception, ImagegenError), failed.output
    assert "pulid-sdxl-v1.1" in str(failed.exception) and "on_unsupported: skip" in str(failed.exception)
