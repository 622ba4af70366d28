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
from pydantic import BaseModel, ConfigDict, Field, model_validator

from imagegen.pipelines.types import MAX_PROMPT_CHARS
from imagegen.settings import PROJECT_ROOT

DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "serve.yaml"
APP_NAME = "imagegen"
INGRESS_NAME = "Ingress"
#: the ingress deployment's ``max_ongoing_requests`` when serve.yaml does not set it
INGRESS_MAX_ONGOING_REQUESTS = 100


def renderer_deployment_name(preset: str) -> str:
    """The Serve deployment name of ``preset``'s renderer (what serve.yaml's ``deployments`` refer to)."""
    return f"renderer-{preset}"


class KeyLimits(BaseModel):
    """The limits one key works under (``IngressConfig.limits_for``)."""

    model_config = ConfigDict(frozen=True)

    rate_per_s: float
    burst: int
    renders: int
    images: int
    jobs: int
    streams: int
    stream_lifetime_s: float


class KeyOverride(BaseModel):
    """``key_overrides`` entry: the per-key limits of the keys with one name (unset fields: the defaults)."""

    model_config = ConfigDict(extra="forbid")

    key_rate_per_s: float | None = Field(default=None, gt=0)
    key_burst: int | None = Field(default=None, ge=1)
    max_renders_per_key: int | None = Field(default=None, ge=1)
    max_images_in_flight_per_key: int | None = Field(default=None, ge=1)
    max_jobs_per_key: int | None = Field(default=None, ge=1)
    max_streams_per_key: int | None = Field(default=None, ge=1)
    stream_lifetime_s: float | None = Field(default=None, gt=0)


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
    #: designs (``/v1/designs``) nobody registers or deletes are deleted with everything they made after this long
    design_ttl_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    #: how often expired designs are swept (one asked for after it expired is deleted at once)
    design_sweep_s: float = Field(default=300.0, gt=0)
    #: candidate portraits one design may ask for (one batched job; never above the flow's 16)
    max_design_candidates: int = Field(default=16, ge=1, le=16)
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

    # -- per-key limits (imagegen/serve/limits.py); ``key_overrides`` changes them for named keys --
    #: requests per second one key may send, sustained (token bucket); beyond: 429 + Retry-After
    key_rate_per_s: float = Field(default=20.0, gt=0)
    #: requests one key may send at once above the sustained rate (the bucket's size)
    key_burst: int = Field(default=100, ge=1)
    #: synchronous renders one key has in progress on one ingress replica
    max_renders_per_key: int = Field(default=8, ge=1)
    #: images one key has in the renderers at once (its sync renders' and its running jobs' images) on one ingress
    #: replica: a renderer's queue (``max_queued_requests``) is shared by every key, and a request is ``num_images``
    #: renderer calls, so a few requests of one key could fill it (every other key: 503). 16 = two full requests
    #: (``max_images_per_request``, 8) and half the shipped renderer queue (32): one key never fills a queue alone.
    #: A sync render past it: 429; a job waits for room; ``num_images`` above it: 422
    max_images_in_flight_per_key: int = Field(default=16, ge=1)
    #: jobs one key has queued or running (all replicas, counted in the database)
    max_jobs_per_key: int = Field(default=64, ge=1)
    #: open /v1/jobs/{id}/events streams of one key on one ingress replica
    max_streams_per_key: int = Field(default=8, ge=1)
    #: open event streams on one ingress replica, all keys together
    max_streams: int = Field(default=48, ge=1)
    #: an event stream is closed after this long with a `reconnect` event (resume with Last-Event-ID)
    stream_lifetime_s: float = Field(default=900.0, gt=0)
    #: requests kept free for health and cheap routes: max_streams + max_inflight_renders + this
    #: must not exceed the ingress deployment's max_ongoing_requests (checked at start)
    reserved_requests: int = Field(default=20, ge=1)
    #: per-key limits for keys of these names (`imagegen keys create NAME`); unset fields keep the above
    key_overrides: dict[str, KeyOverride] = Field(default_factory=dict)
    #: deepest nesting of a JSON body (or JSON form field); deeper: 422 before it is parsed
    max_json_depth: int = Field(default=32, ge=2, le=256)

    @model_validator(mode="after")
    def _streams_per_key_within_total(self) -> IngressConfig:
        if self.max_streams_per_key > self.max_streams:
            raise ValueError(
                f"max_streams_per_key ({self.max_streams_per_key}) is above max_streams ({self.max_streams})"
            )
        return self

    def limits_for(self, key_name: str) -> KeyLimits:
        """The per-key limits of a key called ``key_name`` (the defaults, with its override applied)."""
        limits = KeyLimits(
            rate_per_s=self.key_rate_per_s,
            burst=self.key_burst,
            renders=self.max_renders_per_key,
            images=self.max_images_in_flight_per_key,
            jobs=self.max_jobs_per_key,
            streams=self.max_streams_per_key,
            stream_lifetime_s=self.stream_lifetime_s,
        )
        override = self.key_overrides.get(key_name)
        if override is None:
            return limits
        names = {
            "key_rate_per_s": "rate_per_s",
            "key_burst": "burst",
            "max_renders_per_key": "renders",
            "max_images_in_flight_per_key": "images",
            "max_jobs_per_key": "jobs",
            "max_streams_per_key": "streams",
            "stream_lifetime_s": "stream_lifetime_s",
        }
        changed = {names[name]: value for name, value in override.model_dump(exclude_none=True).items()}
        return limits.model_copy(update=changed)

    def capacity_problem(self, max_ongoing_requests: int) -> str | None:
        """One line naming the settings when streams, renders and the reserve do not fit the ingress; else None."""
        needed = self.max_streams + self.max_inflight_renders + self.reserved_requests
        if needed <= max_ongoing_requests:
            return None
        return (
            f"ingress limits do not fit: max_streams ({self.max_streams}) + max_inflight_renders "
            f"({self.max_inflight_renders}) + reserved_requests ({self.reserved_requests}) = {needed} is above the "
            f"Ingress deployment's max_ongoing_requests ({max_ongoing_requests}); lower them or raise "
            "max_ongoing_requests in the Serve config"
        )


