"""Per-sample identity weights and the denoising-step gate, shared by the PuLID (FLUX, SDXL) and IP-Adapter states.

The hooks that apply an identity run once per layer per denoising step. On a GPU, anything they do with host
values there stalls the whole loop: a tensor made from Python values or a CPU tensor moved to the GPU is a
blocking host→device copy, and a Python branch on a device tensor (``bool(t.any())``, ``.item()``, ``.tolist()``,
``.nonzero()``) waits for every queued kernel. So none of that happens in the loop:

- what a step needs depends on the weights and start steps (host values given when the state is built) and on the
  step, a Python int advanced by the pipeline's step callback. The step only matters through which samples have
  started, i.e. through the *phase*: how many of the distinct start steps it has reached. :class:`RowGate` works
  out every phase on the host up front (which rows take identity, their gated values, their row indices);
- its tables go to a device once per ``(device, dtype)`` (on first use, then cached: one copy per pipeline call),
  and a step takes ``table[phase]``, a view: no copy, no kernel, no sync;
- every "skip this work?" decision is made from the host-side values (:attr:`Phase.rows`), never from a tensor.

A sample whose caller goes away leaves its batch between two steps (``imagegen.pipelines.cancel``): the denoiser
then runs on the remaining rows only, and :meth:`StepGatedState.select_rows` narrows the state to them, so the
hooks see the same rows as the model. That rebuilds the gates and drops the device copies, a few small copies once
per departure, never per layer or step.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch


def pick(tensor: torch.Tensor | None, positions: Sequence[int]) -> torch.Tensor | None:
    """The rows ``positions`` of a per-sample tensor (first dimension), on its own device; None stays None."""
    if tensor is None:
        return None
    return tensor.index_select(0, torch.tensor(list(positions), dtype=torch.long, device=tensor.device))


def per_sample(value, batch: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``value`` (a number, a sequence or a tensor) as a CPU tensor of one value per sample ``[batch]``.

    A single value (a number, or a sequence or tensor of one element) is repeated for every sample.
    """
    given = torch.as_tensor(value, dtype=dtype).detach()
    tensor = given.flatten().cpu()
    if tensor.numel() == 1:
        return tensor.expand(batch).clone()
    if tensor.shape != (batch,):
        raise ValueError(f"{name} must be a number or have one value per sample ({batch}), got {tuple(given.shape)}")
    return tensor


