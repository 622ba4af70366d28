"""Ray clusters of several nodes on one machine (``ray.cluster_utils.Cluster``, the way Ray tests fault
tolerance), and the autoscaling service: each test here starts and stops its own Ray, so these tests run
in their own pytest process (``make test`` runs ``pytest -q tests/cluster`` after the main suite, which
shares one Ray cluster for the whole session and ignores this directory).

All nodes share the machine, hence the local IMAGEGEN_HOME (registry, blobs, job results, models):
enough to show placement and node loss; shared object storage across machines is ``IMAGEGEN_STORAGE_URL``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Collected only when pytest is pointed at this directory or a file in it (``pytest tests/cluster``): the
    main run (``pytest``, ``pytest tests``) shares one Ray cluster per session and must not start these."""
    asked = [Path(config.invocation_params.dir, arg.split("::")[0]).resolve() for arg in config.args]
    if any(path == HERE or HERE in path.parents for path in asked):
        return None
    return HERE in collection_path.resolve().parents or None


#: a custom resource standing in for a GPU type (a real GPU node: ray start --resources '{"gpu-h100": 1}')
RENDERER_RESOURCE = "gpu-test"
#: the custom resource of the node the ingress is pinned to
INGRESS_RESOURCE = "imagegen-ingress"
#: node loss is noticed within ~3 s instead of Ray's default ~15 s (GCS health checks of the raylets)
FAST_NODE_FAILURE = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 3,
}
NODE_MEMORY = 100 * 1024 * 1024  # object store per node


def actors_on_nodes(cluster, class_part: str, state: str | None = "ALIVE") -> dict[str, dict]:
    """Actors (GCS table) whose class name contains ``class_part``: actor id -> info (NodeID, Pid, State)."""
    table = cluster.global_state.actor_table(None)
    return {
        actor_id: info
        for actor_id, info in table.items()
        if class_part in info["ActorClassName"] and (state is None or info["State"] == state)
    }


@pytest.fixture(scope="module")
def cluster(_session_home):
    """Head (GCS, Serve controller and the HTTP proxy; no CPUs, so no replica lands there) + an ingress node."""
    import ray
    from ray.cluster_utils import Cluster

    from imagegen.serve import data_plane
    from imagegen.serve.launcher import enable_ray_token_auth

    assert not ray.is_initialized(), "a cluster test must start from a process without Ray"
    enable_ray_token_auth(joining=False)  # the nodes inherit RAY_AUTH_MODE=token and the token's path
    data_plane.apply()  # and the data plane deploy/rayservice.yaml gives every pod
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "object_store_memory": NODE_MEMORY,
            "_system_config": FAST_NODE_FAILURE,
        },
    )
    cluster.ingress_node = cluster.add_node(
        num_cpus=1, resources={INGRESS_RESOURCE: 1}, object_store_memory=NODE_MEMORY
    )
    try:
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
