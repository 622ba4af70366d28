"""The launcher sizes a local Ray so the shipped config can always be scheduled."""

from __future__ import annotations

import os

from imagegen.serve.launcher import cpus_requested, local_cpus, prepare_config


def test_local_ray_gets_enough_cpus_for_every_replica_of_the_shipped_config():
    data = prepare_config(None)
    requested = cpus_requested(data)
    assert requested >= 2.5  # two renderers at 1 CPU and the ingress at 0.5, as configs/serve.yaml says
    assert local_cpus(data) >= requested and local_cpus(data) >= (os.cpu_count() or 1)


def test_more_replicas_ask_for_more_cpus():
    data = prepare_config(
        None, renderer_options={"tiny-flux": {"num_replicas": 3, "ray_actor_options": {"num_cpus": 2}}}
    )
    assert cpus_requested(data) == cpus_requested(prepare_config(None)) + 5
