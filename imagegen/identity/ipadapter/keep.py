"""The IP processors' key / value projections of the image tokens, computed once per batch instead of every step.

diffusers' IP-Adapter processors project the image tokens to keys and values (``to_k_ip`` / ``to_v_ip``) in every
layer at every denoising step, but the tokens are the same tensors all through a batch (the projection's output is
kept per batch, ``adapter.PerSampleProjection``; FLUX's come once per pipeline call). In eager mode each projection is
a kernel and its host time at every cross-attention of every step (140 a step on SDXL).

:class:`KeptProjection` replaces such a Linear's ``forward`` (an instance attribute: the module, its parameters and
its state-dict keys stay diffusers') by one that returns the output it computed last when it is given the very same
input tensor again, which is exactly what the Linear would compute. Eager models only: in compiled blocks a
``forward`` object per Linear would be a guard per block (a recompile for each), and compiled code projects anyway.
:meth:`forget` drops the kept tensors when a batch ends; :meth:`remove` puts the Linear's own ``forward`` back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagegen.pipelines.profiles import has_compiled_blocks


class KeptProjection:
    """``linear.forward`` while installed: ``F.linear`` of the input, kept for the last :data:`KEEP` input tensors
    it was given (two: FLUX's true CFG alternates the positive and the negative image tokens)."""

    KEEP = 2

    def __init__(self, linear: nn.Linear):
        self.linear = linear
        #: ``(input, output)`` pairs, newest last; the inputs are held too, so their ids cannot be reused
        self._kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        #: projections computed (not answered from what was kept): per batch and layer, once per distinct input
        self.computed = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.linear
        if torch.compiler.is_compiling():
            return F.linear(x, linear.weight, linear.bias)
        for seen, out in self._kept:
            if seen is x:
                return out
        out = F.linear(x, linear.weight, linear.bias)
        self._kept = [*self._kept[-(self.KEEP - 1) :], (x, out)]
        self.computed += 1
        return out

    def forget(self) -> None:
        self._kept = []

    def install(self) -> None:
        self.linear.forward = self

    def remove(self) -> None:
        self.forget()
        self.linear.__dict__.pop("forward", None)


def keep_projections(processor: nn.Module, model: nn.Module) -> list[KeptProjection]:
    """:class:`KeptProjection` for every ``to_k_ip`` / ``to_v_ip`` Linear of a diffusers IP processor of ``model``
    (none when the model's blocks are compiled), to :meth:`~KeptProjection.install` with the processor."""
    if has_compiled_blocks(model):
        return []
    return [
        KeptProjection(linear)
        for name in ("to_k_ip", "to_v_ip")
        for linear in getattr(processor, name, ())
        if isinstance(linear, nn.Linear)
    ]


__all__ = ["KeptProjection", "keep_projections"]
