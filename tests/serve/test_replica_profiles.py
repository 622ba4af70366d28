"""A renderer replica under a compiling profile, in-process (the deployment class itself, its own threads).

The replica loads its pipeline on one thread, warms up on its executor thread and renders on its pipeline thread.
dynamo's settings are per thread, so the recompile limit a profile raises where the pipeline loads did not hold where
it rendered: under ``fast`` (fullgraph) tiny-sdxl's warm-up of batches 1 and 4 with its identity methods failed at
dynamo's default 8 variants and the replica never became ready (``imagegen serve --profile fast`` failed to deploy).
"""

from __future__ import annotations

import asyncio

from imagegen.pipelines.assets import prepare
from imagegen.pipelines.presets import get_preset
from imagegen.serve.actors import RenderedImage
from imagegen.serve.renderer_deployment import RendererDeployment
from tests.serve.test_batching import call, outcome


def test_a_replica_under_fast_warms_up_and_renders_on_its_own_threads(isolated_home):
    prepare(get_preset("tiny-sdxl"))
    loop = asyncio.new_event_loop()
    replica = RendererDeployment.func_or_class("tiny-sdxl", warmup=True, device="cpu", profile="fast")
    try:
        loop.run_until_complete(
            replica.reconfigure({"max_batch_size": 4, "warmup_batch_sizes": [1, 4], "batch_wait_timeout_s": 0.05})
        )
        health = replica.health()
        assert health["ready"] and health["warmup_error"] is None
        [warmup] = health["warmups"]
        assert warmup["profile"] == "fast" and warmup["compile"]["stats"]["unique_graphs"] >= 1
        assert warmup["compile_cache"]["save"] == "saved"  # a fresh home's object store had no artifact
        assert warmup["compile_phases"]["tracing"] > 0
        image = loop.run_until_complete(outcome(replica, call("after warm-up", width=64)))
        assert isinstance(image, RenderedImage)
    finally:
        loop.run_until_complete(replica.batcher.close())
        loop.close()
