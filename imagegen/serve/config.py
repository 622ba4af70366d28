"""Settings of the Serve app: what ``configs/serve.yaml`` puts in each deployment's ``user_config``.

``configs/serve.yaml`` is Ray Serve's own config format (``ServeDeploySchema``); these models
validate the ``user_config`` blocks of its deployments (an unknown key or a bad value fails the
deployment at start, not at the first request) and give every limit a default, so a config may
leave any of them out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from imagegen.pipelines.types import MAX_PROMPT_CHARS
from imagegen.settings import PROJECT_ROOT

DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "serve.yaml"
APP_NAME = "imagegen"
INGRESS_NAME = "Ingress"


def renderer_deployment_name(preset: str) -> str:
    """The Serve deployment name of ``preset``'s renderer (what serve.yaml's ``deployments`` refer to)."""
    return f"renderer-{preset}"


class IngressConfig(BaseModel):
    """The ingress deployment's ``user_config``: limits, auth, jobs."""

    model_config = ConfigDict(extra="forbid")

    #: largest JSON body (renders, jobs); beyond it 413
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    #: largest multipart upload (character registration)
    max_upload_bytes: int = Field(default=64 << 20, ge=1024)
    #: images one render or job may ask for
    max_images_per_request: int = Field(default=8, ge=1, le=64)
    #: prompt and negative prompt length (never above RenderRequest's own limit)
    max_prompt_chars: int = Field(default=MAX_PROMPT_CHARS, ge=1, le=MAX_PROMPT_CHARS)
    #: consistency gate: most render attempts per image
    max_gate_attempts: int = Field(default=8, ge=1, le=32)
    #: synchronous renders this ingress replica works on at once; beyond: 429 + Retry-After
    max_inflight_renders: int = Field(default=32, ge=1)
    #: jobs queued or running (all replicas, from the database); beyond: 429 + Retry-After
    max_queued_jobs: int = Field(default=256, ge=1)
    #: jobs one ingress replica dispatches to the renderers at once
    job_concurrency: int = Field(default=8, ge=1)
    #: render attempts of a job whose renderer (or ingress) replica died: 2 = retried once
    job_max_attempts: int = Field(default=2, ge=1, le=5)
    #: a running job whose owner has not written a heartbeat for this long is taken over
    job_stale_after_s: float = Field(default=30.0, gt=0)
    job_heartbeat_s: float = Field(default=2.0, gt=0)
    job_poll_s: float = Field(default=0.5, gt=0)
    #: finished jobs (and their images) are deleted after this long
    job_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    #: a synchronous render that takes longer ends with 504
    sync_timeout_s: float = Field(default=300.0, gt=0)
    #: Retry-After (seconds) sent with 429 / 503
    retry_after_s: int = Field(default=2, ge=1)
    #: verified API keys are cached this long (a revoked key stops working within it)
    auth_cache_s: float = Field(default=2.0, ge=0)
    #: serve /docs and /openapi.json without a key
    public_docs: bool = False
    #: SSE keep-alive comment interval
    sse_keepalive_s: float = Field(default=15.0, gt=0)


class RendererConfig(BaseModel):
    """A renderer deployment's ``user_config``: how ``@serve.batch`` collects requests."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=4, ge=1, le=64)
    #: how long the first request of a batch waits for company (bounded wait)
    batch_wait_timeout_s: float = Field(default=0.05, ge=0, le=10)


class AppArgs(BaseModel):
    """``args`` of the application in serve.yaml (passed to ``imagegen.serve.app:build_app``)."""

    model_config = ConfigDict(extra="forbid")

    presets: list[str] = Field(default_factory=lambda: ["tiny-flux", "tiny-sdxl"], min_length=1)
    #: warm each renderer up with a one-step render before it takes traffic
    warmup: bool = True
    #: device for the renderers (None: IMAGEGEN_DEVICE / auto)
    device: str | None = None


def load_config(path: Path | str | None = None) -> dict[str, Any]:
    """serve.yaml as a dict (validated as Ray Serve's ServeDeploySchema by ``launcher``)."""
    path = Path(path or DEFAULT_CONFIG)
    with path.open() as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a Serve config is a mapping")
    return data
