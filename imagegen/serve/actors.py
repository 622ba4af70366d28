"""The one class that hosts a ``Renderer`` in a long-lived Ray process.

The same class serves online (wrapped as a Ray Serve replica) and offline (``ray.remote`` actors
in an ``ActorPool`` for suites and bulk jobs): it loads and warms up its preset once, reports its
health, and renders batches. Results cross process boundaries as PNG bytes plus metadata, never
as live objects.
"""

from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from imagegen.pipelines.renderer import Renderer
from imagegen.pipelines.types import RenderRequest, RenderResult

log = logging.getLogger(__name__)


@dataclass
class RenderedImage:
    """A render result that can be pickled across Ray: PNG bytes, not a PIL object."""

    png: bytes | None
    metadata: dict[str, Any]
    problem: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_result(cls, result: RenderResult) -> RenderedImage:
        png = None
        if result.image is not None:
            buffer = io.BytesIO()
            result.image.save(buffer, format="PNG")
            png = buffer.getvalue()
        return cls(png=png, metadata=result.metadata(), problem=result.problem, timings=dict(result.timings))


class RendererActor:
    """Hosts one preset's ``Renderer``: load and warm up once, then render batches on demand."""

    def __init__(self, preset: str, warmup: bool = True, device: str | None = None):
        started = time.perf_counter()
        self.renderer = Renderer(preset, device=device)
        if warmup:
            d = self.renderer.preset.defaults
            self.renderer.render([RenderRequest(prompt="warm-up", seed=0, width=d.width, height=d.height, steps=1)])
        self.ready_seconds = time.perf_counter() - started
        self.rendered = 0
        self.batches = 0
        log.info("renderer actor for %s ready in %.2fs (pid %d)", preset, self.ready_seconds, os.getpid())

    def render(self, requests: list[RenderRequest | dict]) -> list[RenderedImage]:
        """Render a batch; requests may arrive as dicts (JSON) or ``RenderRequest`` objects."""
        parsed = [r if isinstance(r, RenderRequest) else RenderRequest(**r) for r in requests]
        results = self.renderer.render(parsed)
        self.rendered += len(results)
        self.batches += 1
        return [RenderedImage.from_result(r) for r in results]

    def health(self) -> dict[str, Any]:
        """What a health check needs: alive, which preset, where, how busy it has been."""
        return {
            "ok": True,
            "preset": self.renderer.preset.name,
            "device": str(self.renderer.device),
            "pid": os.getpid(),
            "ready_seconds": round(self.ready_seconds, 3),
            "rendered": self.rendered,
            "batches": self.batches,
        }
