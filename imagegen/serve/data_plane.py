"""Ray Serve's throughput-optimised data plane: the environment every Ray process of the service starts with.

Ray Serve (>= 2.55) has a documented mode, ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, in which a deployment calls
another over a direct gRPC connection between the replicas instead of a Ray actor task (the ingress's call to
its renderer replica and the image coming back), user code runs on the replica's own event loop (one thread
hop less a call), the garbage collector is frozen once a replica has started, and request logs are buffered.
Measured on the 2-core development machine (``bench/serve_load.py``, docs/benchmarks.md), the ingress's call to
its renderer and back took 3.4-3.7 ms of Ray's instead of 5.0-5.2 ms; 8 clients' throughput, bound by the renders
there, did not change.

The mode also turns on Serve's *direct ingress* (each ingress replica opening HTTP and gRPC ports of its own,
for an HAProxy in front of them); imagegen turns that part off: requests reach the ingress through Serve's
proxy only, as before, and no replica listens on a port of its own. It keeps the replicas' logs on stderr too
(see :data:`ENVIRONMENT`). The gRPC servers between replicas take
Ray's token authentication (every Ray imagegen starts has it: ``launcher.enable_ray_token_auth``), so a
renderer replica answers only the cluster's own processes.

These are process environment variables read by every Ray process when it starts (the controller, the proxy,
the replicas), so they are set before ``ray.init`` for a Ray that ``imagegen serve`` starts
(:func:`apply`), and on every node's container in ``deploy/rayservice.yaml``; a cluster started by hand
(``ray start``) needs them in its nodes' environment. A deployer's own value always wins:
``RAY_SERVE_THROUGHPUT_OPTIMIZED=0`` keeps Ray's default data plane.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

#: the environment of a Ray that serves imagegen (a value the deployer set is kept)
ENVIRONMENT = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    # the mode would also turn replicas' stderr and print() into INFO records of Serve's own log files, which the
    # WARNING level of configs/serve.yaml drops: imagegen's warnings would vanish from `imagegen serve`'s console
    # and the workers' logs. Logging at WARNING costs a request nothing, so the replicas keep logging to stderr.
    "RAY_SERVE_LOG_TO_STDERR": "1",
}


def apply(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :data:`ENVIRONMENT` in ``environ`` (default: this process's, which the Ray it starts inherits) where the
    deployer has not set the variable; returns the values in effect."""
    environ = os.environ if environ is None else environ
    for name, value in ENVIRONMENT.items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in ENVIRONMENT}


def status() -> dict[str, Any]:
    """The data plane this process's Ray Serve uses (its settings as Ray read them when it was imported), for
    ``/readyz``: whether the throughput-optimised mode is on and which of its parts are in effect."""
    from ray.serve._private import constants

    def flag(name: str) -> bool | None:
        value = getattr(constants, name, None)
        return None if value is None else bool(value)

    separate_thread = flag("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD")
    return {
        "throughput_optimized": flag("RAY_SERVE_THROUGHPUT_OPTIMIZED"),
        "grpc_between_deployments": flag("RAY_SERVE_USE_GRPC_BY_DEFAULT"),
        "user_code_on_replica_loop": None if separate_thread is None else not separate_thread,
        "direct_ingress": flag("RAY_SERVE_ENABLE_DIRECT_INGRESS"),
        "logs_to_stderr": flag("RAY_SERVE_LOG_TO_STDERR"),
    }
