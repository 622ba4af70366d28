"""Shared fixtures: every test runs against a throw-away IMAGEGEN_HOME.

The tiny model repos are built once per test session into a shared model cache (building them
is deterministic, so sharing changes nothing but time), and compiled code goes to one shared
compile cache; everything else a test writes
(registry, blobs, outputs) goes to its own temporary directory. The session allows characters
whose apparent age is unverified (the development setting the demo uses too).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from imagegen.settings import get_settings

# the S3-compatible server and the storage arms (local directory / bucket) of the storage matrix
from .storage.s3 import s3_bucket, s3_endpoint, storage  # noqa: F401


def pytest_configure(config: pytest.Config) -> None:
    """Every Ray the tests start (here and in subprocesses) keeps its files in a private temp dir.

    Ray records the last cluster it started in ``<temp>/ray/ray_current_cluster``; a test run that was
    killed leaves that pointer behind, and Ray's own ``serve run`` follows it to a cluster that is gone.
    A private ``RAY_TMPDIR`` means the suite neither reads the machine's pointer nor leaves one. It is
    short on purpose: Ray's unix sockets live below it, and their paths may not exceed 107 bytes.
    """
    if "RAY_TMPDIR" not in os.environ:
        config._imagegen_ray_tmpdir = tempfile.mkdtemp(prefix="ig-ray-", dir="/tmp")
        os.environ["RAY_TMPDIR"] = config._imagegen_ray_tmpdir


def pytest_unconfigure(config: pytest.Config) -> None:
    ray_tmpdir = getattr(config, "_imagegen_ray_tmpdir", None)
    if ray_tmpdir is not None:
        os.environ.pop("RAY_TMPDIR", None)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _session_home(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("imagegen-home")
    saved = {
        k: os.environ.get(k)
        for k in (
            "IMAGEGEN_HOME",
            "IMAGEGEN_MODEL_CACHE_DIR",
            "IMAGEGEN_COMPILE_CACHE_DIR",
            "IMAGEGEN_ALLOW_UNVERIFIED_AGE",
        )
    }
    os.environ["IMAGEGEN_HOME"] = str(home)
    os.environ["IMAGEGEN_MODEL_CACHE_DIR"] = str(home / "models")
    # compiled code is shared across the tests' isolated homes like the models (torch's own keys decide every hit)
    os.environ["IMAGEGEN_COMPILE_CACHE_DIR"] = str(home / "inductor-cache")
    # development only, like the demo: no age estimator can be installed on these machines, so the
    # test characters are `age_check: unverified` (tests of the strict policy turn it off)
    os.environ["IMAGEGEN_ALLOW_UNVERIFIED_AGE"] = "1"
    get_settings.cache_clear()
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def service(_session_home):
    """One real local Ray and one Serve deployment of configs/serve.yaml for the whole session.

    Shared by tests/serve and tests/studio (defined here so both see the same one); its test
    limits and the keys' helpers are in tests/serve/conftest.py.
    """
    from imagegen.serve.launcher import start_service
    from tests.serve.conftest import TEST_INGRESS, TEST_RENDERER, free_port

    svc = start_service(
        port=free_port(),
        num_cpus=4,
        object_store_memory=150 * 1024 * 1024,
        log_to_driver=bool(os.environ.get("IMAGEGEN_TEST_RAY_LOGS")),
        ingress=TEST_INGRESS,
        ingress_options={"ray_actor_options": {"num_cpus": 0.5}},
        renderer_options={"tiny-flux": TEST_RENDERER, "tiny-sdxl": TEST_RENDERER},
        renderer_config={"max_batch_size": 4, "batch_wait_timeout_s": 0.1},
    )
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def keys(service):
    """API keys of the session's service (made the way `imagegen keys create` makes them)."""
    from imagegen.serve.auth import create_key
    from imagegen.serve.store import ServeStore
    from tests.serve.conftest import Keys

    with ServeStore.open() as store:
        return Keys(
            admin=create_key(store, "tests-admin", ["admin"])[1],
            render=create_key(store, "tests-render", ["render"])[1],
            writer=create_key(store, "tests-writer", ["characters:write", "characters:approve"])[1],
            other_render=create_key(store, "tests-render-2", ["render"])[1],
        )


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh IMAGEGEN_HOME for this test (the shared model cache stays)."""
    home = tmp_path / "home"
    monkeypatch.setenv("IMAGEGEN_HOME", str(home))
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


def tiny_method_files(preset: str, method: str):
    """The files a tiny preset's identity method loads (its stand-ins, written and converted on first use)."""
    from imagegen.pipelines.assets import method_files
    from imagegen.pipelines.presets import get_preset

    return method_files(get_preset(preset), method)
