"""The same RendererActor offline: a Ray actor pool rendering batches (what suites and bulk jobs use)."""

from __future__ import annotations

import io

import ray
from PIL import Image

from imagegen import provenance
from imagegen.pipelines.types import RenderRequest
from imagegen.serve.actors import RenderCall, RenderedImage, RenderError, actor_pool


def test_actor_pool_renders_batches(service):
    assert ray.is_initialized()
    pool = actor_pool("tiny-sdxl", size=1, num_cpus=0.5)
    batches = [
        [RenderRequest(prompt="a cafe", seed=1), RenderRequest(prompt="a park", seed=2)],
        [RenderCall(request=RenderRequest(prompt="a street", seed=3, steps=2), metadata={"suite": "x"})],
    ]
    results = list(pool.map(lambda actor, batch: actor.render.remote(batch), batches))
    assert [len(r) for r in results] == [2, 1]
    first: RenderedImage = results[0][0]
    assert first.metadata["seed"] == 1 and first.batch["size"] == 2
    assert Image.open(io.BytesIO(first.png)).size == (64, 64)
    # finished in the actor: provenance stamped into the one PNG, with the call's own metadata
    assert first.provenance is not None and first.provenance["image_id"] == first.image_id
    assert provenance.read_metadata(Image.open(io.BytesIO(results[1][0].png)))["record"]["suite"] == "x"
    # render_isolated: one bad request is its own error, the others render
    actor = pool._idle_actors[0]  # noqa: SLF001 - the pool has no public accessor
    requests = [RenderRequest(prompt="fine", seed=4), RenderRequest(prompt="too big", width=4096)]
    outcomes = ray.get(actor.render_isolated.remote(requests))
    assert isinstance(outcomes[0], RenderedImage) and outcomes[0].png
    assert isinstance(outcomes[1], RenderError) and outcomes[1].field == "width"
    health = ray.get(actor.health.remote())
    assert health["ok"] and health["preset"] == "tiny-sdxl" and health["failed"] == 1
    ray.kill(actor)
