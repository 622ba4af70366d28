"""Start and stop the service from ``configs/serve.yaml``: what ``imagegen serve``, the tests, the
bench and the demo use.

``start_service`` starts a local Ray (``include_dashboard=False``: neither the dashboard nor its
job-submission API is started, so neither can be reached) or connects to ``address``, then deploys
the config exactly as ``serve run configs/serve.yaml`` does (the same controller call) and waits
until the application is running. Overrides (host, port, presets, ingress limits, per-renderer
options) are applied to the config dict before it is validated as Ray Serve's
``ServeDeploySchema``; the ingress limits are checked against the ingress deployment's
``max_ongoing_requests`` before Ray starts (``check_ingress``).

Ray's internal ports (GCS, raylets, object transfer) run code for whoever can reach them, so every
cluster this starts or joins uses Ray's token authentication (Ray >= 2.52), set explicitly rather
than left to Ray's default of the day: ``RAY_AUTH_MODE=token`` and a 256-bit token in
``$IMAGEGEN_HOME/ray/auth_token`` (0600), unless the deployer gives one with ``RAY_AUTH_TOKEN`` or
``RAY_AUTH_TOKEN_PATH``. Another node joins with the same token: ``RAY_AUTH_MODE=token
RAY_AUTH_TOKEN_PATH=<a copy of that file> ray start --address=<head>:6379``.

A Ray started here also runs Ray Serve's throughput-optimised data plane (``imagegen.serve.data_plane``: gRPC
between the replicas, user code on the replicas' own loops), unless the deployer's environment says otherwise.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import secrets
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from imagegen.errors import ConfigError
from imagegen.serve import data_plane
from imagegen.serve.config import (
    APP_NAME,
    INGRESS_MAX_ONGOING_REQUESTS,
    INGRESS_NAME,
    IngressConfig,
    app_deployments,
    custom_resources,
    deployment_problem,
    load_config,
    renderer_deployment_name,
    replica_bounds,
)
from imagegen.settings import get_settings

log = logging.getLogger(__name__)


def _deployment(app: dict[str, Any], name: str) -> dict[str, Any]:
    deployments = app.setdefault("deployments", [])
    for entry in deployments:
        if entry.get("name") == name:
            return entry
    entry = {"name": name}
    deployments.append(entry)
    return entry


def _apply_options(entry: dict[str, Any], options: dict[str, Any]) -> None:
    """Merge deployment options into ``entry`` (mappings merge key by key); a fixed ``num_replicas`` replaces the
    entry's ``autoscaling_config`` and an ``autoscaling_config`` a fixed count (Serve takes one or the other)."""
    for key, value in options.items():
        if isinstance(value, dict) and isinstance(entry.get(key), dict):
            entry[key] = {**entry[key], **value}
        else:
            entry[key] = value
    if isinstance(options.get("num_replicas"), int):
        entry.pop("autoscaling_config", None)
    elif options.get("autoscaling_config") and isinstance(entry.get("num_replicas"), int):
        entry.pop("num_replicas")


