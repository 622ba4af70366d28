"""The ingress deployment: one Ray Serve replica holding the state the HTTP routes use.

It is composed with one renderer deployment per preset through ``DeploymentHandle``s
(``imagegen.serve.app``). The replica owns: its config (``user_config``, reloadable), metrics,
the serve store (keys, jobs, audit), the registry, the key verifier, the render service (with
the synchronous-render policy), the per-key limits, the character service, a character's library
(references, report, recent renders), the evaluation runs and the job runner.
A config whose stream and render limits do not fit the deployment's ``max_ongoing_requests`` fails
the deploy (``reconfigure``), so ``serve run`` refuses it as ``imagegen serve`` does. The FastAPI app is
built per replica by ``__serve_build_asgi_app__`` with this object on ``app.state.ingress``;
the routes themselves live in ``imagegen.serve.http``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from ray import serve

from imagegen.errors import ConfigError
from imagegen.identity.registry import Registry
from imagegen.serve.auth import KeyVerifier
from imagegen.serve.characters import CharacterService
from imagegen.serve.config import INGRESS_MAX_ONGOING_REQUESTS, INGRESS_NAME, IngressConfig
from imagegen.serve.designs import DesignService
from imagegen.serve.dispatch import ServeRenderers
from imagegen.serve.errors import ApiError
from imagegen.serve.evalruns import EvalRunService
from imagegen.serve.jobs import JobRunner
from imagegen.serve.library import LibraryService
from imagegen.serve.limits import KeyLimiter
from imagegen.serve.metrics import Metrics
from imagegen.serve.provenance_check import ProvenanceService
from imagegen.serve.service import RenderService, SyncRenders
from imagegen.serve.store import ApiKey, ServeStore
from imagegen.settings import get_settings

log = logging.getLogger(__name__)


@serve.deployment(name=INGRESS_NAME, max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS)
@serve.ingress()
class Ingress:
    """The ingress replica's state: config, metrics, stores, services and the job runner."""

    def __init__(self, renderers: dict, presets: list[str]):
        self.cfg = IngressConfig()
        problem = self.cfg.capacity_problem(_max_ongoing_requests())  # reconfigure checks a user_config
        if problem is not None:
            raise ConfigError(problem)
        self.metrics = Metrics()
        self.store = ServeStore.open()
        self.registry = Registry.open()
        self.verifier = KeyVerifier(self.store, ttl_s=self.cfg.auth_cache_s)
        #: key refreshes running off the requests' path (a reference keeps each task alive until it ends)
        self._key_refreshes: set[asyncio.Task] = set()
        self.limits = KeyLimiter(lambda: self.cfg, on_refused=lambda code: self.metrics.rejected.labels(code).inc())
        self.service = RenderService(
            ServeRenderers(renderers, self.metrics, lambda: self.cfg),
            presets,
            self.registry,
            self.store,
            self.metrics,
            lambda: self.cfg,
            gate_backend=get_settings().face_backend,
        )
        self.sync = SyncRenders(self.service)
        self.characters = CharacterService(self.registry, self.store, self.service.db, self.service.audit)
        self.designs = DesignService(
            self.registry,
            self.store,
            self.service.renderers,
            presets,
            self.metrics,
            lambda: self.cfg,
            wake_jobs=lambda: self.runner.wake(),
            cancel_local=lambda job_id: self.runner.cancel_local(job_id),
            settings=self.service.settings,
        )
        self.provenance = ProvenanceService(self.store, self.service.audit)
        self.library = LibraryService(
            self.registry, self.store, self.service.db, get_settings().face_backend, self.service.audit
        )
        self.evalruns = EvalRunService(
            self.registry,
            self.store,
            self.service.renderers,
            presets,
            self.service.db,
            self.service.settings,
            get_settings().face_backend,
        )
        #: set (and replaced by a fresh one) when a job of this replica has a new event; streams wait on it.
        #: An Event, not a Condition: no lock to contend for, so 100+ streams cancelled at once (clients
        #: gone) cannot leave a lock held and every other stream of the replica stuck behind it
        self.job_signal = asyncio.Event()
        self.runner = JobRunner(self.store, self.run_job, lambda: self.cfg, self.service.db_pool, self.notify_job)
        self.runner.start()
        self.designs.start()
        if self.service.settings.allow_unverified_age:
            log.warning(
                "DEVELOPMENT ONLY: IMAGEGEN_ALLOW_UNVERIFIED_AGE is on: characters whose apparent age was "
                "never verified render (every image's provenance says so); install an age estimator instead"
            )

    def __serve_build_asgi_app__(self) -> FastAPI:
        from imagegen.serve.http.app import build_api

        return build_api(self)

    def reconfigure(self, user_config: dict | None) -> None:
        cfg = IngressConfig.model_validate(user_config or {})
        problem = cfg.capacity_problem(_max_ongoing_requests())
        if problem is not None:
            raise ConfigError(problem)
        self.cfg = cfg
        self.verifier.ttl_s = self.cfg.auth_cache_s

    def close(self) -> None:
        """Write the audit rows still queued (a graceful stop loses none) and stop the background loops."""
        with contextlib.suppress(Exception):
            self.service.audit.close()
        with contextlib.suppress(Exception):
            self.runner.shutdown()
            self.designs.shutdown()
            self.provenance.shutdown()

    def __del__(self) -> None:
        self.close()

    async def run_job(self, job: Any, emit: Any) -> dict:
        """The job runner's executor: a design's step (``kind: design``) or a render job.

        Its images count against its key's images in the renderers (``max_images_in_flight_per_key``, shared with
        the key's sync renders): a job waits for room before it dispatches any, so one key's jobs cannot fill a
        renderer's queue that every key shares.
        """
        key = await self.service.db(self.store.get_key, job.key_id)
        images = int((job.progress or {}).get("images_total") or 1)
        # a revoked or deleted key waits for nothing: the job fails at once (403 key_revoked)
        room: Any = contextlib.nullcontext()
        if key is not None and key.active:
            room = self.limits.images_when_free(key, images)
        async with room:
            if job.kind == "design":
                return await self.designs.run_job(job, emit)
            return await self.service.run_job(job, emit)

    async def authenticate(self, headers: dict[str, str]) -> ApiKey:
        """The API key of a request's headers (``Authorization: Bearer`` or ``X-Api-Key``); 401 otherwise."""
        header = headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        token = token or headers.get("x-api-key", "").strip()
        challenge = {"WWW-Authenticate": "Bearer"}
        if not token:
            raise ApiError(
                401,
                "unauthorized",
                "this route needs an API key: send 'Authorization: Bearer <key>' "
                "(create one with `imagegen keys create`)",
                headers=challenge,
            )
        known, key = self.verifier.cached(token)
        if not known:
            key = await self.service.db(self.verifier.verify, token)
        elif key is not None and self.verifier.claim_refresh(token):
            self._refresh_key(token)
        if key is None:
            raise ApiError(401, "unauthorized", "the API key is unknown, revoked or malformed", headers=challenge)
        return key

    def _refresh_key(self, token: str) -> None:
        """Re-read a key in use in the background; the request that claimed it goes on with the cached answer."""
        task = asyncio.get_running_loop().create_task(self.service.db(self.verifier.refresh, token))
        self._key_refreshes.add(task)
        task.add_done_callback(self._key_refreshed)

    def _key_refreshed(self, task: asyncio.Task) -> None:
        self._key_refreshes.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the cached answer expires as it would have
            log.warning("refreshing an API key from the database failed: %s", task.exception())

    def notify_job(self, job_id: str) -> None:
        """Wake the SSE streams of this replica (a job of theirs may have a new event).

        Only on the replica's event loop (elsewhere a no-op: the streams look every 0.25 s anyway).
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        signal, self.job_signal = self.job_signal, asyncio.Event()
        signal.set()

    async def metrics_text(self) -> bytes:
        """The Prometheus text of this replica, job counts refreshed from the database."""
        counts: dict[str, Any] = await self.service.db(self.store.job_counts)
        for status in ("queued", "running", "done", "failed", "cancelled"):
            self.metrics.jobs.labels(status).set(counts.get(status, 0))
        self.metrics.inflight.set(self.sync.inflight)
        self.metrics.audit_pending.set(self.service.audit.pending)
        return self.metrics.render()


@contextlib.contextmanager
def in_one_process(renderers: dict, presets: list[str]) -> Iterator[Any]:
    """The ingress replica's state built outside Serve, on the running event loop, closed on leaving: for a bench or
    a test that drives its app in one process (``renderers``: objects that answer as the deployment handles do)."""
    replica_class = Ingress.func_or_class.__mro__[1]  # the class under @serve.ingress's ASGI wrapper
    ingress = object.__new__(replica_class)
    replica_class.__init__(ingress, renderers, presets)
    try:
        yield ingress
    finally:
        ingress.close()


def _max_ongoing_requests() -> int:
    """This replica's deployment ``max_ongoing_requests`` (the decorator's default outside a replica)."""
    try:
        return serve.get_replica_context()._deployment_config.max_ongoing_requests
    except Exception:  # noqa: BLE001 - not in a Serve replica (a test building the app by hand)
        return INGRESS_MAX_ONGOING_REQUESTS
