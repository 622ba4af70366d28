"""Identity values read by compiled blocks, kept at fixed device addresses from one batch to the next.

``torch.compile`` lifts a tensor attribute of an ``nn.Module`` (a PuLID processor's kept id keys, the scales on the
handle a processor refers to, an IP-Adapter gate's scales) as a *static* input of the compiled block. Under CUDA
graphs (SDXL's ``fast`` profile: torch's CUDA graph trees) a replay requires every static input at the address it
was recorded with. A tensor at a new address makes torch record that block's graph again, and the new recording is
kept beside the old ones; torch does not count these re-recordings against its limit. A new tensor per batch (or
per step phase) therefore re-recorded every identity block (70 on SDXL) for every batch.

:class:`FixedSlots` copies such values into buffers that live as long as their owner (a handle, a processor) and
hands out views of their first rows: one address whatever the batch, its size or its phase, so the graphs replay.
The values change in place, in the device's stream order, between the model calls that read them. A batch with more
rows than any before allocates a larger buffer once (at least double the rows held so far).
"""

from __future__ import annotations

import torch


class FixedSlots:
    """Named buffers for per-batch tensors ``[rows, ...]``: :meth:`hold` returns ``value`` copied into its slot."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def hold(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` copied into slot ``name``: a view of the slot's first ``len(value)`` rows, at the address it had
        for every earlier batch of these trailing dimensions, dtype and device."""
        rows = value.shape[0]
        buffer = self._buffers.get(name)
        fits = (
            buffer is not None
            and buffer.shape[1:] == value.shape[1:]
            and buffer.dtype == value.dtype
            and buffer.device == value.device
        )
        if not fits or buffer.shape[0] < rows:
            capacity = max(rows, 2 * buffer.shape[0]) if fits else rows
            # a normal tensor even when made under inference mode: it is written again in later batches, which may
            # run outside it
            with torch.inference_mode(False):
                buffer = torch.empty((capacity, *value.shape[1:]), dtype=value.dtype, device=value.device)
            self._buffers[name] = buffer
        held = buffer[:rows]
        with torch.no_grad():
            held.copy_(value)
        return held

    def nbytes(self) -> int:
        """Bytes the slots hold (kept until :meth:`clear`)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()


__all__ = ["FixedSlots"]
