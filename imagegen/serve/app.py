"""The Serve application: ``import_path: imagegen.serve.app:build_app`` in ``configs/serve.yaml``.

One renderer deployment per preset (named ``renderer-<preset>``, so serve.yaml can size each:
replicas, GPUs, queue limits, batch size) composed into the ``Ingress`` deployment through
``DeploymentHandle``s.

Ray Serve runs the builder once per deploy of the application (``serve run``, ``serve deploy``, a KubeRay
``RayService``), on one node, before any replica starts: with ``args.migrate`` that is where the database is
migrated, the one migration step of a deployment. The upgrade holds the schema lock (a PostgreSQL advisory
lock), so a second deploy racing it waits and finds the schema already at head.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve import Application

from imagegen.pipelines.presets import get_preset
from imagegen.serve.config import AppArgs, renderer_deployment_name

log = logging.getLogger(__name__)


def migrate_database() -> tuple[str, str]:
    """The deployment's migration step: the settings' database brought to head (idempotent, locked)."""
    from imagegen.migrations import upgrade, where_of
    from imagegen.settings import get_settings

    url = get_settings().registry_url
    before, after = upgrade(url)
    if before == after:
        log.info("database %s already at schema %s", where_of(url), after)
    else:
        log.warning("database %s migrated from schema %s to %s", where_of(url), before, after)
    return before, after


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Application builder (Ray Serve calls it with the ``args`` of the config)."""
    from imagegen.serve.ingress import Ingress
    from imagegen.serve.renderer_deployment import RendererDeployment

    parsed = AppArgs.model_validate(args or {})
    for preset in parsed.presets:
        get_preset(preset)  # an unknown preset fails the deploy, not the first request
    if parsed.migrate:
        migrate_database()
    renderers = {
        preset: RendererDeployment.options(name=renderer_deployment_name(preset)).bind(
            preset, warmup=parsed.warmup, device=parsed.device, profile=parsed.profile_of(preset)
        )
        for preset in parsed.presets
    }
    return Ingress.bind(renderers, parsed.presets)
