"""The Dockerfile and the KubeRay manifest, read as data (``docker build`` and a Kubernetes cluster are not
available here): what the README promises about them holds, and the manifest's Serve config is
configs/serve.yaml with the documented overrides only (deploy/serve-overrides.yaml)."""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagegen.serve import data_plane
from imagegen.serve.config import AppArgs, app_deployments, custom_resources, replica_bounds
from imagegen.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
sys.path.append(str(DEPLOY))  # after the installed packages: the script shadows nothing

from sync_serve_config import embedded_serve_config, expected_serve_config, rewrite  # noqa: E402


# -- Dockerfile ------------------------------------------------------------------------------------------------------
def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(steps: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Build stages by name (``FROM x AS name``), each with its instructions; the last one also as ``final``."""
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for word, args in steps:
        if word == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"stage{len(found)}"
            current = found.setdefault(name, [])
            found["final"] = current
        if current is not None:
            current.append((word, args))
    return found


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, list[tuple[str, str]]]:
    return stages(instructions((ROOT / "Dockerfile").read_text()))


def test_the_dockerfile_builds_a_cpu_and_a_cuda_variant_from_one_shared_recipe(dockerfile):
    bases = {name: steps[0][1].split()[0] for name, steps in dockerfile.items() if name != "final"}
    assert bases["base-cpu"].startswith("python:3.11"), bases
    assert bases["base-cuda"].startswith("nvidia/cuda:") and "runtime" in bases["base-cuda"], bases
    assert bases["base"] == "base-${VARIANT}", "the shared stages start from the chosen variant's base"
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M), "CPU unless --build-arg VARIANT=cuda"
    indexes = {name: " ".join(a for w, a in steps if w in ("ENV", "ARG")) for name, steps in dockerfile.items()}
    assert "whl/cpu" in indexes["base-cpu"] and re.search(r"whl/cu\d+", indexes["base-cuda"]), indexes


def test_the_image_installs_the_project_from_the_repository_with_the_pinned_torch(dockerfile):
    build = dockerfile["build"]
    copied = [a.split()[:-1] for w, a in build if w == "COPY"]
    assert ["imagegen"] in copied and ["pyproject.toml", "README.md"] in copied and ["configs"] in copied, copied
    runs = " && ".join(a for w, a in build if w == "RUN")
    assert re.search(r"pip install -e \"?\.(\[[a-z,]+\])?\"?", runs), runs
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for package in ("torch", "torchvision"):
        pinned = next(p for p in pins if p.startswith(f"{package}=="))
        assert pinned in runs, f"the image installs {package} as pyproject.toml pins it ({pinned})"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()}
    for sources in copied:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source not in ignored, f"COPY {source}: excluded by .dockerignore"
    for kept in ("imagegen", "configs", "pyproject.toml"):
        assert kept not in ignored


def test_the_image_runs_as_a_non_root_user_and_serves_on_the_manifest_port(dockerfile):
    final = dockerfile["final"]
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    after_user = final[[w for w, _ in final].index("USER") :]
    assert not any(w == "RUN" for w, _ in after_user[1:]), "nothing runs as root after USER"
    assert any(w == "COPY" and "--from=build" in a and "/opt/venv" in a for w, a in final)
    uid = next(a.split("=")[1] for w, a in final if w == "ARG" and a.startswith("UID="))
    cmd = json.loads(next(a for w, a in final if w == "CMD"))
    assert cmd[:2] == ["imagegen", "serve"] and "0.0.0.0" in cmd
    port = cmd[cmd.index("--port") + 1]
    assert ("EXPOSE", port) in final
    manifest = load_manifest()
    for pod in pod_specs(manifest):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert str(pod["securityContext"]["runAsUser"]) == uid
    for container in containers(manifest):
        assert container["image"].endswith(":cuda"), "the GPU cluster runs the CUDA variant"


# -- the KubeRay manifest --------------------------------------------------------------------------------------------
def load_manifest() -> dict[str, Any]:
    documents = list(yaml.safe_load_all((DEPLOY / "rayservice.yaml").read_text()))
    [service] = [d for d in documents if isinstance(d, dict) and d.get("kind") == "RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    return service


def groups(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = manifest["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def pod_specs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [g["template"]["spec"] for g in groups(manifest).values()]


def containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for pod in pod_specs(manifest) for c in pod.get("initContainers", []) + pod["containers"]]


def advertised(group: dict[str, Any]) -> dict[str, float]:
    """Custom resources a worker group's nodes advertise (rayStartParams.resources: KubeRay's quoted JSON)."""
    raw = group.get("rayStartParams", {}).get("resources")
    return json.loads(json.loads(raw)) if raw else {}


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return load_manifest()


def test_the_manifest_serves_configs_serve_yaml_with_the_documented_overrides_only(manifest):
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert embedded == expected_serve_config(), "run: python deploy/sync_serve_config.py"
    # and the check can fail: a change to configs/serve.yaml that the manifest did not follow is seen
    shipped = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    assert embedded["logging_config"] == shipped["logging_config"]
    drifted = json.loads(json.dumps(embedded))
    drifted["applications"][0]["deployments"][0]["user_config"]["max_queued_jobs"] += 1
    assert drifted != expected_serve_config()
    # the sync script writes exactly the expected config back into the manifest's text
    text = (DEPLOY / "rayservice.yaml").read_text()
    assert embedded_serve_config(rewrite(text, drifted)) == drifted
    assert embedded_serve_config(rewrite(text, embedded)) == embedded


def test_the_embedded_config_is_valid_for_ray_and_for_imagegen(manifest):
    from ray.serve.schema import ServeDeploySchema

    from imagegen.serve.launcher import check_deployments, check_ingress

    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    check_ingress(embedded)
    check_deployments(embedded)
    args = AppArgs.model_validate(embedded["applications"][0]["args"])
    assert args.migrate, "the one migration step of a deployment runs in the application builder"
    assert embedded["http_options"]["host"] == "0.0.0.0"
    assert "runtime_env" not in embedded["applications"][0], "no local IMAGEGEN_* paths leak into the manifest"


def test_probes_sit_on_the_ingress_pods_readiness_on_readyz_liveness_on_healthz(manifest):
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    port = embedded["http_options"]["port"]
    ingress = groups(manifest)["ingress"]["template"]["spec"]["containers"][0]
    assert ingress["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert ingress["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert ingress["startupProbe"]["httpGet"]["path"] == "/healthz"
    startup = ingress["startupProbe"]["periodSeconds"] * ingress["startupProbe"]["failureThreshold"]
    assert startup >= 600, "the first start (model pulls, warm-up) must not be killed by liveness"
    # the head must not wait for the application: KubeRay deploys it only once the head pod is ready
    head = groups(manifest)["head"]["template"]["spec"]["containers"][0]
    assert "/readyz" not in json.dumps(head.get("readinessProbe", {}))
    # ingress replicas land on the ingress pods (where the probes are), and there is a proxy on them
    assert embedded["proxy_location"] == "EveryNode"
    [entry] = [d for d in app_deployments(embedded) if d["name"] == "Ingress"]
    wanted = custom_resources(entry)
    assert wanted and set(wanted) <= set(advertised(groups(manifest)["ingress"]))


def test_every_placement_resource_is_advertised_by_a_worker_group_large_enough(manifest):
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    cluster_groups = groups(manifest)
    for deployment in app_deployments(embedded):
        most = replica_bounds(deployment)[1]
        for name, amount in custom_resources(deployment).items():
            capacity = sum(
                advertised(g).get(name, 0) * g.get("maxReplicas", g.get("replicas", 1)) for g in cluster_groups.values()
            )
            assert capacity >= most * amount, f"{deployment['name']}: {most} x {name}={amount}, room for {capacity}"


def test_the_gpu_worker_group_has_a_gpu_per_pod_and_says_which_gpu(manifest):
    gpu = groups(manifest)["gpu-h100"]
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["rayStartParams"]["num-gpus"] == "1"
    assert advertised(gpu) == {"gpu-h100": 1}
    assert gpu["maxReplicas"] > gpu["minReplicas"] and manifest["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"]
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    renderers = [d for d in app_deployments(embedded) if d["name"].startswith("renderer-")]
    assert renderers and all(d["ray_actor_options"]["num_gpus"] == 1 for d in renderers)
    assert all(custom_resources(d) == {"gpu-h100": 1} for d in renderers)
    assert all(d["autoscaling_config"]["max_replicas"] > d["autoscaling_config"]["min_replicas"] for d in renderers)
    # the pods pull their models before Ray starts there: a replica never downloads while serving
    init = " ".join(" ".join(c["command"]) for c in gpu["template"]["spec"]["initContainers"])
    assert all(f"imagegen models pull {p}" in init for p in embedded["applications"][0]["args"]["presets"])


def test_every_secret_the_pods_read_is_defined_and_names_a_real_setting(manifest):
    secrets = {
        d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
        for d in yaml.safe_load_all((DEPLOY / "secrets.example.yaml").read_text())
        if d and d.get("kind") == "Secret"
    }
    envs = [{e["name"]: e for e in c["env"]} for c in containers(manifest)]
    assert all(env.keys() == envs[0].keys() for env in envs), "every Ray container sees the same settings"
    env = envs[0]
    for name in (
        "IMAGEGEN_DATABASE_URL",
        "IMAGEGEN_STORAGE_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "HF_TOKEN",
    ):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    for name, entry in env.items():
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref and not ref.get("optional"):
            assert ref["key"] in secrets.get(ref["name"], set()), f"{name}: secret {ref['name']}/{ref['key']}"
        if name.startswith("IMAGEGEN_"):
            assert name[len("IMAGEGEN_") :].lower() in Settings.model_fields, f"{name} is no imagegen setting"
    # every pod runs the data plane a Ray that `imagegen serve` starts runs
    assert {name: env[name].get("value") for name in data_plane.ENVIRONMENT} == data_plane.ENVIRONMENT
    mounts = {m["mountPath"]: m["name"] for c in containers(manifest) for m in c["volumeMounts"]}
    for pod in pod_specs(manifest):
        for volume in pod["volumes"]:
            if "secret" in volume:
                keys = {i["key"] for i in volume["secret"]["items"]}
                assert keys <= secrets[volume["secret"]["secretName"]], volume
    for setting in ("IMAGEGEN_C2PA_CERT", "IMAGEGEN_C2PA_KEY"):
        path = Path(env[setting]["value"])
        assert mounts[str(path.parent)] == "c2pa", f"{setting} points into the mounted C2PA secret"
