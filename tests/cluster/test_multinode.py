"""The service across Ray nodes: the ingress pinned to one node, the renderer to another (custom resources),
the HTTP proxy on the head; a character registered, rendered and its images fetched through the head; then the
renderer's node is lost mid-job and a replacement node joins: the job finishes there, or ends ``failed`` with a
reason, never stuck and never lost. Then ``imagegen eval run --address`` runs a suite's actor pool on the cluster.
"""

from __future__ import annotations

import io
import json
import time

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from imagegen.client import Client
from imagegen.serve.auth import create_key
from imagegen.serve.store import ServeStore
from tests.cluster.conftest import INGRESS_RESOURCE, NODE_MEMORY, RENDERER_RESOURCE, actors_on_nodes
from tests.photos import astronaut_set
from tests.serve.conftest import free_port, wait_ready

SYNTHETIC = {"kind": "synthetic", "creator": "cluster-tests"}
RENDERER = "renderer-tiny-flux"
#: the lost job's images: large enough for its render to outlast the removal of a node
JOB_SIZE = 128


def add_renderer_node(cluster):
    return cluster.add_node(num_cpus=1, resources={RENDERER_RESOURCE: 1}, object_store_memory=NODE_MEMORY)


def wait_for(what: str, test, timeout_s: float = 120.0, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = test()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(every_s)


def renderer_health(url: str) -> dict:
    """The tiny-flux renderer's health as /readyz reports it (pid, renders served ...)."""
    return wait_ready(url, timeout_s=180)["checks"]["renderers"]["tiny-flux"]


def replica_node(cluster, deployment: str) -> tuple[str, int]:
    """(node id, pid) of the deployment's one live replica."""
    [info] = actors_on_nodes(cluster, f":{deployment}").values()
    return info["Address"]["NodeID"], info["Pid"]


@pytest.fixture(scope="module")
def service(cluster):
    from imagegen.serve.launcher import start_service

    renderer_node = add_renderer_node(cluster)
    svc = start_service(
        address=cluster.address,
        port=free_port(),
        log_to_driver=False,
        presets=["tiny-flux"],
        warmup=False,
        ingress={"job_stale_after_s": 4, "job_heartbeat_s": 0.5, "job_poll_s": 0.2, "auth_cache_s": 0},
        ingress_options={"ray_actor_options": {"num_cpus": 0, "resources": {INGRESS_RESOURCE: 1}}},
        renderer_options={
            "tiny-flux": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1, "resources": {RENDERER_RESOURCE: 1}}}
        },
        timeout_s=240,
    )
    svc.renderer_node = renderer_node
    svc.stopped = False
    try:
        yield svc
    finally:
        if not svc.stopped:
            svc.stop()


@pytest.fixture(scope="module")
def keys(service):
    with ServeStore.open() as store:
        return {
            "writer": create_key(store, "cluster-writer", ["characters:write", "characters:approve"])[1],
            "render": create_key(store, "cluster-render", ["render"])[1],
        }


def test_ingress_and_renderer_run_where_their_resources_are_and_images_cross_nodes(cluster, service, keys):
    ingress_node, _ = replica_node(cluster, "Ingress")
    renderer_node, renderer_pid = replica_node(cluster, RENDERER)
    assert ingress_node == cluster.ingress_node.node_id
    assert renderer_node == service.renderer_node.node_id != ingress_node
    proxies = {i["Address"]["NodeID"] for i in actors_on_nodes(cluster, "ProxyActor").values()}
    assert proxies == {cluster.head_node.node_id}, "proxy_location HeadOnly: one HTTP proxy, on the head"

    with Client(service.url, keys["writer"]) as writer:
        created = writer.create_character("cluster-ava", "Ava", list(astronaut_set(3)), SYNTHETIC)
        assert created["report"]["verdict"] == "pass"
        writer.approve_character("cluster-ava")
    before = renderer_health(service.url)
    assert before["pid"] == renderer_pid
    with Client(service.url, keys["render"]) as client:
        render = client.render(prompt="ava on a bridge", character="cluster-ava", seed=3, steps=4)
    image = render.images[0]
    assert Image.open(io.BytesIO(image.png)).size == (64, 64)
    assert image.info["metadata"]["character"] == "cluster-ava"
    # rendered by the replica on the renderer node, answered by the ingress on the other node, through the head
    time.sleep(1.1)  # /readyz caches its checks for a second
    after = renderer_health(service.url)
    assert after["pid"] == renderer_pid and after["rendered"] > before["rendered"]


