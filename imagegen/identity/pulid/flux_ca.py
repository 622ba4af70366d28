"""PuLID-FLUX's cross-attentions and the hooks that put them into diffusers' ``FluxTransformer2DModel``.

PuLID-FLUX adds a small cross-attention (:class:`PerceiverAttentionCA`: image tokens attend to the id tokens)
after double blocks ``0, d, 2d, ...`` and single blocks ``0, s, 2s, ...`` (``d = 2``, ``s = 4`` in v0.9.1: 10 + 10
for FLUX.1's 19 + 38 blocks). Only the image tokens change: ``img = img + id_weight * ca(id, img)``.

diffusers' model file is not forked: :func:`attach_pulid_flux` registers forward hooks on the blocks (each
diffusers block returns ``(encoder_hidden_states, hidden_states)``, the image tokens separate from the text ones,
for double and single blocks alike) and a pre-hook on the transformer that picks, per call, which id tokens and
which per-sample weights apply. The cross-attention modules stay outside the transformer (its ``state_dict`` and
``save_pretrained`` are untouched); :meth:`PulidFluxHandle.detach` removes every hook.

What a render sets per batch is a :class:`PulidFluxState`: id tokens ``[B, N, C]``, per-sample weights ``[B]``
(0: that sample renders exactly as without PuLID), optional negative id tokens for true CFG, and a start step
(identity only from denoising step ``start_step`` on), advanced by the pipeline's step callback.

Under an optimisation profile (:mod:`imagegen.pipelines.profiles`):

- ``torch.compile`` of the blocks: a block hook's frame is skipped by dynamo (it runs eagerly: which samples take
  identity at this step, whether a step cache skipped the block), and only :func:`add_identity`, tensors in and out,
  is compiled: one graph per input shape and layout, shared by every block, character, weight and start step. In a
  compiled block every row is computed (weight 0 for rows without identity), so shapes never depend on the batch's
  composition;
- residual step caches (First-Block, MagCache): on a skipped step the cached residual already holds every block's
  identity term of the last computed step, so the hooks add nothing there (the cache's tail block excepted:
  :func:`~imagegen.pipelines.profiles.step_skipped`), and a step where some sample's identity starts is always
  computed (:func:`~imagegen.pipelines.profiles.compute_step_when_changed`);
- quantisation: the cross-attentions are separate modules, attached after the denoiser was quantised: they keep the
  pipeline's dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from imagegen.identity.pulid.encoder import attention
from imagegen.identity.reattach import can_reattach
from imagegen.identity.steps import Phase, RowGate, StepGatedState, per_sample, pick
from imagegen.pipelines.profiles import compute_step_when_changed, step_skipped

#: attribute set on a transformer while PuLID hooks are attached (refuses a second attach)
ATTACHED_ATTR = "_imagegen_pulid_flux"


@dataclass(frozen=True)
class CrossAttentionConfig:
    """Sizes of one :class:`PerceiverAttentionCA`; the defaults are PuLID-FLUX v0.9.1's."""

    dim: int = 3072
    dim_head: int = 128
    heads: int = 16
    kv_dim: int = 2048

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], dim_head: int = 128) -> CrossAttentionConfig:
        """Sizes of the (unprefixed) state dict of one cross-attention; ``dim_head`` splits the width."""
        inner, dim = state_dict["to_q.weight"].shape
        if inner % dim_head:
            raise ValueError(f"attention width {inner} is not a multiple of dim_head {dim_head}")
        return cls(dim=dim, dim_head=dim_head, heads=inner // dim_head, kv_dim=state_dict["to_kv.weight"].shape[1])


class PerceiverAttentionCA(nn.Module):
    """Image tokens (queries) attend to the id tokens (keys/values); returns the residual ``[B, L, dim]``.

    Called as ``ca(id_tokens, img)``; keys ``norm1`` (id side), ``norm2`` (image side), ``to_q``, ``to_kv``,
    ``to_out`` as in the released checkpoint.
    """

    def __init__(self, config: CrossAttentionConfig | None = None, **sizes):
        super().__init__()
        config = config or CrossAttentionConfig(**sizes)
        self.config = config
        inner = config.dim_head * config.heads
        self.heads = config.heads
        self.norm1 = nn.LayerNorm(config.kv_dim)
        self.norm2 = nn.LayerNorm(config.dim)
        self.to_q = nn.Linear(config.dim, inner, bias=False)
        self.to_kv = nn.Linear(config.kv_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, config.dim, bias=False)

    def forward(self, id_tokens: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        id_tokens = self.norm1(id_tokens)
        img = self.norm2(img)
        k, v = self.to_kv(id_tokens).chunk(2, dim=-1)
        return self.to_out(attention(self.to_q(img), k, v, self.heads))


def ca_positions(num_double: int, num_single: int, double_interval: int, single_interval: int):
    """``[("double", i), ..., ("single", j), ...]``: the blocks followed by a cross-attention, in order."""
    if double_interval < 1 or single_interval < 1:
        raise ValueError("PuLID intervals must be >= 1")
    return [("double", i) for i in range(0, num_double, double_interval)] + [
        ("single", j) for j in range(0, num_single, single_interval)
    ]


def num_cross_attentions(num_double: int, num_single: int, double_interval: int, single_interval: int) -> int:
    return math.ceil(num_double / double_interval) + math.ceil(num_single / single_interval)


class PulidFluxState(StepGatedState):
    """The identity inputs of one batch, read by the hooks at every transformer call.

    - ``id_tokens``: ``[B, N, C]`` IDFormer output per sample (rows of samples without a character: anything,
      e.g. zeros; their weight is 0).
    - ``weight``: ``[B]`` (or a float for all) ``id_weight`` per sample; 0 leaves a sample exactly as without PuLID.
    - ``uncond_id_tokens``: ``[B, N, C]`` negative id tokens for true CFG (``IDFormer.unconditional``). When set,
      transformer calls alternate cond / uncond, which is the order diffusers' ``FluxPipeline`` makes them in.
    - ``start_step``: an int or ``[B]`` per sample; identity is applied from denoising step ``start_step`` on.
      The step is ``self.step``, which :meth:`callback` (as ``callback_on_step_end``, or chained into one with
      :meth:`chain`) advances after every step.

    The hooks run per block per step: they read the weights through :attr:`gate` (worked out on the host here for
    every step, uploaded once per device and dtype) and the tokens through :meth:`tokens_on` (converted once), so
    the loop has no host→device copy and no device→host sync (see :mod:`imagegen.identity.steps`).
    """

    def __init__(
        self,
        id_tokens: torch.Tensor,
        weight: float | Sequence[float] | torch.Tensor = 1.0,
        uncond_id_tokens: torch.Tensor | None = None,
        start_step: int | Sequence[int] | torch.Tensor = 0,
    ):
        if id_tokens.ndim != 3:
            raise ValueError(f"id_tokens must be [B, N, C], got shape {tuple(id_tokens.shape)}")
        batch = id_tokens.shape[0]
        self.id_tokens = id_tokens
        self.uncond_id_tokens = uncond_id_tokens
        if uncond_id_tokens is not None and uncond_id_tokens.shape != id_tokens.shape:
            raise ValueError(
                f"uncond_id_tokens {tuple(uncond_id_tokens.shape)} must match id_tokens {tuple(id_tokens.shape)}"
            )
        self.weight = per_sample(weight, batch, torch.float32, "weight")
        super().__init__(batch, start_step)
        #: the weights per step phase, on the host and (once per device / dtype) on the device
        self.gate = RowGate(self.weight.tolist(), self.start_step.tolist())
        self.calls = 0

    def _select(self, positions: list[int]) -> None:
        """Rows left the batch between two steps: tokens, weights and gate of the samples at ``positions`` only
        (the cond / uncond alternation of true CFG is unchanged: a step's calls come in pairs)."""
        self.id_tokens = pick(self.id_tokens, positions)
        self.uncond_id_tokens = pick(self.uncond_id_tokens, positions)
        self.weight = self.weight[positions]
        self.gate = self.gate.select(positions)
        super()._select(positions)

    def reset(self) -> None:
        """Back to step 0 (a new render with the same inputs)."""
        self.step = 0
        self.calls = 0

    def next_call(self) -> tuple[torch.Tensor, Phase]:
        """``(id tokens, phase of the current step)`` for the transformer call that is starting."""
        uncond = self.uncond_id_tokens is not None and self.calls % 2 == 1
        self.calls += 1
        return (self.uncond_id_tokens if uncond else self.id_tokens), self.gate.at(self.step)

    def tokens_on(self, tokens: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``tokens`` (``id_tokens`` or ``uncond_id_tokens``) on ``device`` in ``dtype``, converted once."""
        which = "uncond" if tokens is self.uncond_id_tokens else "cond"
        return self.cached((which, device, dtype), lambda: tokens.to(device=device, dtype=dtype))


class PulidFluxHandle:
    """PuLID attached to one transformer: set a :class:`PulidFluxState` per batch, :meth:`detach` at the end."""

    def __init__(
        self, transformer: nn.Module, cross_attentions: nn.ModuleList, double_interval: int, single_interval: int
    ):
        self.transformer = transformer
        self.cross_attentions = cross_attentions
        self.double_interval = double_interval
        self.single_interval = single_interval
        self.state: PulidFluxState | None = None
        #: ``(state, id tokens, phase)`` of the transformer call running, None when no sample takes identity in it
        self._current: tuple[PulidFluxState, torch.Tensor, Phase] | None = None
        self._hooks: list = []
        self._block_hooks: list[_BlockHook] = []

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def set_state(self, state: PulidFluxState | None) -> None:
        """The identity of the next calls (``None``: render plainly while attached)."""
        self.state = state

    @contextmanager
    def use(self, state: PulidFluxState | None) -> Iterator[PulidFluxState | None]:
        """``with handle.use(state): pipe(...)``: the state for the calls inside, cleared afterwards."""
        if state is not None and not self.attached:  # a detached handle would render without identity, silently
            raise RuntimeError("this PuLID handle was detached; attach the method again")
        previous = self.state
        self.state = state
        try:
            yield state
        finally:
            self.state = previous
            self._current = None

    def detach(self) -> None:
        """Remove every hook; the transformer computes exactly what it did before :func:`attach_pulid_flux` (the
        cross-attentions stay with the handle for :meth:`reattach`)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.state = None
        self._current = None
        if getattr(self.transformer, ATTACHED_ATTR, None) is self:
            delattr(self.transformer, ATTACHED_ATTR)

    def reattach(self) -> bool:
        """Hook the same cross-attentions in again after :meth:`detach` (False while another PuLID is attached)."""
        if self.attached:
            return True
        if not can_reattach(self.transformer, ATTACHED_ATTR):  # hooks only: no processor replaced
            return False
        self._install()
        return True

    def _install(self) -> None:
        transformer = self.transformer
        doubles, singles = transformer.transformer_blocks, transformer.single_transformer_blocks
        positions = ca_positions(len(doubles), len(singles), self.double_interval, self.single_interval)
        self._hooks.append(transformer.register_forward_pre_hook(self._before_call, with_kwargs=True))
        self._hooks.append(transformer.register_forward_hook(self._after_call))
        self._block_hooks = self._block_hooks or [_BlockHook(self, index) for index in range(len(positions))]
        for (kind, block_index), hook in zip(positions, self._block_hooks, strict=True):
            block = (doubles if kind == "double" else singles)[block_index]
            self._hooks.append(block.register_forward_hook(hook))
        setattr(transformer, ATTACHED_ATTR, self)

    # hooks -----------------------------------------------------------------------------------------------

    def _before_call(self, module, args, kwargs):
        self._current = None
        if self.state is None:
            return None
        tokens, phase = self.state.next_call()
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is not None and hidden.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"PuLID state has {tokens.shape[0]} samples but the transformer was called with {hidden.shape[0]}"
            )
        # identity switching on for some samples at this step: a step cache must not answer this call with the
        # residual of a step computed before (it would lack their identity)
        compute_step_when_changed(module, phase)
        if phase.rows:  # decided on the host: no sample takes identity at this step -> the blocks run plainly
            self._current = (self.state, tokens, phase)
        return None

    def _after_call(self, module, args, output):
        self._current = None
        return None

    @torch.compiler.disable
    def _inputs(self, index: int, img: torch.Tensor, whole_batch: bool):
        """``(cross-attention, id tokens, weights [B], rows)`` of block ``index`` in the call running; ``rows`` None
        when every row is computed (all take identity, or ``whole_batch``: rows that do not take it get weight 0,
        which adds exactly nothing, so shapes do not depend on which rows take identity).

        Reads the state on the host, so it always runs eagerly (dynamo would guard on every value read here). Runs per
        block per step: only views of tensors the state already has on the device (see
        :mod:`~imagegen.identity.steps`), no host→device copy, no device→host sync.
        """
        state, tokens, phase = self._current
        ca = self.cross_attentions[index]
        param = ca.to_q.weight
        tokens = state.tokens_on(tokens, param.device, param.dtype)
        weight = phase.values_on(img.device, img.dtype)
        rows = None if phase.all or whole_batch else phase.rows_on(img.device)
        return ca, tokens, weight, rows


def add_identity(ca: PerceiverAttentionCA, tokens: torch.Tensor, img: torch.Tensor, weight: torch.Tensor):
    """``img + weight[:, None, None] * ca(tokens, img)`` for every row (``weight`` ``[B]``; 0 adds exactly nothing).

    Tensors in, a tensor out, nothing read from Python state: called from a block that ``torch.compile`` compiled,
    dynamo compiles it as its own graph once per shape and reuses it for every block, character and weight.
    """
    param = ca.to_q.weight
    residual = ca(tokens, img.to(param.dtype)).to(img.dtype)
    return img + weight[:, None, None] * residual


class _BlockHook:
    """The forward hook of one block followed by a cross-attention (``index`` in :func:`ca_positions` order).

    It runs eagerly even inside a block ``torch.compile`` compiled (dynamo skips its frame, not the calls it makes):
    what it decides (is a sample's identity on at this step, is a step cache answering this block from its cache)
    is host state that changes per batch and per step, which compiled code would guard on and recompile for. The
    arithmetic, :func:`add_identity`, takes tensors only and is compiled there.
    """

    def __init__(self, handle: PulidFluxHandle, index: int):
        self.handle = handle
        self.index = index

    @functools.partial(torch.compiler.disable, recursive=False)
    def __call__(self, module, args, output):
        handle = self.handle
        if handle._current is None or step_skipped(module):
            # a skipped step's cached residual already carries this block's identity, of the step it was computed at
            return None
        encoder_hidden_states, img = output
        compiled = getattr(module, "_compiled_call_impl", None) is not None
        ca, tokens, weight, rows = handle._inputs(self.index, img, whole_batch=compiled)
        if rows is None:
            return encoder_hidden_states, add_identity(ca, tokens, img, weight)
        # eager only: the rows that take identity, the others untouched
        sub = img.index_select(0, rows)
        residual = ca(tokens.index_select(0, rows.to(tokens.device)), sub.to(tokens.dtype)).to(img.dtype)
        return encoder_hidden_states, img.index_copy(
            0, rows, sub + weight.index_select(0, rows)[:, None, None] * residual
        )


def attach_pulid_flux(
    transformer: nn.Module,
    cross_attentions: nn.ModuleList | Sequence[PerceiverAttentionCA],
    double_interval: int = 2,
    single_interval: int = 4,
    move: bool = True,
) -> PulidFluxHandle:
    """Hook PuLID's cross-attentions into a diffusers ``FluxTransformer2DModel``.

    ``cross_attentions[k]`` follows the ``k``-th block of :func:`ca_positions` (double blocks first). With
    ``move`` they are moved to the transformer's device and dtype. Returns the handle through which a render
    sets its :class:`PulidFluxState` and which detaches the hooks.
    """
    if getattr(transformer, ATTACHED_ATTR, None) is not None:
        raise RuntimeError("PuLID is already attached to this transformer; detach the previous handle first")
    doubles, singles = transformer.transformer_blocks, transformer.single_transformer_blocks
    positions = ca_positions(len(doubles), len(singles), double_interval, single_interval)
    cross_attentions = (
        cross_attentions if isinstance(cross_attentions, nn.ModuleList) else nn.ModuleList(cross_attentions)
    )
    if len(cross_attentions) != len(positions):
        raise ValueError(
            f"{len(cross_attentions)} PuLID cross-attentions for a transformer with {len(doubles)} double and "
            f"{len(singles)} single blocks at intervals {double_interval}/{single_interval}, which needs "
            f"{len(positions)}"
        )
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    for ca in cross_attentions:
        if ca.config.dim != width:
            raise ValueError(f"PuLID cross-attention width {ca.config.dim} does not match the transformer's {width}")
    if move:
        param = next(transformer.parameters())
        cross_attentions.to(device=param.device, dtype=param.dtype)
    cross_attentions.eval()
    handle = PulidFluxHandle(transformer, cross_attentions, double_interval, single_interval)
    handle._install()
    return handle
