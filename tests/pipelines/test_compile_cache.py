"""Compiled code kept between processes (``imagegen.pipelines.compile_cache``): a replica that starts on a fresh
machine finds what the first one compiled in the object store, a bad stored object never stops a replica, and nothing
in one can be written outside the compile cache's directory.

The two-process test runs the user's own commands (``imagegen models warm-up``, ``imagegen models compile-cache``):
one process compiles tiny-sdxl under ``fast`` and stores it; a second, with an empty local directory and the same
object store, must compile nothing.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from imagegen.pipelines import compile_cache
from imagegen.pipelines.compile_cache import (
    KERNEL_NAME,
    CompileCache,
    UnusableArtifact,
    artifact_key,
    fingerprint,
    pack,
    unpack,
    use_local_dir,
)
from imagegen.pipelines.presets import get_preset
from imagegen.pipelines.profiles import profile_for
from imagegen.pipelines.renderer import Renderer
from imagegen.pipelines.warmup import warm_up
from imagegen.settings import Settings, get_settings
from imagegen.storage import open_storage
from tests.test_cli import run_cli

KERNEL = "ab/c" + "k" * 51 + ".main.so"


def warm_up_cli(home, store, local_dir) -> dict:
    proc = run_cli(
        "models",
        "warm-up",
        "tiny-sdxl",
        "--profile",
        "fast",
        "--no-identity",
        "--json",
        env={
            "IMAGEGEN_HOME": str(home),
            "IMAGEGEN_STORAGE_URL": str(store),
            "IMAGEGEN_COMPILE_CACHE_DIR": str(local_dir),
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_a_replica_on_a_fresh_machine_compiles_nothing_the_first_one_stored(tmp_path):
    store = tmp_path / "bucket"
    first = warm_up_cli(tmp_path / "home-1", store, tmp_path / "machine-1")
    cache = first["compile_cache"]
    assert cache["load"] == "absent" and cache["save"] == "saved"
    assert cache["counters"]["fx_graph_misses"] >= 1 and cache["local_dir"] == str(tmp_path / "machine-1")

    second = warm_up_cli(tmp_path / "home-2", store, tmp_path / "machine-2")["compile_cache"]
    assert second["load"] == "loaded" and second["artifact"] == cache["artifact"]
    assert second["counters"]["fx_graph_misses"] == 0 and second["counters"]["aot_misses"] == 0
    assert second["counters"]["fx_graph_hits"] >= 1
    # the C++ kernels came with the artifact: the second machine built none of them
    assert second["kernels_restored"] >= 1
    assert second["save"] == "kept: nothing new compiled"
    assert list((tmp_path / "machine-2").glob("*/c*.so"))

    env = {
        "IMAGEGEN_HOME": str(tmp_path / "home-2"),
        "IMAGEGEN_STORAGE_URL": str(store),
        "IMAGEGEN_COMPILE_CACHE_DIR": str(tmp_path / "machine-2"),
    }
    shown = json.loads(run_cli("models", "compile-cache", "--json", env=env).stdout)
    assert shown["local_dir"] == str(tmp_path / "machine-2") and shown["local_dir_bytes"] > 0
    listed = shown["artifacts"]
    assert [row["key"] for row in listed] == [cache["artifact"]]
    assert listed[0]["fingerprint"]["preset"] == "tiny-sdxl" and listed[0]["fingerprint"]["profile"]["name"] == "fast"
    cleared = run_cli("models", "compile-cache", "--clear", env=env)
    assert cleared.returncode == 0 and "deleted 1 compile artifact" in cleared.stdout
    assert json.loads(run_cli("models", "compile-cache", "--json", env=env).stdout)["artifacts"] == []


def test_a_bad_stored_artifact_is_reported_and_replaced_and_the_replica_still_warms(isolated_home):
    settings = get_settings()
    preset = get_preset("tiny-sdxl")
    key = artifact_key(fingerprint(preset.name, profile_for(preset, "fast"), torch.device("cpu")))
    objects = open_storage(settings.storage_root).child(compile_cache.PREFIX)
    objects.put(key, b"PK\x03\x04 not what a replica stored")

    renderer = Renderer(preset, device="cpu", profile="fast")
    assert renderer.compile_cache.report.load == "unusable: not an imagegen compile-cache object"
    report = warm_up(renderer, identity=False)
    assert report.compile_cache["save"] == "saved"
    # where the warm-up's compile went, for /readyz: dynamo's tracing at least (it runs even on a cache hit)
    assert report.compile_phases["dynamo_total"] >= report.compile_phases["tracing"] > 0
    header, payload, kernels = unpack(objects.get(key))  # a whole, checked object again
    assert header["fingerprint"]["preset"] == "tiny-sdxl" and payload
    assert all(KERNEL_NAME.fullmatch(name) for name in kernels)


def test_an_eager_profile_uses_no_compile_cache(isolated_home):
    renderer = Renderer("tiny-flux", device="cpu", profile="quality")
    assert renderer.compile_cache is None
    report = warm_up(renderer, identity=False)
    assert report.compile_cache is None and report.compile_phases == {}
    assert not (isolated_home / "compile-cache").exists()


def test_stored_objects_are_checked_part_by_part():
    print_ = {"preset": "p", "profile": {"name": "fast"}}
    data = pack(b"torch artifacts", {KERNEL: b"\x7fELF kernel"}, print_)
    header, payload, kernels = unpack(data)
    assert payload == b"torch artifacts" and kernels == {KERNEL: b"\x7fELF kernel"}
    assert header["fingerprint"] == print_

    flipped = bytearray(data)
    flipped[-3] ^= 1
    with pytest.raises(UnusableArtifact, match="part 'ab/c.*' does not match"):
        unpack(bytes(flipped))
    with pytest.raises(UnusableArtifact, match="do not add up"):
        unpack(data + b"more")
    with pytest.raises(UnusableArtifact, match="does not match"):
        unpack(data[:-1])
    with pytest.raises(UnusableArtifact, match="not an imagegen"):
        unpack(b"\x80\x04 a pickle")
    with pytest.raises(UnusableArtifact, match="parts are malformed"):  # listed as unusable, never a crash
        unpack(compile_cache.MAGIC + b'{"format": 1, "parts": [{"name": "torch"}]}\n')


@pytest.mark.parametrize(
    "name", ["../../../home/x.so", "ab/../../x.so", "ab/cabc.so", "ab/ckkkkkkkkkkkkkkkkkkkkkkk.py"]
)
def test_a_stored_object_cannot_write_outside_the_cache_directory(tmp_path, monkeypatch, own_inductor_dir, name):
    """An object naming a file outside inductor's kernel layout is refused whole: nothing is loaded or written."""
    home = tmp_path / "home"
    monkeypatch.setenv("IMAGEGEN_HOME", str(home))
    monkeypatch.setenv("IMAGEGEN_COMPILE_CACHE_DIR", str(tmp_path / "cache" / "inductor"))
    settings = Settings()
    print_ = {"preset": "tiny-flux", "profile": {"name": "fast"}}
    objects = open_storage(settings.storage_root).child(compile_cache.PREFIX)
    cache = compile_cache.CompileCache(objects, print_, settings)
    objects.put(cache.key, pack(b"torch artifacts", {name: b"payload"}, print_))
    report = cache.start()
    assert report.load.startswith("unusable: it names a kernel") and report.kernels_restored == 0
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "compile-cache" not in p.parts]
    assert written == []


