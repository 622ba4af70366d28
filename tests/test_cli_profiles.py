"""Choosing an optimisation profile wherever a renderer is built: ``--profile`` on ``render``, ``eval run``, ``serve``
and ``demo``, ``imagegen models profiles``, a suite's ``profile``, and the service's ``IMAGEGEN_PROFILE``.

A bad name is one line on stderr, exit code 2, before anything loads or is written. The end-to-end render uses
``low-memory`` (no compile: a compiling profile costs ~30 s on these CPUs); the profiles' numerics are tested in
tests/pipelines/test_profiles.py.
"""

from __future__ import annotations

import pytest
import yaml

from imagegen.errors import ConfigError
from imagegen.eval.suite import expand, load_suite
from imagegen.eval.thresholds import eval_settings
from imagegen.pipelines.profiles import ProfileError
from imagegen.serve.launcher import prepare_config
from imagegen.settings import get_settings
from tests.test_cli import run_cli

UNKNOWN = "unknown profile 'nope'; known profiles: fast, fastest, low-memory, quality"


def one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize(
    "command",
    [
        ["render", "--prompt", "x"],
        ["eval", "run", "smoke"],
        ["serve", "--preset", "tiny-flux"],
        ["demo", "--no-service", "--no-eval"],
    ],
    ids=["render", "eval-run", "serve", "demo"],
)
def test_an_unknown_profile_is_one_line_before_anything_starts(tmp_path, command):
    out = tmp_path / "out"
    extra = [] if command[0] == "serve" else ["--out", str(out)]
    proc = run_cli(*command, *extra, "--profile", "nope", timeout=120)
    line = one_error_line(proc)
    assert line.startswith("error (profile):") and UNKNOWN in line
    assert not out.exists() or not any(out.iterdir())


def test_a_bad_imagegen_profile_is_refused_the_same_way(tmp_path):
    proc = run_cli("render", "--prompt", "x", "--out", str(tmp_path / "o"), env={"IMAGEGEN_PROFILE": "nope"})
    assert UNKNOWN in one_error_line(proc)


