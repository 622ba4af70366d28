"""Render a suite's grid through a Ray ``ActorPool`` of :class:`~imagegen.serve.actors.RendererActor`.

The actor class is the one Serve replicas use; here it is wrapped with ``ray.remote`` and pooled,
one pool per preset (an actor hosts one preset). Each actor loads its pipeline once; batches of
requests go to whichever actor is free, as the same typed ``RenderCall`` the service sends: the
actor watermarks, stamps provenance plus the cell's ``eval`` record, and encodes each PNG once;
the bytes are written as they come under the cell's content-hash name, so a cell whose file
exists is never rendered again.

A cell the renderer refuses (an ``ImagegenError``: a method the preset does not support, a
character that is not approved, identity weights that are not installed ...) fails the run, or
with ``on_unsupported: skip`` is reported as skipped while the other cells render: batches then
go through ``RendererActor.render_isolated``, which validates every request on its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagegen.errors import ImagegenError
from imagegen.eval.suite import Cell
from imagegen.files import atomic_write

log = logging.getLogger(__name__)

#: progress callback: (phase, done, total)
Progress = Callable[[str, int, int], None]


class RenderFailedError(ImagegenError):
    code = "render_failed"


@dataclass
class RenderOutcome:
    """What happened to every cell: rendered now, found in the cache, unusable, or skipped."""

    rendered: list[Cell] = field(default_factory=list)
    cached: list[Cell] = field(default_factory=list)
    #: cell key -> "nan" / "black"
    problems: dict[str, str] = field(default_factory=dict)
    #: cell key -> why it was not rendered
    skipped: dict[str, str] = field(default_factory=dict)
    #: preset -> actor health after the run
    actors: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def imagegen_env() -> dict[str, str]:
    """The ``IMAGEGEN_*`` variables of this process, so actors see the same home, models, registry."""
    return {k: v for k, v in os.environ.items() if k.startswith("IMAGEGEN_")}


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> bool:
    """Start (or join) Ray if this process has not; True when this call started it (or joined: it disconnects).

    Joining a cluster (``imagegen eval run --address``) uses the cluster's token the way ``imagegen serve
    --address`` does (``enable_ray_token_auth``); the actors then run on whichever nodes have free CPUs (and GPUs,
    ``gpus_per_worker``), and send their PNGs back to this process, which writes the run directory.

    Without an address it starts a Ray of its own (``address="local"``): a plain ``ray.init()`` would follow
    the address a crashed or killed Ray left in ``/tmp/ray/ray_current_cluster`` and fail on that.
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        from imagegen.serve.launcher import check_reachable, enable_ray_token_auth

        check_reachable(address)
        enable_ray_token_auth(joining=True)
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False
        )
    return True


def _unwrap(exc: BaseException) -> BaseException:
    """The exception an actor raised, out of Ray's wrappers (RayTaskError, ActorDiedError)."""
    for _ in range(5):
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) and exc.args and isinstance(exc.args[0], BaseException):
            cause = exc.args[0]
        if not isinstance(cause, BaseException) or cause is exc:
            return exc
        exc = cause
    return exc


def start_actors(preset_name: str, count: int, options: dict[str, Any], profile: str | None = None) -> list[Any]:
    """``count`` RendererActors for a preset, all loaded and ready, with the optimisation ``profile`` (None: the
    actors' ``IMAGEGEN_PROFILE``, which they inherit from this process, else the preset's own).

    Model files are checked (and a tiny preset's stand-ins built) once here in the driver, before any
    actor starts: actors never race to write them, and never download (``imagegen models pull`` does).
    """
    import ray

    from imagegen.pipelines.assets import prepare
    from imagegen.pipelines.presets import get_preset
    from imagegen.serve.actors import remote_renderer_class

    remote = remote_renderer_class(**options)
    preset = get_preset(preset_name)
    actors: list[Any] = []
    try:
        prepare(preset)
        actors += [remote.remote(preset_name, warmup=False, profile=profile) for _ in range(count)]
        ray.get([a.health.remote() for a in actors])
    except Exception as exc:  # noqa: BLE001 - an actor that died in __init__ arrives wrapped
        for actor in actors:
            ray.kill(actor)
        cause = _unwrap(exc)
        if isinstance(cause, ImagegenError):
            raise ImagegenError(
                f"cannot start a renderer for preset {preset_name}: {cause}", field=cause.field
            ) from None
        raise RenderFailedError(f"cannot start a renderer for preset {preset_name}: {cause!r}") from exc
    return actors