def test_the_operators_inductor_directory_wins(tmp_path, monkeypatch, own_inductor_dir):
    settings = Settings(home=tmp_path / "home", compile_cache_dir=tmp_path / "ours")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "operator"))
    assert use_local_dir(settings) == (str(tmp_path / "operator"), "TORCHINDUCTOR_CACHE_DIR")

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what torch writes back once it looked
    assert use_local_dir(settings) == (str(tmp_path / "ours"), "IMAGEGEN_COMPILE_CACHE_DIR")
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(tmp_path / "ours")
    # a child process inherits both variables: the directory imagegen chose is not taken for the operator's
    child = Settings(home=tmp_path / "child", compile_cache_dir=tmp_path / "child-dir")
    assert use_local_dir(child) == (str(tmp_path / "child-dir"), "IMAGEGEN_COMPILE_CACHE_DIR")


def test_the_artifact_key_follows_the_profile_options_and_the_device():
    preset = get_preset("tiny-sdxl")
    fast = profile_for(preset, "fast")
    key = artifact_key(fingerprint(preset.name, fast, torch.device("cpu")))
    assert key.startswith("tiny-sdxl-fast-") and key.endswith(".bin")
    assert key == artifact_key(fingerprint(preset.name, fast, torch.device("cpu")))
    retuned = fast.model_copy(update={"channels_last": not fast.channels_last})
    assert artifact_key(fingerprint(preset.name, retuned, torch.device("cpu"))) != key
    assert artifact_key(fingerprint("tiny-flux", fast, torch.device("cpu"))) != key
    assert artifact_key(fingerprint(preset.name, fast, torch.device("meta"))) != key


@pytest.fixture
def own_inductor_dir(monkeypatch):
    """The process's inductor directory, and the record that imagegen chose it, are put back after the test."""
    for name in ("TORCHINDUCTOR_CACHE_DIR", compile_cache.CHOSEN_HERE):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)


def node_settings(root, storage_url: str) -> Settings:
    return Settings(home=root / "home", storage_url=storage_url, compile_cache_dir=root / "inductor")