class RendererConfig(BaseModel):
    """A renderer deployment's ``user_config``: how its replicas batch requests and what they warm up.

    Batching (``imagegen.serve.renderer_deployment.AdaptiveBatcher``): a request that reaches an
    idle replica with nothing else queued renders at once; requests that arrive while a batch
    renders form the next batch. With ``adaptive_batch_wait`` the replica holds a batch open
    (at most ``batch_wait_timeout_s`` after the renderer became free) only when it expects more
    requests: the callers of the previous batch that have nothing queued are likely to send again
    (closed-loop clients, gate retries), so it waits until as many requests as it expects are in,
    the batch is full, or the bound passes. That expectation is trusted for ``adaptive_window_s``
    after the previous batch ended; after a quiet spell a lone request never waits. Without
    ``adaptive_batch_wait`` every batch waits up to ``batch_wait_timeout_s`` after its first
    request arrived unless it fills up (``@serve.batch``'s fixed rule; benchmarks compare the two).
    """

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=4, ge=1, le=64)
    #: the longest a batch is held open for more requests (adaptive: counted from when the renderer is free)
    batch_wait_timeout_s: float = Field(default=0.05, ge=0, le=10)
    #: hold a batch open only when more requests are expected (False: always, like ``@serve.batch``)
    adaptive_batch_wait: bool = True
    #: how long after a batch ends its callers count as expected back (the evidence of load)
    adaptive_window_s: float = Field(default=1.0, ge=0, le=60)
    #: stamp a batch's images (score, watermark, PNG, C2PA) in a thread of their own while the next batch renders,
    #: when one is queued (False: the renderer waits for the stamps, as before)
    overlap_finishing: bool = True
    #: sizes (width, height) each replica renders once at start, before it takes traffic (None: the
    #: preset's default size); a size requests use but warm-up did not see pays its compile on first use
    warmup_sizes: list[tuple[int, int]] | None = None
    #: batch sizes warmed at every size (None: 1 and max_batch_size); shapes a compiled profile recompiles for
    warmup_batch_sizes: list[int] | None = None
    #: denoising steps of each warm-up render (2: the first step and a later one take every code path)
    warmup_steps: int = Field(default=2, ge=1, le=8)
    #: warm-up also loads the preset's identity methods (and renders with their example tensors, if any)
    warmup_identity: bool = True

    @model_validator(mode="after")
    def _warmup_batches_fit(self) -> RendererConfig:
        for size in self.warmup_batch_sizes or []:
            if not 1 <= size <= self.max_batch_size:
                raise ValueError(
                    f"warmup_batch_sizes holds {size}: each must be between 1 and max_batch_size "
                    f"({self.max_batch_size})"
                )
        for width, height in self.warmup_sizes or []:
            if width < 1 or height < 1:
                raise ValueError(f"warmup_sizes holds [{width}, {height}]: widths and heights are positive pixels")
        return self

    def warmup_batches(self) -> list[int]:
        """The batch sizes warm-up renders (deduplicated, ascending)."""
        return sorted(set(self.warmup_batch_sizes or [1, self.max_batch_size]))


class AppArgs(BaseModel):
    """``args`` of the application in serve.yaml (passed to ``imagegen.serve.app:build_app``)."""

    model_config = ConfigDict(extra="forbid")

    presets: list[str] = Field(default_factory=lambda: ["tiny-flux", "tiny-sdxl"], min_length=1)
    #: warm each renderer replica up (``RendererConfig.warmup_*``) before it takes traffic; False: ready at
    #: once, cold (development only: the first requests of each shape pay the warm-up)
    warmup: bool = True
    #: device for the renderers (None: IMAGEGEN_DEVICE / auto)
    device: str | None = None
    #: optimisation profile of every renderer (configs/models.yaml ``profiles``; None: IMAGEGEN_PROFILE, else each
    #: preset's own); ``imagegen serve --profile`` sets it (and drops ``profiles``)
    profile: str | None = None
    #: per preset, a profile instead of ``profile`` (e.g. ``{flux-dev: fastest, sdxl-base: fast}``)
    profiles: dict[str, str] = Field(default_factory=dict)
    #: migrate the database to this code's schema once, when the application deploys (before any replica
    #: opens it; ``imagegen.migrations.upgrade`` under its lock); False: an older schema is refused (`imagegen db
    #: upgrade` first)
    migrate: bool = False

    def profile_of(self, preset: str) -> str | None:
        """The profile a preset's renderers load with (None: IMAGEGEN_PROFILE, else the preset's own)."""
        return self.profiles.get(preset) or self.profile


