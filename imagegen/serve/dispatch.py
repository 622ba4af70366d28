"""The render service's way to the renderer deployments: one ``DeploymentHandle`` per preset.

``ServeRenderers.render`` streams one ``RenderCall`` to the preset's deployment (progress events,
then the image) and owns what only Ray knows about: a replica that died or became unreachable
is retried (``Dispatch.retries``), a full queue (``BackPressureError``) is either answered with
503 at once or waited out with jitter (``Dispatch.wait_on_backpressure``). The 503 says the renderers
are at capacity, never Ray's own text (queue sizes, its option names: ``renderer_overloaded``).

A render whose caller goes away (the HTTP client disconnected, the job was deleted: either way
the task awaiting ``render`` is cancelled) cancels its handle call explicitly, so the renderer
replica sees the cancellation and drops the request between denoising steps
(``imagegen.serve.renderer_deployment``); ``imagegen_renders_cancelled_total`` counts them.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

from imagegen.serve.actors import RenderCall, RenderedImage, RenderError
from imagegen.serve.config import IngressConfig
from imagegen.serve.errors import ApiError, too_busy
from imagegen.serve.jobs import RendererDied
from imagegen.serve.metrics import Metrics
from imagegen.serve.renderer_deployment import StepProgress
from imagegen.serve.service import Dispatch
from imagegen.serve.tenancy import unknown_character

log = logging.getLogger(__name__)


class ServeRenderers:
    """Renderer deployments by preset, reached through Serve handles (implements ``service.Renderers``)."""

    def __init__(self, handles: dict[str, Any], metrics: Metrics, config: Callable[[], IngressConfig]):
        self.handles = handles
        self.metrics = metrics
        self.config = config
        # the two ways to call a renderer, made once: ``handle.render_once`` builds a new handle at every
        # attribute access (~0.1 ms of the 0.2-0.3 ms a call takes to leave the ingress)
        self._unary = {preset: handle.options(method_name="render_once") for preset, handle in handles.items()}
        self._streams = {preset: h.options(method_name="render", stream=True) for preset, h in handles.items()}

    async def health(self, preset: str) -> dict[str, Any]:
        return await self.handles[preset].health.remote()

    async def render(
        self, preset: str, call: RenderCall, progress: Callable[[int, int], None] | None, dispatch: Dispatch
    ) -> RenderedImage:
        unary, streaming = self._unary[preset], self._streams[preset]
        attempt = 0
        gauge = self.metrics.queue_depth.labels(preset)
        while True:
            attempt += 1
            gauge.inc()
            # a stream only for callers that watch progress: a unary call costs the ingress less
            watched = progress is not None and call.progress
            stream = streaming.remote(call) if watched else unary.remote(call)
            try:
                if watched:
                    async for event in stream:
                        if isinstance(event, StepProgress):
                            progress(event.done, event.total)
                        else:
                            return _outcome(event, call)
                    raise RendererDied(f"the {preset} renderer ended the stream without a result")
                return _outcome(await stream, call)
            except asyncio.CancelledError:
                stream.cancel()  # best effort; the replica then stops this request at its next step
                self.metrics.renders_cancelled.labels(preset).inc()
                log.info("render %s on %s cancelled by its caller", call.request_id, preset)
                raise
            except BackPressureError as exc:
                self.metrics.rejected.labels("renderer_queue_full").inc()
                retry_after = self.config().retry_after_s
                if not dispatch.wait_on_backpressure:
                    raise renderer_overloaded(exc, retry_after, preset) from None
                await asyncio.sleep(retry_after * (0.5 + random.random()))
                attempt -= 1
            except (RayActorError, ReplicaUnavailableError, RendererDied) as exc:
                reason = f"the {preset} renderer replica died or became unreachable: {type(exc).__name__}"
                log.warning("%s (attempt %d)", reason, attempt)
                if attempt > dispatch.retries:
                    raise RendererDied(reason) from exc
                self.metrics.renderer_retries.labels(preset).inc()
            finally:
                gauge.dec()


def renderer_overloaded(exc: BackPressureError, retry_after_s: int, preset: str | None = None) -> ApiError:
    """A renderer's full queue (Ray's ``BackPressureError``) as the API's 503 ``renderer_overloaded`` + Retry-After.

    Ray's own message ("Request dropped due to backpressure (num_queued_requests=32, max_queued_requests=32).")
    describes the deployment's internals: it goes to the log, the caller is told to come back.
    """
    log.debug("the %s renderer's queue is full: %s", preset or "a", exc)
    which = f"the {preset} renderers" if preset else "the renderers"
    retry = max(1, int(retry_after_s))
    return too_busy("renderer_overloaded", f"{which} are at capacity; retry in {retry} s", retry, 503)


def _outcome(event: RenderedImage | RenderError, call: RenderCall) -> RenderedImage:
    """The image of a renderer's final event; its error as the API error it names.

    A character the renderer no longer finds (deleted while the render was in flight) gets the
    answer the ingress gives for a character the caller cannot see (``tenancy.unknown_character``),
    not the registry's message for local users, which names internal APIs.
    """
    if isinstance(event, RenderError):
        if event.code == "unknown_character" and call.request.character is not None:
            raise ApiError.from_imagegen(unknown_character(call.request.character))
        raise ApiError.from_code(event.code, event.message, event.field)
    return event