def test_artifacts_in_a_bucket_reach_a_node_with_an_empty_directory(s3_bucket, tmp_path, own_inductor_dir):
    preset = get_preset("tiny-flux")
    profile, cpu = profile_for(preset, "fast"), torch.device("cpu")
    on_a = CompileCache.for_renderer(node_settings(tmp_path / "a", s3_bucket.url), preset.name, profile, cpu)
    assert on_a.start().load == "absent"
    compiled = torch.compile(lambda x: torch.relu(x.sin() * 3.0 + x.cos()))
    compiled(torch.randn(17, 5))  # a graph of this process, compiled into node a's directory
    saved = on_a.finish()
    assert saved.save == "saved" and saved.counters["fx_graph_misses"] >= 1
    assert [key.rsplit("/", 1)[-1] for key in s3_bucket.keys()] == [on_a.key]

    on_b = CompileCache.for_renderer(node_settings(tmp_path / "b", s3_bucket.url), preset.name, profile, cpu)
    loaded = on_b.start()
    assert loaded.load == "loaded" and loaded.kernels_restored >= 1
    assert sorted(p.name for p in (tmp_path / "b" / "inductor").glob("*/c*.so")) == sorted(
        p.name for p in (tmp_path / "a" / "inductor").glob("*/c*.so")
    )


def test_an_unreachable_store_neither_stops_nor_fails_a_replica(tmp_path, monkeypatch, own_inductor_dir):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    preset = get_preset("tiny-flux")
    settings = node_settings(tmp_path, "s3://compile-bucket/prod")
    cache = CompileCache.for_renderer(settings, preset.name, profile_for(preset, "fast"), torch.device("cpu"))
    assert cache.start().load.startswith("unavailable: ")
    torch.compile(lambda x: x.tanh() + 2.0)(torch.randn(3, 11))
    assert cache.finish().save.startswith("failed: ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "64x"], "error (size): --size must be WIDTHxHEIGHT in pixels (e.g. 1024x1024), got '64x'"),
        (["--steps", "9"], "error (steps): --steps must be between 1 and 8, got 9"),
    ],
)
def test_a_bad_warm_up_option_is_one_line_and_loads_nothing(tmp_path, args, message):
    home = tmp_path / "home"
    proc = run_cli("models", "warm-up", "tiny-sdxl", "--profile", "fast", *args, env={"IMAGEGEN_HOME": str(home)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == message
    assert not home.exists()


def test_artifacts_of_other_software_are_marked_stale_and_cleared_alone(tmp_path):
    settings = Settings(home=tmp_path / "home")
    objects = open_storage(settings.storage_root).child(compile_cache.PREFIX)
    preset = get_preset("tiny-flux")
    current = fingerprint(preset.name, profile_for(preset, "fast"), torch.device("cpu"))
    upgraded_from = {**current, "torch": "2.9.0+cu128"}
    for signature in (current, upgraded_from):
        objects.put(artifact_key(signature), pack(b"torch artifacts", {}, signature))
    corrupt = "tiny-flux-fast-0123456789abcdef.bin"
    objects.put(corrupt, b"not ours")
    # what is not named like an artifact is never listed nor deleted (a user's walk-through found `--clear-stale`
    # deleting a whole inductor directory that shared the folder: the local default was this very folder)
    others = {"2c/c2cfobyexample.main.cpp": b"// kernel", "notes.txt": b"keep me"}
    for key, data in others.items():
        objects.put(key, data)

    rows = {row["key"]: row for row in compile_cache.stored_artifacts(settings)}
    assert set(rows) == {artifact_key(current), artifact_key(upgraded_from), corrupt}
    assert rows[artifact_key(current)]["stale"] is False
    assert rows[artifact_key(upgraded_from)]["stale"] is True
    assert rows[corrupt]["stale"] is True and rows[corrupt]["unusable"] == "not an imagegen compile-cache object"

    assert compile_cache.clear_artifacts(settings, stale_only=True) == 2
    assert [row["key"] for row in compile_cache.stored_artifacts(settings)] == [artifact_key(current)]
    assert compile_cache.clear_artifacts(settings) == 1 and compile_cache.stored_artifacts(settings) == []
    assert {key: objects.get(key) for key in others} == others


def test_the_default_local_directory_is_not_the_shared_artifact_folder(tmp_path, monkeypatch):
    """Without IMAGEGEN_STORAGE_URL the object store lies under IMAGEGEN_HOME: inductor's directory must not be its
    ``compile-cache/`` folder, or every kernel would be listed (and cleared) as an artifact."""
    monkeypatch.delenv("IMAGEGEN_COMPILE_CACHE_DIR", raising=False)  # the test session shares one: the default here
    monkeypatch.delenv("IMAGEGEN_STORAGE_URL", raising=False)
    settings = Settings(home=tmp_path / "home")
    folder = Path(settings.storage_root) / compile_cache.PREFIX
    assert settings.compile_cache == settings.home / "inductor-cache"
    assert folder not in (settings.compile_cache, *settings.compile_cache.parents)
    assert settings.compile_cache not in folder.parents
