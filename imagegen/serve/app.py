"""The Serve application: ``import_path: imagegen.serve.app:build_app`` in ``configs/serve.yaml``.

One renderer deployment per preset (named ``renderer-<preset>``, so serve.yaml can size each:
replicas, GPUs, queue limits, batch size) composed into the ``Ingress`` deployment through
``DeploymentHandle``s.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from imagegen.pipelines.presets import get_preset
from imagegen.serve.config import AppArgs, renderer_deployment_name


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Application builder (Ray Serve calls it with the ``args`` of the config)."""
    from imagegen.serve.ingress import Ingress
    from imagegen.serve.renderer_deployment import RendererDeployment

    parsed = AppArgs.model_validate(args or {})
    for preset in parsed.presets:
        get_preset(preset)  # an unknown preset fails the deploy, not the first request
    renderers = {
        preset: RendererDeployment.options(name=renderer_deployment_name(preset)).bind(
            preset, warmup=parsed.warmup, device=parsed.device, profile=parsed.profile_of(preset)
        )
        for preset in parsed.presets
    }
    return Ingress.bind(renderers, parsed.presets)
