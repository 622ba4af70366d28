"""FaceID's LoRA on a UNet's attention projections: per-row forward hooks, or merged weights for whole-batch calls.

IP-Adapter FaceID ships a LoRA (rank 128 on SDXL) for every attention projection (``to_q``/``to_k``/``to_v``/
``to_out.0``: 560 Linears on SDXL) that applies, at 1.0, to the rows whose adapter is on at that step. Per row it
is a forward hook adding ``up(down(x))`` (:class:`RowLoRA`): two matmuls and an add per Linear per step. In eager
mode each of those ~1,700 kernels a step is also paid on the host, and SDXL at 1024² on a fast GPU is bound by the
host already (docs/benchmarks.md: the IP-Adapter's overhead there was mostly this).

When every row of a model call takes the adapter (a batch of FaceID renders from step 0, CFG negatives included:
the common case), :class:`FaceIDLoRA` takes the hooks off and adds ``up @ down`` to each Linear's weight in place
(what diffusers' ``fuse_lora`` does): no extra work per step at all. The original weights are copied aside when a call
first needs the merge and copied back when a call does not, or the batch ends: the same ``Parameter`` objects, at the
same addresses, with the very same values bit for bit, so a render after it, or a call where only some rows take the
adapter, uses the original weights.

In place, merging works in compiled blocks too (regional compile, CUDA graphs): a block's code without the hooks is
compiled once more per shape, like any other variant, while the weights it reads stay the graph's static inputs,
their values changed between calls as an optimiser changes them between training steps. A quantised weight cannot
take a float delta; an offloading hook (``accelerate``) moves parameters itself; a GPU without room for the copy
(twice its size free) keeps the hooks. Everywhere else the hooks do the work, as they always may.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class Gate(Protocol):
    """What the hooks read of the adapter's per-call gate (``adapter.CallGate``)."""

    active: bool
    on: torch.Tensor | None
    rows: torch.Tensor | None


#: the gate LoRA hooks read, by key (the model's ``id``): hooks look their gate up here, not through an attribute of
#: their own (dynamo gives tensors reached through a module's hooks static shapes, so each batch size would recompile
#: a compiled block; reached through a global they follow the batch like the block's inputs). Keyed by model, so
#: attaching the adapter again to the same model (a method switch) reuses the compiled blocks.
GATES: dict[int, Gate] = {}


class RowLoRA:
    """A forward hook adding ``up(down(x))`` (FaceID's LoRA, at 1.0) to a Linear's output, for active rows only.

    ``gate`` is registered under ``key`` (default: its own ``id``) in :data:`GATES`, which the hook reads.
    """

    def __init__(self, down: torch.Tensor, up: torch.Tensor, gate: Gate, key: int | None = None):
        self.down = down
        self.up = up
        self.gate_id = id(gate) if key is None else key
        GATES[self.gate_id] = gate

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up)

    def weight_delta(self) -> torch.Tensor:
        """``up @ down``: what merging adds to the Linear's weight."""
        return self.up @ self.down

    def __call__(self, module, args, output):
        gate = GATES[self.gate_id]
        if not gate.active:
            return None
        x = args[0]
        if torch.compiler.is_compiling() or gate.rows is None:
            # every row computed (compiled code keeps shapes independent of which rows take identity); rows that do
            # not take it at this step get 0 x delta, exactly nothing
            delta = self.delta(x)
            if delta.dtype != output.dtype:  # a no-op .to() still costs host time at ~560 hooks per SDXL step
                delta = delta.to(output.dtype)
            if not torch.compiler.is_compiling() and gate.rows is None:
                return output + delta
            return output + gate.on.to(output.dtype).view((-1,) + (1,) * (output.ndim - 1)) * delta
        rows = gate.rows
        return output.index_add(0, rows, self.delta(x.index_select(0, rows)).to(output.dtype))


class FusedRowLoRA(RowLoRA):
    """:class:`RowLoRA` on a fused projection (``to_qkv`` / ``to_kv`` after diffusers' ``fuse_qkv_projections``): the
    LoRAs of its parts, their outputs concatenated in the fused layer's order."""

    def __init__(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], gate: Gate, key: int | None = None):
        super().__init__(parts[0][0], parts[0][1], gate, key)
        self.parts = list(parts)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.linear(F.linear(x, down), up) for down, up in self.parts], dim=-1)

    def weight_delta(self) -> torch.Tensor:
        return torch.cat([up @ down for down, up in self.parts], dim=0)


