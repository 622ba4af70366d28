"""Cancellation inside one pipeline call: a cancelled row leaves the batch at the next denoising step.

A renderer batches requests from callers that come and go: an HTTP client hangs up, a job is
deleted. Each request may carry a cancellation flag (a no-argument callable, e.g.
``threading.Event().is_set``) that :class:`CancelWatch` reads once per row after every denoising
step (the pipeline's ``callback_on_step_end``). Then:

- every row cancelled: the call stops there (:class:`CallCancelled` is raised out of the step
  callback, so the remaining steps and the VAE decode never run) and the renderer is free;
- some rows cancelled: :func:`denoise_active_rows` hooks the denoiser (FLUX transformer, SDXL
  UNet) so it runs on the remaining rows only and scatters its output back to the full batch
  (zeros for the rows that left: the scheduler steps them as no-ops and their pixels are dropped).
  The family module says which inputs are per row (``select_rows``, IP-Adapter image embeddings
  included: :func:`take_images`); a call it cannot slice soundly keeps every row.
- identity conditioning keeps per-row state of its own inside the denoiser (id tokens, weights,
  start steps: ``imagegen.identity.steps``). It leaves with the rows: the first denoiser call
  sliced to a new set of rows first narrows the conditioning to them (``narrow``, the batch's
  ``BatchConditioning.select_rows``), so both always see the same rows. Conditioning that cannot
  narrow keeps its batch whole (``BatchConditioning.rows_can_leave``).

Rows that keep going compute what they computed in the full batch: each row's denoising depends
only on its own inputs, so leaving a batch is like landing in a smaller one (equal up to float
rounding of batched matmuls, the same guarantee batching already has).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

#: a request's cancellation flag: true once its caller no longer wants the image
Cancelled = Callable[[], bool]

#: ``select_rows(args, kwargs, index)`` of a family: the denoiser's inputs for the rows in
#: ``index`` only, or None when the call cannot be sliced soundly
SelectRows = Callable[[tuple, dict[str, Any], torch.Tensor], tuple[tuple, dict[str, Any]] | None]
#: ``denoiser_rows(args, kwargs)`` of a family: how many rows one denoiser call has
DenoiserRows = Callable[[tuple, dict[str, Any]], int]
#: ``narrow(active)``: the identity conditioning keeps only the samples ``active`` (indices into the batch)
Narrow = Callable[[list[int]], None]


class CallCancelled(Exception):
    """Raised out of a step callback: every row of the pipeline call was cancelled; stop now."""


class CancelWatch:
    """The cancellation flags of one pipeline call's rows, read once per row after every step.

    ``left_at[i]`` is the number of denoising steps row ``i`` took part in before it was seen
    cancelled (None while it is still in the batch); ``active`` lists the rows still in.
    """

    def __init__(self, flags: Sequence[Cancelled | None] | None, size: int):
        self.size = size
        given = list(flags) if flags is not None else []
        if given and len(given) != size:
            raise ValueError(f"{len(given)} cancellation flags for a batch of {size}")
        self._flags = [(i, f) for i, f in enumerate(given) if f is not None]
        self.left_at: list[int | None] = [None] * size
        self.active: list[int] = list(range(size))
        self._index: dict[tuple[int, torch.device], torch.Tensor | None] = {}

    @property
    def watching(self) -> bool:
        """Some row has a flag (without flags every check is a no-op)."""
        return bool(self._flags)

    @property
    def all_in(self) -> bool:
        return len(self.active) == self.size

    def poll(self, steps_done: int) -> bool:
        """Read the flags of the rows still in after ``steps_done`` steps; True when no row is left."""
        if not self._flags:
            return False
        left = [i for i, flag in self._flags if self.left_at[i] is None and flag()]
        if left:
            for i in left:
                self.left_at[i] = steps_done
            self.active = [i for i in self.active if self.left_at[i] is None]
            self._flags = [(i, f) for i, f in self._flags if self.left_at[i] is None]
            self._index.clear()
        return not self.active

    def cancelled(self, row: int) -> bool:
        return self.left_at[row] is not None

    def index_for(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """Indices of the active rows in a denoiser call of ``rows`` rows (the ``B`` samples, or a CFG
        batch ``[negative, positive]`` of ``2B``); None for any other layout (then every row runs)."""
        key = (rows, device)
        if key not in self._index:
            if rows == self.size:
                index: list[int] | None = self.active
            elif rows == 2 * self.size:
                index = self.active + [self.size + i for i in self.active]
            else:
                index = None
            self._index[key] = None if index is None else torch.tensor(index, dtype=torch.long, device=device)
        return self._index[key]


@contextmanager
def denoise_active_rows(
    denoiser: torch.nn.Module,
    watch: CancelWatch,
    rows_of: DenoiserRows,
    select: SelectRows,
    narrow: Narrow | None = None,
) -> Iterator[None]:
    """Inside the block, ``denoiser`` runs on ``watch.active`` rows only and returns a full-batch output.

    ``narrow(active)`` is called before the first call sliced to a new set of rows (the identity
    conditioning's ``select_rows``). The slicing hook runs before any other pre-hook of ``denoiser``
    (PuLID-FLUX reads the call's rows in one), so they all see the sliced call. While every row is
    in, the hooks do nothing but one length comparison per denoiser call.
    """
    pending: list[tuple[int, torch.Tensor] | None] = [None]
    narrowed: list[list[int] | None] = [None]

    def before(module, args, kwargs):
        pending[0] = None
        if watch.all_in or kwargs.get("return_dict", True) is not False:
            return None
        rows = rows_of(args, kwargs)
        index = watch.index_for(rows, _device_of(args, kwargs))
        selected = None if index is None else select(args, kwargs, index)
        if selected is None:
            if narrowed[0] is not None:  # the conditioning holds fewer rows than this call would run
                raise RuntimeError(
                    f"a denoiser call on {rows} rows cannot be sliced to the {len(watch.active)} rows still in, "
                    "but the identity conditioning already left the others"
                )
            return None
        if narrow is not None and narrowed[0] != watch.active:
            narrow(list(watch.active))
            narrowed[0] = list(watch.active)
        pending[0] = (rows, index)
        return selected

    def after(module, args, kwargs, output):
        sliced, pending[0] = pending[0], None
        if sliced is None:
            return None
        rows, index = sliced
        first = output[0]
        full = first.new_zeros((rows, *first.shape[1:]))
        full.index_copy_(0, index, first)
        return (full, *output[1:])

    handles = [
        denoiser.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
        denoiser.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def take(value: Any, index: torch.Tensor, rows: int) -> Any:
    """``value``'s rows in ``index`` when it is a per-row tensor (first dimension ``rows``), else ``value``."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows:
        return value.index_select(0, index)
    return value


def take_images(value: Any, index: torch.Tensor, rows: int) -> torch.Tensor | None:
    """Per-sample IP-Adapter image embeddings for the rows in ``index``; None when ``value`` is not laid out so.

    imagegen hands a batch of ``B`` samples to the pipeline as ``B`` images, which the pipeline repeats
    for every row of the denoiser call: ``[rows, B, ...]`` with ``rows`` = ``B``, or ``2B`` for a CFG
    batch ``[negative, positive]``; row ``r`` reads image ``r mod B``
    (``imagegen.identity.ipadapter.adapter.PerSampleProjection``). The rows in ``index`` (the active
    samples, in both halves for CFG) keep their own rows and only the active samples' images, so row
    ``r`` of the sliced call still reads its own sample's image.
    """
    if not isinstance(value, torch.Tensor) or value.ndim < 2 or value.shape[0] != rows:
        return None
    images = int(value.shape[1])
    if rows not in (images, 2 * images):
        return None
    samples = index[: index.numel() * images // rows]  # the active samples: ``index`` minus its CFG half
    return value.index_select(0, index).index_select(1, samples)


def _device_of(args: tuple, kwargs: dict[str, Any]) -> torch.device:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def empty(value: Any) -> bool:
    """An input that carries nothing: None, False, or an empty dict (no per-row data hides in it)."""
    return value is None or value is False or (isinstance(value, dict) and not value)
