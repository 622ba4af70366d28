"""Under a burst of renders the renderer deployment grows from one replica to two, and shrinks back to one
when the burst ends (Ray Serve autoscaling with short delays; tiny preset at half a CPU per replica, so two
replicas fit on a 2-core machine). The figures (when, how fast) are bench/serve_autoscale.py's, recorded in
docs/benchmarks.md; this test asserts the behaviour only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.append(str(BENCH))  # after the installed packages: bench modules shadow nothing

from serve_autoscale import AUTOSCALING, run_burst, service_overrides  # noqa: E402

from imagegen.serve.auth import create_key  # noqa: E402
from imagegen.serve.store import ServeStore  # noqa: E402
from tests.serve.conftest import free_port  # noqa: E402


def test_a_burst_scales_the_renderer_from_one_replica_to_two_and_back(_session_home):
    import ray

    from imagegen.serve.launcher import start_service

    assert not ray.is_initialized()
    service = start_service(
        port=free_port(),
        num_cpus=2,
        object_store_memory=150 * 1024 * 1024,
        log_to_driver=False,
        timeout_s=240,
        **service_overrides("tiny-flux", cpus_per_replica=0.5),
    )
    try:
        deployment = next(
            d for d in service.config["applications"][0]["deployments"] if d["name"] == "renderer-tiny-flux"
        )
        assert deployment["autoscaling_config"] == {**deployment["autoscaling_config"], **AUTOSCALING}
        assert "num_replicas" not in deployment
        with ServeStore.open() as store:
            key = create_key(store, "cluster-autoscale", ["render"])[1]
        result = run_burst(service.url, key, clients=4, steps=8, hold_s=2, hold_renders=4, min_load_s=3, max_load_s=180)
    finally:
        service.stop()
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}, indent=2))
    timeline = [(s["running"], s["live"]) for s in result["timeline"]]
    assert result["replicas_before"] == 1, timeline
    assert result["peak_running"] == 2, timeline  # never beyond max_replicas
    assert result["second_replica_running_s"] is not None and result["second_replica_running_s"] < result["load_s"]
    assert result["back_to_one_after_load_s"] is not None, f"never back to one replica after the burst: {timeline}"
    assert result["final_running"] == 1 and result["final_live"] == 1, timeline
    # renders finished while two replicas ran, and none was refused or lost while replicas came and went
    assert result["two_replicas"]["renders"] > 0, result
    assert set(result["statuses"]) == {"200"}, result["statuses"]