def test_losing_the_renderer_node_mid_job_never_loses_or_strands_the_job(cluster, service, keys):
    with Client(service.url, keys["render"]) as client:
        job = client.submit_job(
            prompt="ava at night",
            character="cluster-ava",
            seed=7,
            steps=40,
            width=JOB_SIZE,
            height=JOB_SIZE,
            num_images=2,
        )
        lost = None
        for event in client.events(job["job_id"]):
            if event.type == "progress":
                lost = service.renderer_node
                cluster.remove_node(lost, allow_graceful=False)
                break
            assert event.type not in ("done", "failed"), f"the job ended before any progress: {event}"
        assert lost is not None
        assert client.get_job(job["job_id"])["status"] in ("running", "queued"), "the node went mid-job"
        replacement = add_renderer_node(cluster)
        final = client.wait_job(job["job_id"], timeout_s=240)
        print("job after losing its renderer node:", {k: final.get(k) for k in ("status", "attempts", "error")})
        assert final["status"] in ("done", "failed"), final
        if final["status"] == "done":
            pngs = [client.job_image(job["job_id"], i) for i in range(2)]
            assert all(Image.open(io.BytesIO(png)).size == (JOB_SIZE, JOB_SIZE) for png in pngs)
        else:
            assert final["error"]["code"] and final["error"]["message"], final
        assert job["job_id"] in {j["job_id"] for j in client.list_jobs()}, "an accepted job is never lost"
        # the renderer came back on the replacement node (the only one with the resource) and renders again
        node, pid = wait_for("a renderer replica on the replacement node", lambda: _replica_on(cluster, RENDERER))
        assert node == replacement.node_id
        again = client.render(prompt="ava again", character="cluster-ava", seed=8, steps=4)
        assert again.images[0].png
        time.sleep(1.1)
        health = renderer_health(service.url)
        assert health["pid"] == pid and health["rendered"] >= 1
    service.renderer_node = replacement


def _replica_on(cluster, deployment: str) -> tuple[str, int] | None:
    live = actors_on_nodes(cluster, f":{deployment}")
    return replica_node(cluster, deployment) if len(live) == 1 else None


SUITE = {
    "name": "cluster-smoke",
    "gated": False,
    "presets": ["tiny-flux"],
    "methods": [{"name": "none"}],
    "characters": [{"id": "cluster-astronaut", "sample": "astronaut", "register": True}],
    "prompts": [
        {"id": "studio", "text": "studio portrait photo of {name}", "tags": {"pose": "portrait"}},
        {"id": "cafe", "text": "photo of {name} at a cafe", "tags": {"pose": "sitting"}},
    ],
    "seeds": [1, 2],
    "size": {"width": 64, "height": 64},
    "steps": 2,
    "backend": "dlib",
    "workers": 1,  # one actor: enough to show where it ran, and half the start-up of two
    "batch_size": 4,
    "bootstrap": {"samples": 50, "seed": 0},
}


def test_eval_run_address_runs_the_actor_pool_on_the_cluster(cluster, service, tmp_path):
    """After the service is gone, `imagegen eval run --address` renders a suite on the cluster's worker nodes."""
    import ray

    from imagegen.cli import app

    service.stop()  # frees the nodes' CPUs; the cluster stays up
    service.stopped = True
    assert not ray.is_initialized()
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", "run", str(suite), "--out", str(out), "--address", cluster.address])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert not ray.is_initialized(), "the run disconnects from the cluster it joined"
    run = json.loads((out / "run.json").read_text())
    info = run.get("info", run)
    assert info["rendered"] == 4 and len(list(out.rglob("*.png"))) == 4
    actors = actors_on_nodes(cluster, "RendererActor", state=None)
    workers = {node.node_id for node in cluster.worker_nodes}
    assert actors and {a["Address"]["NodeID"] for a in actors.values()} <= workers
    pids = {a["pid"] for a in info["actors"]["tiny-flux"]}
    assert pids <= {a["Pid"] for a in actors.values()}, "the renders came from this cluster's actors"
