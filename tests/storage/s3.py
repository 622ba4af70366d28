"""An S3-compatible server for the storage matrix: moto's standalone server, started once per test session.

``moto[server]`` is in the dev extras, so ``make test`` runs the S3 arm on any machine: the session fixture
starts ``moto_server`` on a free local port (a real HTTP server speaking the S3 REST API, not an in-process
mock of our code) and every test gets a bucket of its own. ``IMAGEGEN_TEST_S3_ENDPOINT`` points the tests
at another S3-compatible server instead (MinIO, a real bucket's endpoint); then the credentials come from
the usual ``AWS_*`` variables. Without either, the S3 arm is skipped with the reason.

What is in a bucket is checked with boto3, independently of the obstore client the code under test uses.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagegen.settings import get_settings

#: what the S3 arm exports for obstore (and boto3): a local server takes any key, over plain HTTP
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "imagegen-test",
    "AWS_SECRET_ACCESS_KEY": "imagegen-test-secret",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_listening(port: int, process: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"moto_server did not listen on port {port} within {timeout_s:.0f}s")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment that points obstore and boto3 at the session's S3-compatible server."""
    external = os.environ.get("IMAGEGEN_TEST_S3_ENDPOINT", "")
    if external:
        yield {"AWS_ENDPOINT_URL": external, "AWS_ALLOW_HTTP": "true"}
        return
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        pytest.skip("the S3 arm needs moto's server (pip install 'moto[server]', in the dev extras)")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_listening(port, process, log)
        yield {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true"}
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - moto ignores SIGTERM
            process.kill()
            process.wait()


def s3_client(env: dict[str, str]):
    """A boto3 client for the test server (the independent view of what a bucket holds)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or os.environ.get("AWS_SECRET_ACCESS_KEY"),
        region_name=env.get("AWS_REGION") or os.environ.get("AWS_REGION", "us-east-1"),
    )


class Bucket:
    """A fresh bucket on the test server: its ``s3://`` URL, and what it holds as boto3 lists it."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.name = f"imagegen-test-{uuid.uuid4().hex[:16]}"
        self.url = f"s3://{self.name}"
        self.client = s3_client(env)
        self.client.create_bucket(Bucket=self.name)

    def keys(self) -> list[str]:
        """Every object key in the bucket (all pages)."""
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return sorted(keys)

    def raw_put(self, key: str, data: bytes) -> None:
        """Write an object behind the code's back (bit rot, a foreign writer)."""
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def drop(self) -> None:
        keys = self.keys()
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.name, Delete={"Objects": batch, "Quiet": True})
        self.client.delete_bucket(Bucket=self.name)


@pytest.fixture
def s3_bucket(s3_endpoint: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Bucket]:
    """A bucket of this test's own, with the server's endpoint and credentials in the environment."""
    for key, value in s3_endpoint.items():
        monkeypatch.setenv(key, value)
    bucket = Bucket(s3_endpoint)
    yield bucket
    bucket.drop()


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> Bucket | None:
    """The storage arm of this test: None (IMAGEGEN_HOME on the local disk, the default) or a bucket, set as
    ``IMAGEGEN_STORAGE_URL`` for everything the test opens from the settings."""
    if request.param == "local":
        monkeypatch.delenv("IMAGEGEN_STORAGE_URL", raising=False)
        get_settings.cache_clear()
        return None
    bucket = request.getfixturevalue("s3_bucket")
    monkeypatch.setenv("IMAGEGEN_STORAGE_URL", bucket.url)
    get_settings.cache_clear()
    return bucket