#: resources Ray schedules by their own options (``num_cpus``, ``num_gpus``, ``memory``), never as custom ones
BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
#: ``max_ongoing_requests`` of a renderer deployment that does not set it (``RendererDeployment``'s decorator)
RENDERER_MAX_ONGOING_REQUESTS = 16


def app_deployments(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The deployment entries of the imagegen application in a Serve config dict (empty when there is none)."""
    app = next((a for a in data.get("applications") or [] if isinstance(a, dict) and a.get("name") == APP_NAME), {})
    return [d for d in app.get("deployments") or [] if isinstance(d, dict)]


def replica_bounds(deployment: dict[str, Any]) -> tuple[int, int]:
    """(replicas it starts with, most replicas it can have): ``num_replicas``, or the ``autoscaling_config`` bounds."""
    replicas = deployment.get("num_replicas", 1)
    scaling = deployment.get("autoscaling_config")
    if isinstance(replicas, int) and not scaling:
        return replicas, replicas
    scaling = scaling if isinstance(scaling, dict) else {}
    low = int(scaling.get("min_replicas", 1))
    return int(scaling.get("initial_replicas") or low), int(scaling.get("max_replicas", 1))


def custom_resources(deployment: dict[str, Any]) -> dict[str, float]:
    """The custom resources one replica of ``deployment`` asks for (``ray_actor_options.resources``)."""
    options = deployment.get("ray_actor_options") or {}
    resources = options.get("resources") if isinstance(options, dict) else None
    return dict(resources) if isinstance(resources, dict) else {}


def deployment_problem(deployment: dict[str, Any]) -> str | None:
    """One line naming what is wrong with a deployment's scaling or placement options; None when they make sense.

    Ray's own schema checks types; this checks what Ray accepts but cannot work here: a fixed replica count next to
    an autoscaling config, a renderer allowed to scale to zero (``/readyz`` needs a warm replica of every preset, and
    the first request after a quiet spell would pay the model load), a target load a replica can never reach (it
    would never scale up), and custom resources that are not positive amounts of a custom name.
    """
    name = str(deployment.get("name", "?"))
    scaling = deployment.get("autoscaling_config")
    replicas = deployment.get("num_replicas")
    if scaling is not None:
        if not isinstance(scaling, dict):
            return f"{name}: autoscaling_config is a mapping (min_replicas, max_replicas, target_ongoing_requests ...)"
        if isinstance(replicas, int):
            return (
                f"{name}: num_replicas ({replicas}) and autoscaling_config exclude each other: drop num_replicas "
                "(or set it to auto) to let the replicas follow the load"
            )
        numbers = {k: scaling.get(k, 1) for k in ("min_replicas", "max_replicas")}
        target = scaling.get("target_ongoing_requests")
        if target is not None:
            numbers["target_ongoing_requests"] = target
        for key, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f"{name}: autoscaling_config.{key} is {value!r}: a number"
        low, high = int(numbers["min_replicas"]), int(numbers["max_replicas"])
        if high < low:
            return f"{name}: autoscaling_config.max_replicas ({high}) is below min_replicas ({low})"
        if name.startswith("renderer-") and low < 1:
            return (
                f"{name}: autoscaling_config.min_replicas must be at least 1: a renderer scaled to zero makes /readyz "
                "fail and the next request wait for a model to load"
            )
        default_max = RENDERER_MAX_ONGOING_REQUESTS if name.startswith("renderer-") else INGRESS_MAX_ONGOING_REQUESTS
        most = deployment.get("max_ongoing_requests", default_max)
        if target is not None and isinstance(most, int) and target > most:
            return (
                f"{name}: autoscaling_config.target_ongoing_requests ({target}) is above max_ongoing_requests "
                f"({most}): a replica never holds that many, so the deployment would never scale up"
            )
    for resource, amount in custom_resources(deployment).items():
        if resource in BUILTIN_RESOURCES:
            option = {"CPU": "num_cpus", "GPU": "num_gpus"}.get(resource, resource)
            return f"{name}: ray_actor_options.resources.{resource}: set it with ray_actor_options.{option} instead"
        if isinstance(amount, bool) or not isinstance(amount, int | float) or amount <= 0:
            return (
                f"{name}: ray_actor_options.resources.{resource} is {amount!r}: a custom resource is a positive amount"
            )
    return None


def load_config(path: Path | str | None = None) -> dict[str, Any]:
    """serve.yaml as a dict (validated as Ray Serve's ServeDeploySchema by ``launcher``)."""
    path = Path(path or DEFAULT_CONFIG)
    with path.open() as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a Serve config is a mapping")
    return data
