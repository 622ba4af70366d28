"""The two ways to start the service a user is told about: `serve run configs/serve.yaml` and `imagegen serve`.

Each runs as a real subprocess with its own local Ray, on a free port and a throw-away IMAGEGEN_HOME,
and is stopped the way a person stops it (Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import yaml

from imagegen.serve.auth import create_key
from imagegen.serve.store import ServeStore
from tests.serve.conftest import assert_error_shape, free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _render_once(url: str) -> None:
    """No key: the JSON 401; with a key made the way `imagegen keys create` makes it: a PNG."""
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    body = {"preset": "tiny-flux", "prompt": "a cafe at night", "seed": 3}
    assert_error_shape(httpx.post(f"{url}/v1/renders", json=body, timeout=60), 401)
    with ServeStore.open() as store:
        key = create_key(store, "entrypoint-test", ["render"])[1]
    response = httpx.post(
        f"{url}/v1/renders?format=png", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300
    )
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"] == "image/png" and response.content[:8] == b"\x89PNG\r\n\x1a\n"


def _serve(
    command: list[str], port: int, stop_signal: int, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """Start ``command``, render once through it when it is ready, stop it with ``stop_signal``; its output."""
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**(os.environ if env is None else env), "RAY_USAGE_STATS_ENABLED": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout_s=240)
        _render_once(f"http://127.0.0.1:{port}")
    finally:
        out = _stop(proc, stop_signal)
    return proc, out


def _stop(proc: subprocess.Popen, sig: int) -> str:
    proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the service did not stop on signal {sig}: {out[-3000:]}") from None
    return out


def test_serve_run_deploys_the_shipped_config(isolated_home, tmp_path):
    """Ray's own CLI on configs/serve.yaml (only the port and one preset changed, for speed)."""
    config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"]["presets"] = ["tiny-flux"]
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "renderer-tiny-sdxl"]
    for deployment in app["deployments"]:  # one fixed renderer: an autoscaled second replica still loading
        if deployment.pop("autoscaling_config", None) is not None:  # would hold `serve run`'s shutdown past 120 s
            deployment["num_replicas"] = 1
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    _serve([str(BIN / "serve"), "run", str(path)], port, signal.SIGINT)


def test_imagegen_serve_runs_until_sigterm(isolated_home):
    port = free_port()
    command = [sys.executable, "-m", "imagegen.cli", "serve", "--port", str(port), "--preset", "tiny-flux"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}  # as a deployer starts it
    proc, out = _serve(command, port, signal.SIGTERM, env)
    assert proc.returncode == 0, out[-3000:]
    assert f"imagegen serving on http://127.0.0.1:{port}" in out and "stopped" in out
    # the cluster it started ran with Ray's token auth, its token private to the home's owner
    token = isolated_home / "ray" / "auth_token"
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) == 64


def test_imagegen_serve_refuses_limits_that_do_not_fit_the_ingress(isolated_home, tmp_path):
    """Streams + renders + reserve above max_ongoing_requests: one line naming the settings, before Ray starts."""
    config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    ingress = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress")
    ingress["user_config"]["max_streams"] = 90
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "imagegen.cli", "serve", "--config", str(path), "--port", str(free_port())]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "max_streams (90) + max_inflight_renders (32) + reserved_requests (20)" in result.stderr
    assert "max_ongoing_requests (100)" in result.stderr and "Traceback" not in result.stderr
    assert not (isolated_home / "ray").exists()  # refused before any Ray started