def test_render_with_a_profile(tmp_path):
    out = tmp_path / "renders"
    proc = run_cli(
        "render",
        "--prompt",
        "a cafe at night",
        "--seed",
        "3",
        "--steps",
        "2",
        "--profile",
        "low-memory",
        "--out",
        str(out),
        env={"IMAGEGEN_LOG_LEVEL": "INFO"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "tiny-flux-seed3.png").is_file()
    assert "profile low-memory" in proc.stderr  # the renderer's load line names the profile it loaded with


def test_models_profiles_lists_every_profile_and_what_applies_here():
    import json

    proc = run_cli("models", "profiles", "tiny-flux", "tiny-sdxl", "--json", env={"IMAGEGEN_DEVICE": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    rows = {(r["preset"], r["profile"]): r for r in report["profiles"]}
    assert report["device"] == "cpu"
    assert {p for _, p in rows} == {"quality", "fast", "fastest", "low-memory"} and len(rows) == 8
    assert rows[("tiny-flux", "quality")]["default"] and not rows[("tiny-flux", "fast")]["default"]
    fastest = rows[("tiny-flux", "fastest")]
    assert "step cache first-block" in fastest["options"] and "int8-weight-only (fp8-dynamic needs" in fastest["here"]
    assert "fuse_qkv" in rows[("tiny-sdxl", "fast")]["options"]
    assert "offload: nothing to do" in rows[("tiny-sdxl", "low-memory")]["here"]
    assert rows[("tiny-sdxl", "fast")]["identity"] == "all"
    # SDXL's fast replays its blocks in CUDA graphs: not on a CPU, and the table says so (a walk-through read
    # "as configured" there)
    assert "CUDA graphs skipped" in rows[("tiny-sdxl", "fast")]["here"]
    assert "CUDA graphs" not in rows[("tiny-flux", "fast")]["here"]
    tables = run_cli("models", "profiles", "tiny-sdxl", env={"IMAGEGEN_PROFILE": "fast"})
    assert tables.returncode == 0 and "profiles of tiny-sdxl (sdxl)" in tables.stdout
    assert "IMAGEGEN_PROFILE: fast" in tables.stdout
    proc = run_cli("models", "profiles", "nope")
    assert "unknown preset 'nope'" in one_error_line(proc)


# -- eval: a suite's profile, in its cells' keys ---------------------------------------------------------------------
def _smoke(**update):
    suite, _ = load_suite("smoke")
    return suite.model_copy(update=update)


def _keys(suite) -> list[str]:
    return [c.key for c in expand(suite, {c.id: c.id for c in suite.characters}, {})]


def test_an_eager_profile_keeps_the_cell_keys_and_another_changes_them(monkeypatch):
    before = _keys(_smoke())
    assert _keys(_smoke(profile="quality")) == before  # renders made before profiles stay cached
    fast = _keys(_smoke(profile="fast"))
    assert len(set(fast)) == len(fast) and not set(fast) & set(before)
    assert _keys(_smoke(profile="fastest")) != fast
    monkeypatch.setenv("IMAGEGEN_PROFILE", "fast")  # what the actors would load with, if the suite says nothing
    get_settings.cache_clear()
    try:
        assert _keys(_smoke()) == fast
    finally:
        monkeypatch.delenv("IMAGEGEN_PROFILE")
        get_settings.cache_clear()


def test_a_suite_with_an_unknown_profile_is_refused_before_rendering(tmp_path):
    from imagegen.eval.run import run_suite

    base = yaml.safe_load((eval_settings().suites_dir / "smoke.yaml").read_text())
    base["profile"] = "nope"
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match=r"suite smoke: unknown profile 'nope'") as info:
        run_suite(path, tmp_path / "run")
    assert info.value.field == "profile"
    assert not (tmp_path / "run").exists()


# -- serve: one profile for every renderer deployment, or one per preset ---------------------------------------------
def test_serve_profile_reaches_every_renderer_deployment_through_the_application_args():
    from imagegen.serve.config import AppArgs

    data = prepare_config(None, profile="fast")
    [app] = data["applications"]
    assert app["args"]["profile"] == "fast"
    args = AppArgs.model_validate(app["args"])
    assert args.profile_of("tiny-flux") == args.profile_of("tiny-sdxl") == "fast"
    # per preset in the file; --profile replaces both
    app["args"]["profiles"] = {"tiny-sdxl": "low-memory"}
    per_preset = AppArgs.model_validate(prepare_config(data)["applications"][0]["args"])
    assert per_preset.profile_of("tiny-sdxl") == "low-memory" and per_preset.profile_of("tiny-flux") == "fast"
    again = prepare_config(data, profile="quality")["applications"][0]["args"]
    assert again["profile"] == "quality" and "profiles" not in again
    with pytest.raises(ProfileError, match="unknown profile 'nope'"):
        prepare_config(None, profile="nope")
    app["args"]["profiles"] = {"tiny-sdxl": "nope"}
    with pytest.raises(ProfileError, match="unknown profile 'nope'"):  # a bad one in the file, before Ray starts
        prepare_config(data)
    app["args"].pop("profiles")
    app.setdefault("runtime_env", {}).setdefault("env_vars", {})["IMAGEGEN_PROFILE"] = "nope"
    app["args"].pop("profile")
    with pytest.raises(ProfileError, match="unknown profile 'nope'"):  # or in the application's environment
        prepare_config(data)


def test_a_renderer_actor_loads_the_profile_it_is_given():
    from imagegen.serve.actors import RendererActor

    actor = RendererActor("tiny-sdxl", warmup=False, device="cpu", profile="low-memory")
    assert actor.renderer.profile.name == "low-memory"
    assert actor.health()["profile"] == "low-memory"