class FaceIDLoRA:
    """FaceID's LoRA on one model: a :class:`RowLoRA` hook per Linear, or (see the module docstring) merged weights
    while every row of the model's calls takes the adapter.

    :meth:`for_call` (from the adapter's forward pre-hook on the model, once per model call) switches between the two
    only when the call's rows change that (host values: no tensor is read); :meth:`end_batch` puts the original
    weights and the hooks back; :meth:`unhook` takes everything off the model until :meth:`hook`.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        #: ``(linear, hook)`` per LoRA'd projection
        self.targets: list[tuple[nn.Linear, RowLoRA]] = []
        self._handles: list = []
        #: the original weights' values, copied aside at the batch's first merge (kept until it ends)
        self._originals: list[torch.Tensor] | None = None
        self.merged = False
        #: whether this batch may merge (worked out at its first whole-batch call; None: not yet)
        self._mergeable: bool | None = None

    def add(self, linear: nn.Linear, hook: RowLoRA) -> None:
        self.targets.append((linear, hook))
        self._handles.append(linear.register_forward_hook(hook))

    @property
    def hooked(self) -> int:
        """Hooks on the model now (0 while merged)."""
        return len(self._handles)

    def for_call(self, gate: Gate, device: torch.device) -> None:
        """Merged weights for a call whose every row takes the adapter (when this model may merge), hooks otherwise."""
        whole = gate.active and gate.rows is None
        if whole and not self.merged and self._may_merge(device):
            self._merge()
        elif not whole and self.merged:
            self._unmerge()

    def end_batch(self) -> None:
        """The batch is over: the original weights and the hooks back, the merged weights dropped."""
        if self.merged:
            self._unmerge()
        self._originals = None
        self._mergeable = None

    def unhook(self) -> None:
        """Off the model (the original weights back, no hook), the targets kept for :meth:`hook`."""
        self.end_batch()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def hook(self) -> None:
        """The targets' hooks on the model again after :meth:`unhook`."""
        if not self._handles:
            self._handles = [linear.register_forward_hook(hook) for linear, hook in self.targets]

    def _may_merge(self, device: torch.device) -> bool:
        if self._mergeable is None:
            self._mergeable = (
                bool(self.targets)
                # accelerate's offload hooks move the parameters themselves
                and not any(hasattr(m, "_hf_hook") for m in self.model.modules())
                and all(_plain_weight(linear.weight, device) for linear, _ in self.targets)
                and _has_room(device, sum(linear.weight.nbytes for linear, _ in self.targets))
            )
        return self._mergeable

    def _merge(self) -> None:
        with torch.no_grad():
            if self._originals is None:
                self._originals = [linear.weight.detach().clone() for linear, _ in self.targets]
            try:
                for linear, hook in self.targets:
                    linear.weight.add_(hook.weight_delta())  # W + up @ down, in the weight's dtype
            except BaseException:  # out of memory half-way: no weight may stay merged with the hooks still on
                self._restore()
                raise
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.merged = True

    def _unmerge(self) -> None:
        self._restore()
        for linear, hook in self.targets:
            self._handles.append(linear.register_forward_hook(hook))
        self.merged = False

    def _restore(self) -> None:
        """The original values back into the weights (the same tensors: compiled code keeps its addresses)."""
        with torch.no_grad():
            for (linear, _), original in zip(self.targets, self._originals, strict=True):
                linear.weight.copy_(original)


def _has_room(device: torch.device, nbytes: int) -> bool:
    """Whether a GPU has room for the original weights' copy (1.8 GiB for SDXL in fp16) and as much again for the
    render's activations; a small GPU keeps the hooks instead of running out of memory mid-render."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    # what torch's caching allocator holds but does not use is free for this process too
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free > 2 * nbytes


def _plain_weight(weight: torch.Tensor, device: torch.device) -> bool:
    """A weight merging can add to: a plain floating-point Parameter on the call's device (not a quantised tensor
    subclass, not on the meta device or elsewhere)."""
    return (
        type(weight) is nn.Parameter
        and type(weight.data) is torch.Tensor
        and weight.is_floating_point()
        and weight.device == device
    )


__all__ = ["GATES", "FaceIDLoRA", "FusedRowLoRA", "RowLoRA"]
