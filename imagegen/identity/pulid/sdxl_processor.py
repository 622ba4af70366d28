"""PuLID v1.1 for SDXL: cross-attention processors that add an id-token attention to every ``attn2``.

Each cross-attention layer gets two projections, ``id_to_k`` / ``id_to_v`` (id tokens → keys / values); the
queries attend to the id tokens (optionally padded with ``num_zero`` zero tokens, which dilutes the identity and
leaves more room to the prompt) and the result is added to the text attention's output before ``to_out``:

- plain (``ortho=None``): ``h = h + id_scale * h_id``
- ``ortho="v1"``: only the part of ``h_id`` orthogonal to ``h`` (per sample and channel, over the tokens) is added
- ``ortho="v2"``: the parallel part is kept in proportion to how much the queries attend to the first 5 id tokens
  (PuLID v1.1's default, with ``num_zero=20`` and ``id_scale=0.8``)

The id tokens come per batch from a :class:`PulidSDXLState` set on the :class:`PulidSDXLHandle` that
:func:`attach_pulid_sdxl` returns (or per call as ``id_embedding``/``id_scale`` keyword arguments). Scales are per
sample, so a batch can mix characters; a sample with scale 0 gets exactly what the plain processor computes.
Under classifier-free guidance diffusers doubles the batch as ``[negative, positive]``; the state supplies the
negative id tokens (``IDFormer.unconditional``) for the first half, or no identity there when it has none.

What a denoising step needs is worked out before the UNet runs, not in the 70 processors: a forward pre-hook on the
UNet (:meth:`PulidSDXLHandle.prepare`) picks the step's per-row scales (device tensors, see
:mod:`imagegen.identity.steps`) and, once per batch, projects the id tokens to every layer's keys and values (the
zero tokens are zero keys and values: padded, never projected). The processors then read tensors only: no host
value that changes per batch or per step is read inside them, so ``torch.compile`` of the UNet's blocks traces them
without a graph break and reuses one graph for every batch composition and step (rows that take no identity at a
step are masked with ``torch.where``, exactly as the plain processor leaves them). The tensors they read from the
processors and the handle (keys, values, scales) keep one device address from batch to batch
(:mod:`imagegen.identity.fixed_address`): a compiled block reads them as static inputs, and under CUDA graphs a new
address would record the block's graph again.

In the released ``pulid_v1.1.safetensors`` the processors' weights are ``id_adapter_attn_layers.{i}.id_to_k|v``
where ``i`` counts **all** processors of the UNet in diffusers' ``attn_processors`` order (self-attention ones hold
no weights).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from imagegen.identity.fixed_address import FixedSlots
from imagegen.identity.reattach import can_reattach
from imagegen.identity.steps import RowGate, StepGatedState, per_sample, pick

PREFIX = "id_adapter_attn_layers."
ORTHO_MODES = (None, "v1", "v2")
#: PuLID v1.1's defaults (its demo's "v2" mode)
DEFAULT_NUM_ZERO = 20
DEFAULT_ORTHO = "v2"
#: ortho v2 weighs the parallel part by the attention paid to this many leading id tokens
ORTHO_V2_TOKENS = 5
#: width of the indicator "values" through which ortho v2's attention to the leading tokens is read from
#: ``scaled_dot_product_attention`` (a multiple of 8 keeps the fused GPU kernels eligible)
_INDICATOR_WIDTH = 8


class PulidSDXLState(StepGatedState):
    """The identity inputs of one batch of ``B`` samples.

    - ``id_tokens``: ``[B, N, C]`` IDFormer output (``C`` = the UNet's cross-attention width).
    - ``scale``: ``id_scale`` per sample ``[B]`` or one float; 0 renders a sample exactly as without PuLID.
    - ``uncond_id_tokens``: ``[B, N, C]`` negative id tokens, used for the negative half of a CFG batch.
    - ``num_zero`` / ``ortho``: PuLID v1.1's trade-off knobs (see the module docstring).
    - ``start_step``: identity from denoising step ``start_step`` on (int or ``[B]``), the step being advanced
      by :meth:`callback` used as (or chained into) the pipeline's ``callback_on_step_end``.
    """

    label = "PuLID"
    caller = "UNet"

    def __init__(
        self,
        id_tokens: torch.Tensor,
        scale: float | Sequence[float] | torch.Tensor = 0.8,
        uncond_id_tokens: torch.Tensor | None = None,
        num_zero: int = DEFAULT_NUM_ZERO,
        ortho: str | None = DEFAULT_ORTHO,
        start_step: int | Sequence[int] | torch.Tensor = 0,
    ):
        if id_tokens.ndim != 3:
            raise ValueError(f"id_tokens must be [B, N, C], got shape {tuple(id_tokens.shape)}")
        if uncond_id_tokens is not None and uncond_id_tokens.shape != id_tokens.shape:
            raise ValueError(
                f"uncond_id_tokens {tuple(uncond_id_tokens.shape)} must match id_tokens {tuple(id_tokens.shape)}"
            )
        _check_mode(num_zero, ortho)
        batch = id_tokens.shape[0]
        self.id_tokens = id_tokens
        self.uncond_id_tokens = uncond_id_tokens
        self.scale = per_sample(scale, batch, torch.float32, "scale")
        super().__init__(batch, start_step)
        self.num_zero = num_zero
        self.ortho = ortho
        # the scales per step phase of the two row layouts a UNet call can have: the B samples, or a CFG batch
        # [negative, positive] (negative rows take the negative id tokens, or no identity without them)
        scales = self.scale.tolist()
        self.gates = self.row_gates(scales, scales if uncond_id_tokens is not None else [0.0] * batch)

    def _select(self, positions: list[int]) -> None:
        """Rows left the batch between two steps: tokens and scales of the samples at ``positions`` only (the
        gates and the concatenated CFG tokens are narrowed / dropped by the base class)."""
        self.id_tokens = pick(self.id_tokens, positions)
        self.uncond_id_tokens = pick(self.uncond_id_tokens, positions)
        self.scale = self.scale[positions]
        super()._select(positions)

    def for_batch(self, batch: int) -> tuple[torch.Tensor, RowGate]:
        """``(id tokens [batch, N, C], gate of the scales [batch])`` for a UNet call on ``batch`` rows.

        ``batch == B``: the samples themselves; ``batch == 2B``: a CFG batch ``[negative, positive]``.
        """
        gate = self.gate_for(batch)
        if batch == self.batch_size:
            return self.id_tokens, gate
        negative = self.id_tokens if self.uncond_id_tokens is None else self.uncond_id_tokens
        # concatenated once per render, not per layer and step
        return self.cached(("cfg tokens",), lambda: torch.cat([negative, self.id_tokens])), gate

    def tokens_on(self, tokens: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``tokens`` (from :meth:`for_batch`) on ``device`` in ``dtype``, converted once per render."""
        return self.cached((tokens.shape[0], device, dtype), lambda: tokens.to(device=device, dtype=dtype))


@functools.lru_cache(maxsize=32)
def _fixed_gate(scales: tuple[float, ...]) -> RowGate:
    """The gate of per-call ``id_scale`` values (no start step), shared by every layer and call that passes the same
    scales, so they reach a device once rather than once per layer and step. Pass Python numbers: a device tensor
    has to be read back to the host first."""
    return RowGate(scales, [0] * len(scales))


def _check_mode(num_zero: int, ortho: str | None) -> None:
    if ortho not in ORTHO_MODES:
        raise ValueError(f"ortho must be one of {ORTHO_MODES}, got {ortho!r}")
    if num_zero < 0:
        raise ValueError(f"num_zero must be >= 0, got {num_zero}")


class PulidSDXLCall:
    """What every PuLID processor of one UNet call reads: the id tokens of the call's rows and the current step's
    per-row scales, as tensors on the call's device, plus the mode (host constants of the batch).

    Built once per batch and row layout (``B`` rows, or ``2B`` under CFG) by :meth:`PulidSDXLHandle.prepare`;
    :meth:`at_step` swaps in the scales of a step only when its phase differs from the previous step's (copied on the
    device from the gate's tables into the handle's fixed slots: four tiny copies per phase, and the same addresses
    for every batch). The processors never read the state, the step or a Python scale.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        gate: RowGate,
        ortho: str | None,
        num_zero: int,
        device: torch.device,
        dtype: torch.dtype,
        state: PulidSDXLState | None = None,
        slots: FixedSlots | None = None,
    ):
        self.state = state
        #: where the step's scales are held at fixed addresses (the handle's; None: per-call tensors)
        self.slots = slots
        #: the processors keep their keys / values of this call across steps (a handle's call, not per-call
        #: keyword arguments)
        self.kept = state is not None
        self.gate = gate
        self.rows = tokens.shape[0]
        self.device = device
        self.dtype = dtype
        #: ``[R, N, C]`` on the processors' device, in their dtype
        self.tokens = tokens
        self.ortho = ortho
        self.num_zero = num_zero
        #: ortho v2 reads the attention paid to the leading id tokens as an attention whose values are 1 there
        self.indicator = _indicator(tokens.shape[1] + num_zero, device, dtype) if ortho == "v2" else None
        #: whether the processors' keys and values for these tokens were projected (``PulidSDXLHandle.prepare``)
        self.projected = False
        self.step: int | None = None
        self.phase = None
        self.at_step(0 if state is None else state.step)

    def at_step(self, step: int) -> None:
        self.step = step
        phase = self.gate.at(step)
        if phase is self.phase:
            return
        self.phase = phase
        #: some row takes identity at this step (host value: with none, the processors run plainly)
        self.active = bool(phase.rows)
        #: every row does (no masking needed)
        self.every_row = phase.all
        hold = (lambda name, value: value) if self.slots is None else self.slots.hold
        #: ``[R, 1, 1]`` scales, float32 (the ortho modes' math) and the processors' dtype (the plain mode's)
        self.scale = hold("scale", phase.values_on(self.device, torch.float32)[:, None, None])
        self.scale_model = hold("scale_model", phase.values_on(self.device, self.dtype)[:, None, None])
        #: ``-scale``: ortho v2's ``(a - 1) * scale`` is one ``addcmul(-scale, a, scale)``
        self.neg_scale = hold("neg_scale", -self.scale)
        #: ``[R, 1, 1]``: rows that take identity at this step (the others keep the plain output exactly)
        self.on = hold("on", self.scale != 0)


class PulidSDXLAttnProcessor(nn.Module):
    """PuLID v1.1's cross-attention processor for a diffusers ``Attention`` (the text attention computed like
    ``AttnProcessor2_0``, plus the id attention)."""

    def __init__(
        self,
        hidden_size: int,
        cross_attention_dim: int,
        handle: PulidSDXLHandle | None = None,
        heads: int | None = None,
    ):
        super().__init__()
        self.id_to_k = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.id_to_v = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        #: the attention's head count (None: read from the ``Attention`` at the first call): the kept keys and values
        #: are stored in its ``[R, heads, N + num_zero, head_dim]`` layout, so a step does not re-lay them out
        self.heads = heads
        # plain attributes, not submodules or buffers: the handle is shared by every processor of a UNet; the id keys
        # and values ``[R, heads, N + num_zero, head_dim]`` of the current batch are set by ``PulidSDXLHandle.prepare``
        self.__dict__["handle"] = handle
        self._id_key: torch.Tensor | None = None
        self._id_value: torch.Tensor | None = None
        #: the call the keys / values belong to (read outside compiled code only)
        self._projected_for: PulidSDXLCall | None = None
        #: the kept keys and values live here, at one address for every batch (a compiled block's static inputs)
        self._slots = FixedSlots()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        id_embedding: torch.Tensor | None = None,
        id_scale: float | Sequence[float] | torch.Tensor | None = None,
        num_zero: int | None = None,
        ortho: str | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if getattr(attn, "fused_projections", False) and getattr(attn, "to_kv", None) is not None:
            # fuse_qkv_projections() (a profile's fuse_qkv): the text keys and values as its FusedAttnProcessor2_0
            # computes them, so a row without identity is that processor's output exactly
            key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            key = attn.to_k(encoder_hidden_states)
            value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if id_embedding is not None:
            call = self._call_of_kwargs(batch_size, id_embedding, id_scale, num_zero, ortho)
        elif torch.compiler.is_compiling():
            # prepared by the UNet's pre-hook, outside the traced blocks (reading the state here would specialise
            # the graph on the step and the batch)
            call = None if self.handle is None else self.handle.call
        else:
            call = None
            if self.handle is not None:
                call = self.handle.prepare(batch_size, hidden_states.device, self.id_to_k.weight.dtype)
        if call is not None:
            hidden_states = self._add_identity(attn, query, hidden_states, call)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _call_of_kwargs(self, batch, id_embedding, id_scale, num_zero, ortho) -> PulidSDXLCall | None:
        """The call of per-call ``id_embedding`` / ``id_scale`` keyword arguments (PuLID's own calling convention;
        the scales are read on the host, so pass Python numbers), or None when every scale is 0."""
        scale = per_sample(1.0 if id_scale is None else id_scale, batch, torch.float32, "id_scale")
        num_zero = 0 if num_zero is None else num_zero
        _check_mode(num_zero, ortho)
        if id_embedding.shape[0] != batch:
            raise ValueError(f"id_embedding has {id_embedding.shape[0]} rows for a batch of {batch}")
        gate = _fixed_gate(tuple(scale.tolist()))
        if not gate.at(0).rows:
            return None
        weight = self.id_to_k.weight
        tokens = id_embedding.to(device=weight.device, dtype=weight.dtype)
        return PulidSDXLCall(tokens, gate, ortho, num_zero, weight.device, weight.dtype)

    def project(self, call: PulidSDXLCall, heads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The id keys and values ``[R, heads, N + num_zero, head_dim]`` of ``call``'s tokens (zero tokens: zero keys
        and values, as the bias-free projections make them)."""
        key, value = self._padded_projection(call)
        return _in_heads(key, heads or self.heads), _in_heads(value, heads or self.heads)

    def _padded_projection(self, call: PulidSDXLCall) -> tuple[torch.Tensor, torch.Tensor]:
        key, value = self.id_to_k(call.tokens), self.id_to_v(call.tokens)
        if call.num_zero:
            key, value = F.pad(key, (0, 0, 0, call.num_zero)), F.pad(value, (0, 0, 0, call.num_zero))
        return key, value

    def keep_projection(self, call: PulidSDXLCall | None) -> None:
        """Project ``call``'s tokens now and keep the keys and values for its calls (None: forget them; their slots,
        and so their addresses, stay for the next batch)."""
        if call is None or self.heads is None:  # the head count comes with the first call (see ``__call__``)
            self._id_key = self._id_value = self._projected_for = None
        else:
            key, value = self._padded_projection(call)
            self._id_key = _in_heads(self._slots.hold("key", key), self.heads)
            self._id_value = _in_heads(self._slots.hold("value", value), self.heads)
            self._projected_for = call

    def _key_value(self, call: PulidSDXLCall, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not call.kept:
            return self.project(call, heads)
        if torch.compiler.is_compiling():
            # kept by the pre-hook when the weights were on the call's device; projected here otherwise (a UNet
            # whose weights an offload hook moves in only after the pre-hook)
            if self._id_key is None:
                return self.project(call, heads)
            return self._id_key, self._id_value
        if self.heads is None:
            self.heads = heads
        if self._projected_for is not call:
            self.keep_projection(call)
        return self._id_key, self._id_value

    def _add_identity(self, attn, query, hidden_states, call: PulidSDXLCall) -> torch.Tensor:
        """The identity added to the text attention's output. In eager mode every aten op here is paid on the host at
        every layer and step (70 layers on SDXL), so nothing is converted or re-laid out that could be kept."""
        batch, heads, _, head_dim = query.shape
        id_key, id_value = self._key_value(call, heads)
        if id_key.dtype != query.dtype:
            id_key, id_value = id_key.to(query.dtype), id_value.to(query.dtype)
        h_id = F.scaled_dot_product_attention(query, id_key, id_value, attn_mask=None, dropout_p=0.0, is_causal=False)
        h_id = h_id.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        h = hidden_states
        if call.ortho is None:
            scale = call.scale_model if call.scale_model.dtype == h.dtype else call.scale.to(h.dtype)
            out = torch.addcmul(h, h_id, scale)  # h + scale * h_id, in the hidden states' dtype (as PuLID does)
        else:
            attention = None
            if call.ortho == "v2":
                attention = _leading_attention(query, id_key, call.indicator)
            out = _orthogonal(h, h_id, call.scale, attention, call.neg_scale)
        # rows without identity at this step keep the plain output bit for bit (always masked when compiled: the
        # rows taking identity are a property of the batch, which the graph must not depend on)
        if torch.compiler.is_compiling() or not call.every_row:
            out = torch.where(call.on, out, h)
        return out


def _in_heads(projected: torch.Tensor, heads: int) -> torch.Tensor:
    """``[R, W, heads * head_dim]`` keys or values in the attention's layout ``[R, heads, W, head_dim]`` (a view)."""
    rows, width, hidden = projected.shape
    return projected.view(rows, width, heads, hidden // heads).transpose(1, 2)


@functools.lru_cache(maxsize=16)
def _indicator(width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Ortho v2's indicator values ``[1, 1, width, 8]``: 1 on the leading id tokens. One tensor per width, device and
    dtype, so a compiled block reads it at one address."""
    indicator = (torch.arange(width, device=device) < ORTHO_V2_TOKENS).to(dtype)
    return indicator[None, None, :, None].expand(1, 1, width, _INDICATOR_WIDTH)


def _leading_attention(query: torch.Tensor, id_key: torch.Tensor, indicator: torch.Tensor) -> torch.Tensor:
    """Ortho v2's weight ``[R, L, 1]``: the attention the queries pay to the first :data:`ORTHO_V2_TOKENS` id tokens,
    summed over them and averaged over the heads, from **unscaled** logits (as PuLID computes it).

    On a GPU it is one ``scaled_dot_product_attention`` (``scale=1``) whose values are 1 on the leading tokens and 0
    elsewhere: the fused kernels never materialise the ``[R, heads, L, N]`` map. On the CPU, whose attention kernel
    is slower than a plain matmul + softmax for a few dozen keys, the map is computed explicitly.
    """
    if query.device.type == "cpu":
        weights = (query @ id_key.transpose(-2, -1)).softmax(dim=-1)
        return weights[..., :ORTHO_V2_TOKENS].sum(dim=-1, keepdim=True).mean(dim=1)
    return _leading_attention_fused(query, id_key, indicator)


def _leading_attention_fused(query: torch.Tensor, id_key: torch.Tensor, indicator: torch.Tensor) -> torch.Tensor:
    batch, heads, _, _ = query.shape
    values = (indicator if indicator.dtype == query.dtype else indicator.to(query.dtype)).expand(batch, heads, -1, -1)
    out = F.scaled_dot_product_attention(query, id_key, values, dropout_p=0.0, is_causal=False, scale=1.0)
    return out[..., :1].mean(dim=1)


def _orthogonal(
    h: torch.Tensor,
    h_id: torch.Tensor,
    scale: torch.Tensor,
    attention: torch.Tensor | None,
    neg_scale: torch.Tensor,
):
    """``h + scale * (h_id - (1 - a) * parallel)`` in float32 (as PuLID computes the ortho modes), back in ``h``'s
    dtype; ``parallel`` is ``h_id``'s projection on ``h`` per sample and channel over the tokens, ``a`` ortho v2's
    leading-token attention ``[R, L, 1]`` (v1: ``a = 0``); ``neg_scale``: ``-scale`` (kept per step by the call).

    Rearranged as ``h + scale * h_id - scale * (1 - a) * coef * h`` with the per-channel coefficient
    ``coef = <h, h_id> / <h, h>`` ``[R, 1, C]``: two full-size passes after the reductions (three for v2) instead
    of five, and no full-size ``projection`` / ``orthogonal`` temporaries; few ops, as each one costs host time at
    every layer and step in eager mode.
    """
    h32, id32 = h.float(), h_id.float()  # no copies when the model runs in float32
    numerator = (h32 * id32).sum(dim=-2, keepdim=True)
    denominator = (h32 * h32).sum(dim=-2, keepdim=True)
    # a channel whose text attention output is all zero (the zeroed empty negative prompt of SDXL's CFG) has no
    # parallel part (upstream divides 0 by 0 there): 0 / 0 is the only NaN, as <h, h_id> is 0 wherever <h, h> is
    coefficient = (numerator / denominator).nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    out = torch.addcmul(h32, id32, scale)
    if attention is None:
        out.addcmul_(h32, coefficient * scale, value=-1.0)
    else:
        # (a - 1) * scale as -scale + a * scale (a, in the model's dtype, is promoted exactly)
        weight = torch.addcmul(neg_scale, attention, scale)
        out.addcmul_(h32, coefficient * weight)
    return out.to(h.dtype)


# diffusers' Attention.forward reads its processor's signature at every call (inspect.signature(processor.__call__), to
# filter cross_attention_kwargs); with the signature worked out once here it is read, not rebuilt from the code
PulidSDXLAttnProcessor.__call__.__signature__ = inspect.signature(PulidSDXLAttnProcessor.__call__)


class PulidSDXLHandle:
    """PuLID installed on one UNet: set a :class:`PulidSDXLState` per batch, :meth:`detach` at the end."""

    def __init__(self, unet: nn.Module, originals: dict, processors: dict[str, PulidSDXLAttnProcessor]):
        self.unet = unet
        self.originals = originals
        self.processors = processors
        self.state: PulidSDXLState | None = None
        #: the processors are on the UNet (True from the start: processors may also be driven without a UNet)
        self.attached = True
        #: the prepared call of the current batch and row layout (whatever the step)
        self._prepared: PulidSDXLCall | None = None
        #: what the processors of the running UNet call read: ``_prepared`` when a row takes identity at this step
        self.call: PulidSDXLCall | None = None
        #: the step's scales at fixed addresses (see :mod:`imagegen.identity.fixed_address`)
        self.slots = FixedSlots()
        self._hooks: list = []

    def set_state(self, state: PulidSDXLState | None) -> None:
        self.state = state
        self._forget()

    @contextmanager
    def use(self, state: PulidSDXLState | None) -> Iterator[PulidSDXLState | None]:
        """``with handle.use(state): pipe(...)``: the state for the calls inside, cleared afterwards."""
        if state is not None and not self.attached:  # a detached handle would render without identity, silently
            raise RuntimeError("this PuLID handle was detached; attach the method again")
        previous = self.state
        self.set_state(state)
        try:
            yield state
        finally:
            self.set_state(previous)

    def _forget(self) -> None:
        """Drop the prepared call and the keys / values the processors kept for it."""
        if self._prepared is not None:
            for processor in self.processors.values():
                processor.keep_projection(None)
        self._prepared = self.call = None

    def prepare(self, rows: int, device: torch.device, dtype: torch.dtype | None = None) -> PulidSDXLCall | None:
        """The call of a UNet call on ``rows`` rows at the state's current step: what the processors read, None
        when no row takes identity at this step (or no state is set).

        Built again only when the batch changed (another state, rows that left it, another layout or device);
        otherwise only the step's phase is looked up (host values). Building it converts the tokens to ``dtype``
        (default: the processors') and projects them to every processor's keys and values (when the processors'
        weights are on ``device``), so the processors do not repeat that at every step.
        """
        state = self.state
        prepared = self._prepared
        if state is None:
            if prepared is not None:
                self._forget()
            return None
        fresh = (
            prepared is None
            or prepared.state is not state
            or prepared.rows != rows
            or prepared.gate is not state.gates.get(rows)
            or prepared.device != device
        )
        if fresh:
            self._forget()
            tokens, gate = state.for_batch(rows)
            dtype = dtype or self._dtype(tokens)
            tokens = state.tokens_on(tokens, device, dtype)
            prepared = PulidSDXLCall(tokens, gate, state.ortho, state.num_zero, device, dtype, state, self.slots)
            self._prepared = prepared
        elif prepared.step != state.step:
            prepared.at_step(state.step)
        if not prepared.projected and prepared.active:
            self._project(prepared)
        self.call = prepared if prepared.active else None
        return self.call

    def _dtype(self, tokens: torch.Tensor) -> torch.dtype:
        for processor in self.processors.values():
            return processor.id_to_k.weight.dtype
        return tokens.dtype

    def _project(self, call: PulidSDXLCall) -> None:
        """Every processor's keys and values of ``call``, when their weights are on its device (an offloaded UNet's
        come in after this pre-hook: its processors project for themselves until they are)."""
        processors = list(self.processors.values())
        if not processors or processors[0].id_to_k.weight.device != call.device:
            return
        with torch.no_grad():
            for processor in processors:
                processor.keep_projection(call)
        call.projected = True

    @torch.compiler.disable
    def _before_unet(self, module, args, kwargs):
        """The UNet's forward pre-hook: :meth:`prepare` for the call about to run (host logic: never traced)."""
        sample = args[0] if args else kwargs.get("sample")
        if self.state is None or sample is None:
            self.call = None
            return None
        self.prepare(sample.shape[0], sample.device)
        return None

    def detach(self) -> None:
        """Put back the very processor objects the UNet had before :func:`attach_pulid_sdxl`. The PuLID processors
        and their fixed slots are kept for :meth:`reattach` (see :mod:`imagegen.identity.reattach`)."""
        if not self.attached:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._forget()
        self.unet.set_attn_processor(dict(self.originals))
        self.attached = False
        self.state = None
        if getattr(self.unet, ATTACHED_ATTR, None) is self:
            delattr(self.unet, ATTACHED_ATTR)

    def reattach(self) -> bool:
        """Install the same processors again after :meth:`detach`; False (nothing changed) when the UNet's processors
        are no longer the ones they were built around."""
        if self.attached:
            return True
        if not can_reattach(self.unet, ATTACHED_ATTR, self.originals):
            return False
        self._install()
        return True

    def _install(self) -> None:
        unet = self.unet
        unet.set_attn_processor({name: self.processors.get(name, proc) for name, proc in self.originals.items()})
        # the step's scales and the batch's keys / values are prepared here, outside the blocks torch.compile traces
        self._hooks.append(unet.register_forward_pre_hook(self._before_unet, with_kwargs=True))
        setattr(unet, ATTACHED_ATTR, self)
        self.attached = True


ATTACHED_ATTR = "_imagegen_pulid_sdxl"


def cross_attention_layers(unet: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """``(index, processor name, Attention module)`` of every cross-attention, ``index`` counting all processors
    in ``unet.attn_processors`` order (the numbering of ``id_adapter_attn_layers.{i}``)."""
    out = []
    for index, name in enumerate(unet.attn_processors):
        module = unet.get_submodule(name[: -len(".processor")])
        if getattr(module, "is_cross_attention", False):
            out.append((index, name, module))
    return out


def attach_pulid_sdxl(unet: nn.Module, state_dict: Mapping[str, torch.Tensor], move: bool = True) -> PulidSDXLHandle:
    """Install PuLID v1.1 processors on every cross-attention of a diffusers ``UNet2DConditionModel``.

    ``state_dict`` holds ``id_adapter_attn_layers.{i}.id_to_k|id_to_v.weight`` (other keys, e.g.
    ``id_adapter.*``, are ignored); the indices must be exactly the UNet's cross-attention processors. Self-
    attention processors are left as they are. With ``move`` the new processors take the UNet's device and dtype.
    """
    if getattr(unet, ATTACHED_ATTR, None) is not None:
        raise RuntimeError("PuLID is already attached to this UNet; detach the previous handle first")
    weights = {k[len(PREFIX) :]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    layers = cross_attention_layers(unet)
    expected = {str(index) for index, _, _ in layers}
    present = {k.split(".")[0] for k in weights}
    if present != expected:
        missing, extra = sorted(expected - present, key=int), sorted(present - expected, key=int)
        raise ValueError(
            f"PuLID SDXL weights do not fit this UNet ({len(expected)} cross-attention layers): missing layer "
            f"indices {missing[:8]}, unexpected {extra[:8]}. Is the checkpoint for another UNet architecture?"
        )
    originals = unet.attn_processors
    handle = PulidSDXLHandle(unet, originals, {})
    param = next(unet.parameters())
    for index, name, module in layers:
        sub = {k[len(f"{index}.") :]: v for k, v in weights.items() if k.startswith(f"{index}.")}
        hidden, cross = module.to_k.out_features, module.to_k.in_features
        with torch.device("meta"):  # no random init of weights the file's replace (1 s for SDXL's 340 M on a CPU)
            processor = PulidSDXLAttnProcessor(hidden, cross, handle, heads=module.heads)
        try:
            processor.load_state_dict(sub, strict=True, assign=True)
        except RuntimeError as exc:
            raise ValueError(f"PuLID SDXL layer {index} ({name}): {exc}") from exc
        if move:
            processor.to(device=param.device, dtype=param.dtype)
        processor.eval().requires_grad_(False)
        handle.processors[name] = processor
    handle._install()
    return handle