def prepare_config(
    config: dict[str, Any] | Path | str | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    presets: list[str] | None = None,
    ingress: dict[str, Any] | None = None,
    ingress_options: dict[str, Any] | None = None,
    renderer_options: dict[str, dict[str, Any]] | None = None,
    renderer_config: dict[str, Any] | None = None,
    warmup: bool | None = None,
    env_vars: dict[str, str] | None = None,
    profile: str | None = None,
    proxy_location: str | None = None,
    app_args: dict[str, Any] | None = None,
    inherit_env: bool = True,
) -> dict[str, Any]:
    """serve.yaml with overrides applied (a new dict; the file is not touched).

    ``ingress`` merges into the ingress ``user_config``; ``ingress_options`` into its deployment
    options; ``renderer_options`` maps a preset to deployment options (``num_replicas``,
    ``autoscaling_config``, ``max_queued_requests``, ``ray_actor_options`` ...; a fixed ``num_replicas``
    replaces the file's ``autoscaling_config`` and the other way round); ``renderer_config`` merges into every
    renderer's ``user_config``. ``profile`` is the optimisation profile of every renderer (the
    application's ``args.profile``, replacing the file's ``profile`` and ``profiles``); the profile each
    served preset will load with is checked here (``ProfileError``), before anything starts.
    ``app_args`` merges into the application's ``args`` (``AppArgs``). ``inherit_env`` copies this process's
    ``IMAGEGEN_*`` variables into the application's ``runtime_env`` (False for a config written for another place:
    deploy/rayservice.yaml's pods have their own environment).
    """
    data = copy.deepcopy(config) if isinstance(config, dict) else load_config(config)
    if proxy_location is not None:
        data["proxy_location"] = proxy_location
    if host is not None or port is not None:
        http = data.setdefault("http_options", {})
        if host is not None:
            http["host"] = host
        if port is not None:
            http["port"] = port
    apps = data.get("applications") or []
    app = next((a for a in apps if a.get("name") == APP_NAME), None)
    if app is None:
        raise ConfigError(f"the Serve config has no application named {APP_NAME!r}")
    args = app.setdefault("args", {})
    args.update(app_args or {})
    if presets is not None:
        args["presets"] = list(presets)
        keep = {INGRESS_NAME} | {renderer_deployment_name(p) for p in presets}
        app["deployments"] = [d for d in app.get("deployments", []) if d.get("name") in keep]
    if warmup is not None:
        args["warmup"] = warmup
    served = args.get("presets") or ["tiny-flux", "tiny-sdxl"]
    entry = _deployment(app, INGRESS_NAME)
    _apply_options(entry, ingress_options or {})
    if ingress:
        entry["user_config"] = {**(entry.get("user_config") or {}), **ingress}
    for preset in served:
        entry = _deployment(app, renderer_deployment_name(preset))
        _apply_options(entry, (renderer_options or {}).get(preset) or {})
        if renderer_config:
            entry["user_config"] = {**(entry.get("user_config") or {}), **renderer_config}
    env = {k: v for k, v in os.environ.items() if k.startswith("IMAGEGEN_")} if inherit_env else {}
    env.update(env_vars or {})
    if env:
        runtime_env = app.setdefault("runtime_env", {})
        runtime_env["env_vars"] = {**env, **(runtime_env.get("env_vars") or {})}
    if profile is not None:
        args["profile"] = profile
        args.pop("profiles", None)
    _check_profiles(args, served, (app.get("runtime_env") or {}).get("env_vars") or {})
    return data


def _check_profiles(args: dict[str, Any], presets: list[str], env_vars: dict[str, str]) -> None:
    """The profile every served preset will load with (``args.profiles`` / ``args.profile``, else the application's
    IMAGEGEN_PROFILE, else the preset's own) exists and fits the preset: a bad name is one line here, not a replica
    that dies while deploying."""
    from imagegen.terminal import check_profile_choice

    chosen = args.get("profiles") or {}
    if not isinstance(chosen, dict):
        raise ConfigError("the application's args.profiles maps preset names to profile names")
    for preset in presets:
        name = chosen.get(preset) or args.get("profile") or env_vars.get("IMAGEGEN_PROFILE") or None
        check_profile_choice(name, [preset])


@dataclass
class Service:
    """A running service: its base URL, and how to stop what ``start_service`` started."""

    url: str
    config: dict[str, Any]
    started_ray: bool
    info: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            if self.started_ray and ray.is_initialized():
                ray.shutdown()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _prepare_files(presets: list[str]) -> None:
    """Check every preset's files (and build tiny stand-ins) once here, instead of racing in every replica;
    a replica never downloads while serving."""
    from imagegen.pipelines.assets import prepare
    from imagegen.pipelines.presets import get_preset

    for name in presets:
        prepare(get_preset(name))


