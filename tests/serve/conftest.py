"""One real local Ray cluster and one Serve deployment of configs/serve.yaml for the whole module set.

Starting Ray and loading the renderers takes ~30 s, so the service is session-scoped and shared;
tests that kill replicas wait for the service to recover before they end. Limits are set low
(small queues, short heartbeats) so backpressure and recovery show up quickly; everything else is
the shipped config. Keys are created in the service's database the way `imagegen keys create`
does it.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from imagegen.client import Client

#: what the tests override in configs/serve.yaml
TEST_INGRESS = {
    "max_inflight_renders": 4,
    "max_queued_jobs": 20,
    "job_concurrency": 4,
    "job_stale_after_s": 4,
    "job_heartbeat_s": 0.5,
    "job_poll_s": 0.2,
    "retry_after_s": 1,
    "auth_cache_s": 0,
    "max_body_bytes": 256 * 1024,
    "max_upload_bytes": 16 * 1024 * 1024,
    # test_resilience bursts 30 renders from one key to reach the global limit, not the per-key one
    "max_renders_per_key": 32,
    # ... and up to 4 admitted 8-image renders of that key are 32 images (the shipped default is 16)
    "max_images_in_flight_per_key": 32,
    # low per-key limits for the keys test_limits.py creates (by key name); every other key: the defaults
    "key_overrides": {
        "limits-rate": {"key_rate_per_s": 0.01, "key_burst": 3},
        "limits-jobs": {"max_jobs_per_key": 2},
        "limits-renders": {"max_renders_per_key": 1},
        "limits-images": {"max_images_in_flight_per_key": 4},
        "limits-lifetime": {"stream_lifetime_s": 1},
    },
}
#: one replica per renderer, fixed (instead of the shipped autoscaling): the kill tests know which replica they kill
TEST_RENDERER = {
    "num_replicas": 1,
    "max_queued_requests": 6,
    "max_ongoing_requests": 8,
    "ray_actor_options": {"num_cpus": 1},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Keys:
    admin: str
    render: str
    writer: str
    other_render: str


# `service` and `keys` (session-scoped: one Ray cluster and one deployment for every test of the session)
# are defined in tests/conftest.py, so that tests outside tests/serve (tests/studio) share the same service.


@pytest.fixture(scope="session")
def admin(service, keys):
    with Client(service.url, keys.admin) as client:
        yield client


@pytest.fixture(scope="session")
def renderer_client(service, keys):
    with Client(service.url, keys.render) as client:
        yield client


@pytest.fixture
def http(service):
    with httpx.Client(base_url=service.url, timeout=120) as client:
        yield client


def wait_ready(url: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/readyz", timeout=10)
            if response.status_code == 200:
                return response.json()
            last = response.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise AssertionError(f"service not ready after {timeout_s}s: {last}")


def assert_error_shape(response: httpx.Response, status: int | tuple[int, ...] | None = None) -> dict:
    """The one JSON error shape; returns the error object."""
    if status is not None:
        allowed = (status,) if isinstance(status, int) else status
        assert response.status_code in allowed, (response.status_code, response.text[:500])
    assert 400 <= response.status_code < 600, response.status_code
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) >= {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "field"}, error
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    return error


def deploy_user_config(service, deployment: str, user_config: dict) -> None:
    """Give one deployment of the session service a new ``user_config`` the way ``serve deploy`` of an edited
    serve.yaml does: Serve keeps the replicas and calls their ``reconfigure`` (returns before they have)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    app = next(a for a in service.config["applications"] if a["name"] == "imagegen")
    next(d for d in app["deployments"] if d["name"] == deployment)["user_config"] = user_config
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(service.config), _blocking=False)


def cancelled_total(metrics: str, preset: str) -> float:
    """``imagegen_renders_cancelled_total`` of ``preset`` in a ``/metrics`` text (0 before the first)."""
    match = re.search(rf'^imagegen_renders_cancelled_total{{preset="{preset}"}} (\S+)$', metrics, re.M)
    return float(match.group(1)) if match else 0.0


def in_threads(target: Callable[[int], object], count: int) -> None:
    """``target(0)`` ... ``target(count - 1)`` at once, each on its own thread (concurrent clients); returns when all
    have ended."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


#: a PostgreSQL database the store tests may wipe (`.ci/run` starts one); SQLite files always run
OTHER_DATABASE = os.environ.get("IMAGEGEN_TEST_DATABASE_URL", "")


def database_url(arm: str, tmp_path: Path, what: str) -> str:
    """The database of a store test's arm: ``sqlite`` (a file under ``tmp_path``) or ``other``
    (``IMAGEGEN_TEST_DATABASE_URL``; the test is skipped, saying so, when it is not set)."""
    if arm == "sqlite":
        return f"sqlite:///{tmp_path / 'serve.db'}"
    if not OTHER_DATABASE:
        pytest.skip(f"set IMAGEGEN_TEST_DATABASE_URL to run {what} against another database")
    return OTHER_DATABASE