def render_cells(
    cells: Sequence[Cell],
    run_dir: Path,
    *,
    workers: int = 2,
    batch_size: int = 4,
    gpus_per_worker: float = 0.0,
    on_unsupported: str = "fail",
    extra_metadata: dict[str, Any] | None = None,
    progress: Progress | None = None,
    profile: str | None = None,
) -> RenderOutcome:
    """Render every cell whose PNG is not in ``run_dir`` yet; Ray must be initialised.

    ``profile``: the actors' optimisation profile (None: ``IMAGEGEN_PROFILE``, else each preset's own)."""
    import ray
    from ray.util import ActorPool

    outcome = RenderOutcome()
    todo: dict[str, list[Cell]] = {}
    for cell in cells:
        if (run_dir / cell.file).is_file():
            outcome.cached.append(cell)
        else:
            todo.setdefault(cell.preset, []).append(cell)
    total = sum(len(v) for v in todo.values())
    done = 0
    if progress:
        progress("render", 0, total)
    if not total:
        return outcome

    free_cpus = int(ray.cluster_resources().get("CPU", 1)) or 1
    for preset, pending in todo.items():
        count = max(1, min(workers, free_cpus, -(-len(pending) // batch_size)))
        options: dict[str, Any] = {
            "num_cpus": 1,
            "num_gpus": gpus_per_worker,
            "runtime_env": {"env_vars": imagegen_env()},
        }
        actors = start_actors(preset, count, options, profile=profile)
        try:
            pool = ActorPool(actors)
            # a batch never mixes identity groups: one refused request must not sink the others
            groups: dict[tuple, list[Cell]] = {}
            for cell in pending:
                groups.setdefault((cell.method, cell.weight), []).append(cell)
            batches = [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
            skip = on_unsupported == "skip"
            for batch in batches:
                calls = [_call(cell, extra_metadata or {}) for cell in batch]
                if skip:  # each request on its own: a refused one becomes a RenderError, the rest render
                    pool.submit(lambda actor, c: actor.render_isolated.remote(c), calls)
                else:  # the first refused request fails the batch (and the run)
                    pool.submit(lambda actor, c: actor.render.remote(c), calls)
            for batch in batches:
                try:
                    images = pool.get_next()
                except Exception as exc:  # noqa: BLE001 - a RayTaskError wraps the actor's exception
                    cause = _unwrap(exc)
                    if isinstance(cause, ImagegenError) and skip:
                        for cell in batch:
                            outcome.skipped[cell.key] = f"{preset} cannot render it: {cause}"
                    elif isinstance(cause, ImagegenError):
                        raise ImagegenError(
                            f"preset {preset}, method {batch[0].method}: {cause} (set `on_unsupported: skip` in "
                            "the suite to report such cells as skipped instead of failing)",
                            field=cause.field,
                        ) from None
                    else:
                        raise RenderFailedError(f"rendering with preset {preset} failed: {cause!r}") from exc
                else:
                    for cell, image in zip(batch, images, strict=True):
                        _store(run_dir, cell, image, outcome)
                done += len(batch)
                if progress:
                    progress("render", done, total)
            outcome.actors[preset] = ray.get([a.health.remote() for a in actors])
        finally:
            for actor in actors:
                ray.kill(actor)
    return outcome


def _call(cell: Cell, extra: dict[str, Any]) -> Any:
    from imagegen.pipelines.types import RenderRequest
    from imagegen.serve.actors import RenderCall

    record = {**extra, "key": cell.key, "character": cell.character, "tags": cell.tags}
    return RenderCall(request=RenderRequest(**cell.request), request_id=f"eval-{cell.key}", metadata={"eval": record})


def _store(run_dir: Path, cell: Cell, image: Any, outcome: RenderOutcome) -> None:
    from imagegen.serve.actors import RenderError

    if isinstance(image, RenderError):  # from render_isolated: this request was refused, the others rendered
        outcome.skipped[cell.key] = f"{cell.preset} cannot render it: {image.message}"
        return
    if image.png is None:
        outcome.problems[cell.key] = image.problem or "unusable"
        return
    atomic_write(run_dir / cell.file, lambda tmp: Path(tmp).write_bytes(image.png))
    outcome.rendered.append(cell)