class Phase:
    """The rows of a model call that take identity during one phase of the loop, on the host and on devices.

    ``values`` (host floats, 0 for rows that are off or have not started) and ``rows`` (indices of the rows with a
    non-zero value) are what the hooks branch on; :meth:`values_on` / :meth:`rows_on` are views into the gate's
    tables already on the device.
    """

    __slots__ = ("_gate", "_index", "all", "rows", "values")

    def __init__(self, gate: RowGate, index: int, values: tuple[float, ...]):
        self._gate = gate
        self._index = index
        self.values = values
        self.rows = tuple(i for i, v in enumerate(values) if v != 0)
        #: every row takes identity (no row selection needed)
        self.all = len(self.rows) == len(values)

    def values_on(self, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The gated values ``[R]`` on ``device`` in ``dtype`` (cast from float32, as the host values are)."""
        return self._gate.table("values", device, dtype)[self._index]

    def rows_on(self, device: torch.device) -> torch.Tensor:
        """``rows`` as an index tensor ``[len(rows)]`` on ``device`` (for ``index_select`` / ``index_copy``)."""
        return self._gate.table("rows", device, torch.long)[self._index, : len(self.rows)]


class RowGate:
    """Per-row values that switch on per row from a denoising step, worked out for every phase of the loop.

    ``values[r]`` applies to row ``r`` from step ``starts[r]`` on (0 before). :meth:`at` gives the :class:`Phase` of
    a step on the host; :meth:`table` uploads the ``[phases, R]`` tables once per device and dtype.
    """

    def __init__(self, values: Sequence[float], starts: Sequence[int]):
        values = [float(v) for v in values]
        starts = [int(s) for s in starts]
        if len(values) != len(starts):
            raise ValueError(f"{len(values)} values for {len(starts)} start steps")
        #: the ungated value and the start step of every row, as given
        self.values = tuple(values)
        self.starts = tuple(starts)
        #: distinct start steps; phase p: the rows whose start step is <= thresholds[p - 1] are on (phase 0: none)
        self.thresholds = sorted(set(starts))
        gated = [
            tuple(v if p and s <= self.thresholds[p - 1] else 0.0 for v, s in zip(values, starts, strict=True))
            for p in range(len(self.thresholds) + 1)
        ]
        self.phases = [Phase(self, p, row) for p, row in enumerate(gated)]
        width = len(values)
        self._host = {
            "values": torch.tensor(gated, dtype=torch.float32).reshape(len(gated), width),
            "rows": torch.tensor(
                [list(phase.rows) + [0] * (width - len(phase.rows)) for phase in self.phases], dtype=torch.long
            ).reshape(len(gated), width),
        }
        self._on_device: dict[tuple, torch.Tensor] = {}

    def select(self, rows: Sequence[int]) -> RowGate:
        """The gate of the rows ``rows`` only (in that order): what a model call on those rows needs."""
        return RowGate([self.values[r] for r in rows], [self.starts[r] for r in rows])

    def at(self, step: int) -> Phase:
        """The phase of denoising step ``step`` (a Python int: no tensor is read)."""
        return self.phases[bisect.bisect_right(self.thresholds, step)]

    def table(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The ``[phases, R]`` table ``name`` (``"values"`` or ``"rows"``) on ``device``: copied there on first use."""
        key = (name, torch.device(device), dtype)
        if key not in self._on_device:
            self._on_device[key] = self._host[name].to(device=device, dtype=dtype)
        return self._on_device[key]


class StepGatedState:
    """Identity inputs of one batch of ``B`` samples that switch on per sample from denoising step ``start_step``.

    ``self.step`` is the step about to run; :meth:`callback` (a diffusers ``callback_on_step_end``, or chained into
    one with :meth:`chain`) advances it, so the pipeline's own loop drives the gate. Subclasses call
    ``super().__init__(batch, start_step)`` and build their :class:`RowGate` per call layout once, in ``__init__``
    (:meth:`row_gates` for the ``B`` / ``2B`` layouts of a UNet-style call, read through :meth:`phase`), and cache
    their tokens per device and dtype (:meth:`cached`), so the per-layer hooks find everything already on the device.
    """

    #: how a wrong row count names the state and what called it ("<label> state has B samples but the <caller>...")
    label: ClassVar[str] = "identity"
    caller: ClassVar[str] = "model"

    batch_size: int
    start_step: torch.Tensor
    step: int = 0
    #: the gates of the row layouts a model call can have, by row count (see :meth:`row_gates`)
    gates: dict[int, RowGate]

    def __init__(self, batch: int, start_step: int | Sequence[int] | torch.Tensor = 0):
        self.batch_size = batch
        self.start_step = per_sample(start_step, batch, torch.long, "start_step")
        self.step = 0

    def row_gates(self, values: Sequence[float], negative: Sequence[float] | None = None) -> dict[int, RowGate]:
        """The gates of the two row layouts a model call can have: the ``B`` samples (``values``), or a CFG batch
        ``[negative, positive]`` of ``2B`` rows whose negative half takes ``negative`` (by default ``values``)."""
        values = list(values)
        negative = values if negative is None else list(negative)
        starts = self.start_step.tolist()
        return {
            self.batch_size: RowGate(values, starts),
            2 * self.batch_size: RowGate(negative + values, starts + starts),
        }

    def check_rows(self, count: int) -> None:
        """A model call on ``count`` rows must be on the ``B`` samples or on a CFG batch of ``2B``."""
        if count not in (self.batch_size, 2 * self.batch_size):
            raise ValueError(
                f"{self.label} state has {self.batch_size} samples but the {self.caller} was called with {count} rows "
                f"(expected {self.batch_size}, or {2 * self.batch_size} with classifier-free guidance)"
            )

    def gate_for(self, count: int) -> RowGate:
        """The gate of a model call on ``count`` rows (:attr:`gates`)."""
        self.check_rows(count)
        return self.gates[count]

    def phase(self, count: int) -> Phase:
        """Which rows of a model call on ``count`` rows take identity at the current step, with their values (host
        values and views of the device tables; see :class:`Phase`)."""
        return self.gate_for(count).at(self.step)

    def select_rows(self, active: Sequence[int]) -> None:
        """Keep only the samples ``active`` (indices into the batch this state was built for, in order): the others
        left the batch, and the model calls from now on are on the rows of ``active`` (``A`` or ``2A`` for CFG).

        The step is kept; the gates, per-sample values and tokens are narrowed and the device copies dropped (made
        again on first use). Called between denoising steps, once per change of the active rows.
        """
        kept = self.__dict__.get("_kept") or list(range(self.batch_size))
        unknown = [row for row in active if row not in kept]
        if unknown or not active or len(set(active)) != len(active):
            raise ValueError(
                f"cannot narrow a {self.label} state holding samples {kept} to {list(active)}: "
                "the rows must be distinct samples it still holds, at least one"
            )
        positions = [kept.index(row) for row in active]
        if positions == list(range(self.batch_size)):
            return
        self._select(positions)
        self._kept = list(active)

    def _select(self, positions: list[int]) -> None:
        """Narrow to the samples at ``positions`` of the current batch; subclasses narrow their own per-sample
        inputs, then call this."""
        before = self.batch_size
        self.batch_size = len(positions)
        self.start_step = self.start_step[positions]
        gates = self.__dict__.get("gates")
        if gates:
            self.gates = {
                self.batch_size: gates[before].select(positions),
                2 * self.batch_size: gates[2 * before].select(positions + [before + p for p in positions]),
            }
        self.__dict__.pop("_cache", None)

    def cached(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``make()`` the first time ``key`` is asked for in this state, the same tensor afterwards."""
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """A diffusers ``callback_on_step_end``: step ``step`` is done, the next one is ``step + 1``."""
        self.step = step + 1
        return callback_kwargs

    def chain(self, callback: Callable | None) -> Callable:
        """A ``callback_on_step_end`` that advances this state, then calls ``callback`` (when given)."""

        def on_step_end(pipe, step, timestep, callback_kwargs):
            callback_kwargs = self.callback(pipe, step, timestep, callback_kwargs)
            return callback(pipe, step, timestep, callback_kwargs) if callback is not None else callback_kwargs

        return on_step_end
