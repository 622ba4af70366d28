"""Scaling and placement in the Serve config, without Ray: the shipped renderers autoscale (never to zero),
overrides compose with it, placement by custom resources is checked and offered by a local Ray, and a config
Ray would accept but that cannot work here is refused in one line before anything starts."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import yaml

from imagegen.errors import ConfigError
from imagegen.serve.config import DEFAULT_CONFIG, app_deployments, deployment_problem, replica_bounds
from imagegen.serve.launcher import check_deployments, cpus_requested, local_resources, prepare_config


def renderer(data: dict, preset: str = "tiny-flux") -> dict:
    return next(d for d in app_deployments(data) if d["name"] == f"renderer-{preset}")


def test_the_shipped_renderers_autoscale_between_one_and_two_replicas_and_the_proxy_runs_on_the_head():
    data = prepare_config(None)
    assert data["proxy_location"] == "HeadOnly"
    for preset in ("tiny-flux", "tiny-sdxl"):
        entry = renderer(data, preset)
        scaling = entry["autoscaling_config"]
        assert "num_replicas" not in entry and replica_bounds(entry) == (1, 2)
        assert 0 < scaling["target_ongoing_requests"] <= entry["max_ongoing_requests"]
        assert scaling["upscale_delay_s"] < scaling["downscale_delay_s"]
    check_deployments(data)
    assert local_resources(data) == {}, "placement is opt-in: the shipped config runs on any one machine"
    assert cpus_requested(data) == 2.0, "replicas start at min_replicas"


def test_a_fixed_replica_count_replaces_autoscaling_and_the_other_way_round():
    fixed = renderer(prepare_config(None, renderer_options={"tiny-flux": {"num_replicas": 3}}))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    merged = renderer(prepare_config(None, renderer_options={"tiny-flux": {"autoscaling_config": {"max_replicas": 5}}}))
    assert merged["autoscaling_config"]["max_replicas"] == 5 and merged["autoscaling_config"]["min_replicas"] == 1
    ingress = next(
        d
        for d in app_deployments(prepare_config(None, ingress_options={"autoscaling_config": {"max_replicas": 3}}))
        if d["name"] == "Ingress"
    )
    assert "num_replicas" not in ingress and ingress["autoscaling_config"] == {"max_replicas": 3}
    # the result is what Ray's own schema takes
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(prepare_config(None, renderer_options={"tiny-flux": {"num_replicas": 3}}))


def test_a_local_ray_offers_the_custom_resources_the_placement_asks_for():
    options = {
        "tiny-flux": {"ray_actor_options": {"num_gpus": 0, "resources": {"gpu-h100": 1}}},
        "tiny-sdxl": {"num_replicas": 1, "ray_actor_options": {"resources": {"gpu-h100": 0.5, "fast-disk": 1}}},
    }
    data = prepare_config(None, renderer_options=options)
    check_deployments(data)
    # tiny-flux may scale to 2 replicas of 1 gpu-h100 each; tiny-sdxl is fixed at 1 replica
    assert local_resources(data) == {"gpu-h100": 2.5, "fast-disk": 1.0}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"name": "renderer-x", "num_replicas": 2, "autoscaling_config": {"max_replicas": 3}},
            "num_replicas (2) and autoscaling_config exclude each other",
        ),
        (
            {"name": "renderer-x", "autoscaling_config": {"min_replicas": 0, "max_replicas": 2}},
            "min_replicas must be at least 1",
        ),
        (
            {"name": "renderer-x", "autoscaling_config": {"min_replicas": 3, "max_replicas": 2}},
            "max_replicas (2) is below min_replicas (3)",
        ),
        (
            {"name": "renderer-x", "max_ongoing_requests": 4, "autoscaling_config": {"target_ongoing_requests": 8}},
            "target_ongoing_requests (8) is above max_ongoing_requests (4)",
        ),
        (
            {"name": "renderer-x", "autoscaling_config": {"target_ongoing_requests": 17}},
            "above max_ongoing_requests (16)",
        ),
        ({"name": "renderer-x", "autoscaling_config": [1, 2]}, "autoscaling_config is a mapping"),
        (
            {"name": "renderer-x", "autoscaling_config": {"target_ongoing_requests": "lots"}},
            "autoscaling_config.target_ongoing_requests is 'lots': a number",
        ),
        (
            {"name": "renderer-x", "ray_actor_options": {"resources": {"GPU": 1}}},
            "resources.GPU: set it with ray_actor_options.num_gpus instead",
        ),
        (
            {"name": "Ingress", "ray_actor_options": {"resources": {"gpu-h100": 0}}},
            "resources.gpu-h100 is 0: a custom resource is a positive amount",
        ),
        (
            {"name": "Ingress", "ray_actor_options": {"resources": {"gpu-h100": "one"}}},
            "resources.gpu-h100 is 'one'",
        ),
    ],
)
def test_scaling_and_placement_that_cannot_work_are_named_in_one_line(entry, message):
    problem = deployment_problem(entry)
    assert problem is not None and message in problem and "\n" not in problem
    data = prepare_config(None)
    app_deployments(data)[0].clear()
    app_deployments(data)[0].update(entry)
    with pytest.raises(ConfigError, match="renderer-x|Ingress"):
        check_deployments(data)


def test_an_ingress_may_scale_to_zero_but_nothing_else_is_refused_in_a_sane_config():
    assert deployment_problem({"name": "Ingress", "autoscaling_config": {"min_replicas": 0, "max_replicas": 2}}) is None
    assert deployment_problem({"name": "renderer-x", "num_replicas": "auto", "autoscaling_config": {}}) is None
    assert deployment_problem({"name": "renderer-x", "ray_actor_options": {"resources": {"gpu-a100": 0.25}}}) is None


def test_imagegen_serve_refuses_a_renderer_scaled_to_zero_before_ray_starts(isolated_home, tmp_path):
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    entry = next(d for d in config["applications"][0]["deployments"] if d["name"] == "renderer-tiny-sdxl")
    entry["autoscaling_config"]["min_replicas"] = 0
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "imagegen.cli", "serve", "--config", str(path), "--port", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "renderer-tiny-sdxl: autoscaling_config.min_replicas must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (isolated_home / "ray").exists()  # refused before any Ray started


def test_joining_a_cluster_that_does_not_answer_is_one_line_at_once(isolated_home, tmp_path):
    """`eval run --address` / `serve --address` at a closed port: refused in one line, not Ray's minutes of
    retries ending in an exit; a malformed address too."""
    from typer.testing import CliRunner

    from imagegen.cli import app
    from imagegen.serve.launcher import check_reachable

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(ConfigError, match=rf"cannot reach the Ray cluster at {closed}: ") as info:
        check_reachable(closed)
    assert info.value.field == "address"
    with pytest.raises(ConfigError, match="expected host:port"):
        check_reachable("head-without-port")
    check_reachable("auto")  # left to Ray
    result = CliRunner().invoke(app, ["eval", "run", "smoke", "--out", str(tmp_path / "run"), "--address", closed])
    assert isinstance(result.exception, ConfigError), result.output
    assert "cannot reach the Ray cluster" in str(result.exception)