def start_service(
    config: dict[str, Any] | Path | str | None = None,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
    timeout_s: float = 300.0,
    log_to_driver: bool = True,
    on_ray_started: Callable[[], None] | None = None,
    **overrides: Any,
) -> Service:
    """Start Ray (unless one is running or ``address`` is given), deploy the config, wait until it runs.

    ``on_ray_started`` runs right after ``ray.init`` and before anything deploys: ``ray.init`` installs its
    own SIGTERM handler (which aborts the process), so a caller that stops cleanly on SIGTERM installs its
    handler again there, before the service can be seen ready.
    """
    import ray
    from ray import serve
    from ray.serve._private import api as serve_private_api
    from ray.serve.schema import ServeDeploySchema

    data = prepare_config(config, **overrides)
    check_ingress(data)
    check_deployments(data)
    schema = ServeDeploySchema.model_validate(data)
    app = next(a for a in schema.applications if a.name == APP_NAME)
    _prepare_files(list((app.args or {}).get("presets") or ["tiny-flux", "tiny-sdxl"]))
    started_ray = False
    if not ray.is_initialized():
        if address is not None:
            check_reachable(address)
        enable_ray_token_auth(joining=address is not None)
        if address is None:  # the processes of the Ray started here inherit it (a joined cluster has its own)
            data_plane.apply()
        kwargs: dict[str, Any] = {
            "address": address or "local",
            "namespace": "serve",
            "include_dashboard": False,
            "log_to_driver": log_to_driver,
        }
        if address is None:
            kwargs["num_cpus"] = num_cpus if num_cpus is not None else local_cpus(data)
            resources = local_resources(data)
            if resources:  # one machine plays every node: it offers what the placement asks for
                log.info("the local Ray offers the custom resources the config places by: %s", resources)
                kwargs["resources"] = resources
            if object_store_memory:
                kwargs["object_store_memory"] = object_store_memory
        ray.init(**kwargs)
        started_ray = True
    if on_ray_started is not None:
        on_ray_started()
    try:
        # exactly what `serve run configs/serve.yaml` does (ray/serve/scripts.py)
        client = serve_private_api.serve_start(
            http_options=schema.http_options.model_dump(),
            proxy_location=schema.proxy_location,
            grpc_options=None,
        )
        client.deploy_apps(schema, _blocking=False)
        _wait_running(APP_NAME, timeout_s)
    except BaseException:
        with _suppress():
            serve.shutdown()
        if started_ray:
            ray.shutdown()
        raise
    http = schema.http_options
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    return Service(url=f"http://{host}:{http.port}", config=data, started_ray=started_ray)


def check_ingress(data: dict[str, Any]) -> IngressConfig:
    """The ingress ``user_config`` of a prepared config, validated; ``ConfigError`` (one line) when it is
    invalid or its streams + renders + reserve do not fit the ingress deployment's ``max_ongoing_requests``."""
    app = next((a for a in data.get("applications") or [] if a.get("name") == APP_NAME), {})
    entry = next((d for d in app.get("deployments") or [] if d.get("name") == INGRESS_NAME), {})
    try:
        cfg = IngressConfig.model_validate(entry.get("user_config") or {})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        raise ConfigError(f"{INGRESS_NAME} user_config: {where}: {first['msg']}") from None
    problem = cfg.capacity_problem(int(entry.get("max_ongoing_requests", INGRESS_MAX_ONGOING_REQUESTS)))
    if problem is not None:
        raise ConfigError(problem)
    return cfg


