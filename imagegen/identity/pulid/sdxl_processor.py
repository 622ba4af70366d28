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

In the released ``pulid_v1.1.safetensors`` the processors' weights are ``id_adapter_attn_layers.{i}.id_to_k|v``
where ``i`` counts **all** processors of the UNet in diffusers' ``attn_processors`` order (self-attention ones hold
no weights).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from imagegen.identity.steps import RowGate, StepGatedState, per_sample, pick

PREFIX = "id_adapter_attn_layers."
ORTHO_MODES = (None, "v1", "v2")
#: PuLID v1.1's defaults (its demo's "v2" mode)
DEFAULT_NUM_ZERO = 20
DEFAULT_ORTHO = "v2"
#: ortho v2 weighs the parallel part by the attention paid to this many leading id tokens
ORTHO_V2_TOKENS = 5


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


class PulidSDXLAttnProcessor(nn.Module):
    """PuLID v1.1's cross-attention processor for a diffusers ``Attention`` (the text attention computed like
    ``AttnProcessor2_0``, plus the id attention)."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, handle: PulidSDXLHandle | None = None):
        super().__init__()
        self.id_to_k = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.id_to_v = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        # a plain attribute, not a submodule: the handle is shared by every processor of a UNet
        self.__dict__["handle"] = handle

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

        identity = self._identity(batch_size, id_embedding, id_scale, num_zero, ortho)
        if identity is not None:
            hidden_states = self._add_identity(attn, query, hidden_states, *identity)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _identity(self, batch, id_embedding, id_scale, num_zero, ortho):
        """``(tokens, phase of the scales, num_zero, ortho)`` for this call, or None when no row takes identity.

        The tokens are on this processor's device and dtype. Whether any row takes identity is decided on the
        host (:class:`~imagegen.identity.steps.Phase`), never by reading a device tensor.
        """
        weight = self.id_to_k.weight
        if id_embedding is not None:
            scale = per_sample(1.0 if id_scale is None else id_scale, batch, torch.float32, "id_scale")
            phase = _fixed_gate(tuple(scale.tolist())).at(0)
            num_zero = 0 if num_zero is None else num_zero
            _check_mode(num_zero, ortho)
            if id_embedding.shape[0] != batch:
                raise ValueError(f"id_embedding has {id_embedding.shape[0]} rows for a batch of {batch}")
            if not phase.rows:
                return None
            tokens = id_embedding.to(device=weight.device, dtype=weight.dtype)
        else:
            state = self.handle.state if self.handle is not None else None
            if state is None:
                return None
            tokens, gate = state.for_batch(batch)
            phase = gate.at(state.step)
            if not phase.rows:
                return None
            tokens = state.tokens_on(tokens, weight.device, weight.dtype)
            num_zero, ortho = state.num_zero, state.ortho
        return tokens, phase, num_zero, ortho

    def _add_identity(self, attn, query, hidden_states, tokens, phase, num_zero, ortho):
        # the rows that take identity come from the host-side phase; their indices and scales are views of
        # tensors already on the device (no copy or sync per layer and step)
        rows = None if phase.all else phase.rows_on(hidden_states.device)
        q, h = query, hidden_states
        if rows is not None:
            tokens = tokens.index_select(0, phase.rows_on(tokens.device))
            q, h = query.index_select(0, rows), hidden_states.index_select(0, rows)
        if num_zero:
            tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], num_zero, tokens.shape[-1])], dim=1)
        batch, heads = q.shape[0], attn.heads
        head_dim = q.shape[-1]
        id_key = self.id_to_k(tokens).to(q.dtype).view(batch, -1, heads, head_dim).transpose(1, 2)
        id_value = self.id_to_v(tokens).to(q.dtype).view(batch, -1, heads, head_dim).transpose(1, 2)
        h_id = F.scaled_dot_product_attention(q, id_key, id_value, attn_mask=None, dropout_p=0.0, is_causal=False)
        h_id = h_id.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(q.dtype)
        # the plain mode scales in the hidden states' dtype, the ortho modes in float32 (as PuLID does)
        s = phase.values_on(h.device, h.dtype if ortho is None else torch.float32)
        s = (s if rows is None else s.index_select(0, rows))[:, None, None]
        if ortho is None:
            out = h + s * h_id
        else:
            h32, id32 = h.float(), h_id.float()
            # per sample and channel, over the tokens; a channel whose text attention output is all zero (the
            # zeroed empty negative prompt of SDXL's CFG) has no parallel part (upstream divides 0 by 0 there)
            numerator, denominator = (h32 * id32).sum(dim=-2, keepdim=True), (h32 * h32).sum(dim=-2, keepdim=True)
            coefficient = torch.where(denominator == 0, torch.zeros_like(numerator), numerator / denominator)
            projection = coefficient * h32
            if ortho == "v2":
                attn_map = (q @ id_key.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)
                attn_mean = attn_map[:, :, :ORTHO_V2_TOKENS].sum(dim=-1, keepdim=True)
                orthogonal = id32 + (attn_mean - 1) * projection
            else:
                orthogonal = id32 - projection
            out = (h32 + s * orthogonal).to(h.dtype)
        if rows is None:
            return out
        return hidden_states.index_copy(0, rows, out)


class PulidSDXLHandle:
    """PuLID installed on one UNet: set a :class:`PulidSDXLState` per batch, :meth:`detach` at the end."""

    def __init__(self, unet: nn.Module, originals: dict, processors: dict[str, PulidSDXLAttnProcessor]):
        self.unet = unet
        self.originals = originals
        self.processors = processors
        self.state: PulidSDXLState | None = None
        self.attached = True

    def set_state(self, state: PulidSDXLState | None) -> None:
        self.state = state

    @contextmanager
    def use(self, state: PulidSDXLState | None) -> Iterator[PulidSDXLState | None]:
        """``with handle.use(state): pipe(...)``: the state for the calls inside, cleared afterwards."""
        previous = self.state
        self.state = state
        try:
            yield state
        finally:
            self.state = previous

    def detach(self) -> None:
        """Put back the very processor objects the UNet had before :func:`attach_pulid_sdxl`."""
        if not self.attached:
            return
        self.unet.set_attn_processor(dict(self.originals))
        self.attached = False
        self.state = None
        if getattr(self.unet, ATTACHED_ATTR, None) is self:
            delattr(self.unet, ATTACHED_ATTR)


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
        processor = PulidSDXLAttnProcessor(hidden, cross, handle)
        try:
            processor.load_state_dict(sub, strict=True, assign=True)
        except RuntimeError as exc:
            raise ValueError(f"PuLID SDXL layer {index} ({name}): {exc}") from exc
        if move:
            processor.to(device=param.device, dtype=param.dtype)
        processor.eval().requires_grad_(False)
        handle.processors[name] = processor
    unet.set_attn_processor({name: handle.processors.get(name, proc) for name, proc in originals.items()})
    setattr(unet, ATTACHED_ATTR, handle)
    return handle
