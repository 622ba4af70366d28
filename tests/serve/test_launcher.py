"""The launcher sizes a local Ray so every replica of the config can be scheduled, and turns Ray's token
authentication and Ray Serve's throughput-optimised data plane on for every cluster it starts."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from imagegen.serve import data_plane
from imagegen.serve.launcher import cpus_requested, local_cpus, prepare_config


def test_the_shipped_config_fits_a_two_core_machine():
    data = prepare_config(None)
    assert cpus_requested(data) == 2.0  # two renderers at 1 CPU; the ingress reserves none
    assert local_cpus(data) == max(os.cpu_count() or 1, 2)


def test_a_config_asking_for_more_cpus_than_the_machine_still_gets_every_replica_scheduled():
    options = {"tiny-flux": {"num_replicas": 3, "ray_actor_options": {"num_cpus": 2}}}
    data = prepare_config(None, renderer_options=options)
    assert cpus_requested(data) == 2.0 + 5  # tiny-flux now 3 x 2 CPUs instead of 1
    assert local_cpus(data) >= 7 and local_cpus(data) >= (os.cpu_count() or 1)


# -- Ray's token authentication ------------------------------------------------------------------------
def _python(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)


def _env_without_ray_auth(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return {**env, **extra}


ENABLE = (
    "import os; from imagegen.serve.launcher import enable_ray_token_auth; "
    "print(enable_ray_token_auth(joining={joining})); print(os.environ['RAY_AUTH_MODE'])"
)


def test_a_new_cluster_gets_a_private_token_in_the_home_and_keeps_it(tmp_path):
    env = _env_without_ray_auth(IMAGEGEN_HOME=str(tmp_path / "home"), HOME=str(tmp_path))
    first = _python(ENABLE.format(joining=False), env)
    assert first.returncode == 0, first.stderr[-2000:]
    token = tmp_path / "home" / "ray" / "auth_token"
    assert first.stdout.split() == [str(token), "token"]
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    secret = token.read_text()
    assert len(secret) == 64 and int(secret, 16)  # 256 bits, hex
    again = _python(ENABLE.format(joining=False), env)
    assert again.returncode == 0 and token.read_text() == secret  # a restart keeps the cluster's token


def test_ray_auth_cannot_be_turned_off_and_joining_needs_the_token(tmp_path):
    home = {"IMAGEGEN_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)}
    off = _python(ENABLE.format(joining=False), _env_without_ray_auth(RAY_AUTH_MODE="disabled", **home))
    assert off.returncode != 0 and "RAY_AUTH_MODE='disabled'" in off.stderr
    join = _python(ENABLE.format(joining=True), _env_without_ray_auth(**home))
    assert join.returncode != 0 and "joining a Ray cluster needs its token" in join.stderr
    assert not (tmp_path / "home" / "ray" / "auth_token").exists()  # joining never makes up a token


CONNECT = "import ray, sys; ray.init(address=sys.argv[1]); print('CONNECTED', flush=True)"


def test_the_service_cluster_refuses_a_driver_without_its_token(service, tmp_path):
    """The session cluster (started by start_service) answers only drivers holding its token."""
    import ray

    gcs = ray.get_runtime_context().gcs_address
    env = _env_without_ray_auth(HOME=str(tmp_path))  # no ~/.ray/auth_token either
    proc = subprocess.Popen(
        [sys.executable, "-c", CONNECT, gcs],
        env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    try:
        for line in proc.stdout:  # Ray retries for ~20 s: stop at the first refusal
            seen.append(line)
            if "InvalidAuthToken" in line or "CONNECTED" in line:
                break
    finally:
        proc.kill()
        proc.wait()
    assert any("InvalidAuthToken" in line for line in seen), "".join(seen)[-3000:]
    assert not any("CONNECTED" in line for line in seen)
    # the same driver with the token the service was started with connects
    ours = {k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH")}
    right = _python(CONNECT, {**env, **ours}, gcs)
    assert "CONNECTED" in right.stdout, (right.stdout + right.stderr)[-3000:]


def test_a_ray_started_here_gets_serves_throughput_optimised_data_plane_and_a_deployers_choice_wins():
    environ: dict[str, str] = {}
    assert data_plane.apply(environ) == {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
        "RAY_SERVE_LOG_TO_STDERR": "1",  # imagegen's warnings stay in the console and the workers' logs
    }
    assert environ == data_plane.ENVIRONMENT
    kept = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}  # the deployer keeps Ray's default data plane
    assert data_plane.apply(kept)["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    assert kept["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