def check_deployments(data: dict[str, Any]) -> None:
    """Scaling and placement options of every deployment make sense (``config.deployment_problem``); else
    ``ConfigError`` (one line), before Ray starts."""
    for deployment in app_deployments(data):
        problem = deployment_problem(deployment)
        if problem is not None:
            raise ConfigError(problem)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` Ray address answers a TCP connection; else ``ConfigError`` (one line) at once.

    Ray's own ``ray.init`` retries an unreachable address for minutes and then exits the process; joining a
    cluster (``imagegen serve --address``, ``imagegen eval run --address``) checks the GCS port first. ``auto``
    and ``ray://`` addresses are left to Ray.
    """
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray address {address!r}: expected host:port (the head's GCS port, 6379 by default)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {reason}", field="address") from None


def ray_token_path() -> Path:
    """Where ``start_service`` keeps the Ray cluster token it generates: ``$IMAGEGEN_HOME/ray/auth_token``."""
    return get_settings().home / "ray" / "auth_token"


def _write_token(path: Path) -> None:
    """A new 256-bit token at ``path``, readable by its owner only (created 0600, never widened)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
        handle.flush()
        os.fsync(handle.fileno())
    log.info("generated a Ray cluster token in %s", path)


def _checked_token(path: Path) -> Path:
    """``path`` if it holds a token; group/other permissions are removed (a token is a password)."""
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the Ray token file {path}: {exc.strerror}") from None
    if not text:
        raise ConfigError(f"the Ray token file {path} is empty")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("Ray token file %s was readable by others; setting it to 0600", path)
        path.chmod(0o600)
    return path


def enable_ray_token_auth(joining: bool) -> str:
    """Turn Ray's token authentication on for the cluster this process starts (or joins); returns the
    token's source for the log.

    Sets ``RAY_AUTH_MODE=token`` before ``ray.init`` (Ray's processes inherit this environment) and
    refreshes Ray's cached config in this process. The token: ``RAY_AUTH_TOKEN`` or
    ``RAY_AUTH_TOKEN_PATH`` when the deployer set one; else ``ray_token_path()`` (generated for a new
    cluster; to join, that file or Ray's own ``~/.ray/auth_token`` must hold the cluster's token).
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.strip().lower() != "token":
        raise ConfigError(
            f"RAY_AUTH_MODE={mode!r}: imagegen serve runs Ray only with token authentication; "
            "unset RAY_AUTH_MODE or set it to 'token'"
        )
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        source = "RAY_AUTH_TOKEN"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        source = str(_checked_token(Path(os.environ["RAY_AUTH_TOKEN_PATH"])))
    else:
        path = ray_token_path()
        ray_default = Path.home() / ".ray" / "auth_token"
        if path.exists():
            source = str(_checked_token(path))
        elif not joining:
            _write_token(path)
            source = str(path)
        elif ray_default.exists():
            source = str(_checked_token(ray_default))
            path = ray_default
        else:
            raise ConfigError(
                f"joining a Ray cluster needs its token: put it in {path} or set RAY_AUTH_TOKEN_PATH "
                "to a file holding it (the head's $IMAGEGEN_HOME/ray/auth_token)"
            )
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")  # Ray caches its config at import: make this process see token mode too
    # ... and the token it loaded (or found missing) for an earlier cluster of this process
    AuthenticationTokenLoader.instance().reset_cache()
    log.info("Ray token authentication on (token: %s)", source)
    return source


def cpus_requested(data: dict[str, Any]) -> float:
    """Logical CPUs the config's replicas ask Ray for at start (replicas x ``ray_actor_options.num_cpus``, 1 if
    unset; an autoscaling deployment starts at its ``initial_replicas`` or ``min_replicas``)."""
    total = 0.0
    for app in data.get("applications") or []:
        for deployment in app.get("deployments") or []:
            replicas = replica_bounds(deployment)[0]
            cpus = (deployment.get("ray_actor_options") or {}).get("num_cpus", 1)
            total += replicas * float(cpus)
    return total


def local_resources(data: dict[str, Any]) -> dict[str, float]:
    """Custom resources a local Ray offers so that every replica the config can scale to finds its place.

    On a cluster a node advertises a custom resource (``ray start --resources '{"gpu-h100": 1}'``, a KubeRay
    worker group's ``rayStartParams.resources``) and deployments that ask for it (``ray_actor_options.resources``)
    are placed there; one machine is every node at once, so it offers the most the deployments can ask for
    together (``max_replicas`` x amount), and a config written for a cluster still runs on a laptop.
    """
    total: dict[str, float] = {}
    for deployment in app_deployments(data):
        most = replica_bounds(deployment)[1]
        for name, amount in custom_resources(deployment).items():
            total[name] = total.get(name, 0.0) + most * float(amount)
    return total


def local_cpus(data: dict[str, Any]) -> int:
    """CPUs to give a local Ray: the machine's, or what the config requests when that is more.

    Ray's CPU count is a scheduling budget, not a thread limit: on a 2-core machine the shipped
    config (two renderers at 1 CPU + the ingress at 0.5) would otherwise leave a replica waiting
    for a CPU forever and the service never ready.
    """
    return max(os.cpu_count() or 1, math.ceil(cpus_requested(data)))


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def _wait_running(app_name: str, timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None:
            last = status
            if status.status == "RUNNING":
                return
            if status.status == "DEPLOY_FAILED":
                raise ConfigError(f"the Serve application failed to deploy: {status.message}")
        time.sleep(0.5)
    message = getattr(last, "message", "") if last is not None else "no status"
    raise TimeoutError(f"the Serve application was not running after {timeout_s:.0f}s ({message})")
