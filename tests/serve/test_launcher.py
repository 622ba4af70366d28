"""The launcher sizes a local Ray so every replica of the config can be scheduled."""

from __future__ import annotations

import os

from imagegen.serve.launcher import cpus_requested, local_cpus, prepare_config


def test_the_shipped_config_fits_a_two_core_machine():
    data = prepare_config(None)
    assert cpus_requested(data) == 2.0  # two renderers at 1 CPU; the ingress reserves none
    assert local_cpus(data) == max(os.cpu_count() or 1, 2)


def test_a_config_asking_for_more_cpus_than_the_machine_still_gets_every_replica_scheduled():
    options = {"tiny-flux": {"num_replicas": 3, "ray_actor_options": {"num_cpus": 2}}}
    data = prepare_config(None, renderer_options=options)
    assert cpus_requested(data) == 2.0 + 5  # tiny-flux now 3 x 2 CPUs instead of 1
    assert local_cpus(data) >= 7 and local_cpus(data) >= (os.cpu_count() or 1)
