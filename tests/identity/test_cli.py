"""`imagegen characters` and `imagegen protect` as an artist runs them: subprocesses, real files."""

from __future__ import annotations

import json

import pytest

from tests.photos import astronaut_set, bomb_png, hopper_set
from tests.test_cli import run_cli


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in [*astronaut_set(4), *hopper_set(1)]:
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def env(tmp_path):
    return {"IMAGEGEN_HOME": str(tmp_path / "home")}


def test_character_lifecycle(photos, env, tmp_path):
    refs = [str(p) for p in sorted(photos.glob("astronaut*"))]
    out = tmp_path / "out"
    add = run_cli(
        "characters",
        "add",
        "mia",
        "--name",
        "Mia",
        "--images",
        *refs,
        "--provenance",
        "synthetic",
        "--creator",
        "artist",
        "--out",
        str(out),
        env=env,
    )
    assert add.returncode == 0, add.stderr
    assert "verdict: pass" in add.stdout and "registered 'mia' as draft" in add.stdout
    assert (out / "mia-contact-sheet.png").exists()
    report = json.loads((out / "mia-report.json").read_text())
    assert report["verdict"] == "pass" and len(report["images"]) == 4

    listing = run_cli("characters", "list", env=env)
    assert "mia" in listing.stdout and "draft" in listing.stdout
    shown = json.loads(run_cli("characters", "show", "mia", env=env).stdout)
    assert shown["provenance"]["creator"] == "artist" and "embedding" not in json.dumps(shown["references"])

    assert run_cli("characters", "approve", "mia", env=env).returncode == 0
    archive = tmp_path / "mia.zip"
    assert run_cli("characters", "export", "mia", str(archive), env=env).returncode == 0
    deleted = run_cli("characters", "delete", "mia", env=env)
    assert deleted.returncode == 0 and "4 references" in deleted.stdout and "bytes removed" in deleted.stdout
    assert "mia" not in run_cli("characters", "list", env=env).stdout
    imported = run_cli("characters", "import", str(archive), "--tenant", "acme", env=env)
    assert imported.returncode == 0, imported.stderr
    # import registers like an upload: the report is printed and the character arrives as a draft
    assert "verdict: pass" in imported.stdout and "as draft (tenant acme)" in imported.stdout
    assert json.loads(run_cli("characters", "show", "mia", env=env).stdout)["tenant"] == "acme"


def test_protect_then_registration_is_refused(photos, env):
    hopper = str(photos / "hopper.png")
    added = run_cli("protect", "add", "Grace Hopper", "--images", hopper, "--note", "real person", env=env)
    assert added.returncode == 0, added.stderr
    assert "Grace Hopper" in run_cli("protect", "list", env=env).stdout
    refused = run_cli(
        "characters", "add", "gh", "--name", "G", "--images", hopper, "--provenance", "synthetic", env=env
    )
    assert refused.returncode == 2 and "protected identities" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert run_cli("protect", "remove", "1", env=env).returncode == 0
    assert "Grace Hopper" not in run_cli("protect", "list", env=env).stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["characters", "add", "../x", "--name", "x", "--images", "IMG", "--provenance", "synthetic"], "not a valid"),
        (["characters", "add", "x", "--name", "x", "--images", "IMG", "--provenance", "licensed"], "evidence"),
        (
            ["characters", "add", "x", "--name", "x", "--images", "/nonexistent.png", "--provenance", "synthetic"],
            "cannot read",
        ),
        (["characters", "show", "ghost"], "no character 'ghost'"),
        (["characters", "approve", "ghost"], "no character 'ghost'"),
        (["characters", "import", "/nonexistent.zip"], "not a file"),
        (["characters", "import", "ARCHIVE", "--tenant", "Acme!"], "not a valid tenant id"),
        (["characters", "add", "x", "--name", "x", "--images", "HUGE", "--provenance", "synthetic"], "over the limit"),
    ],
)
def test_errors_are_one_line(photos, env, tmp_path, args, message):
    huge = tmp_path / "huge.png"
    huge.write_bytes(bomb_png(12000, 12000))
    archive = tmp_path / "any.zip"
    archive.write_bytes(b"PK")
    paths = {"IMG": str(photos / "hopper.png"), "HUGE": str(huge), "ARCHIVE": str(archive)}
    args = [paths.get(a, a) for a in args]
    proc = run_cli(*args, env=env)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
