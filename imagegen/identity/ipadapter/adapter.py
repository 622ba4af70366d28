"""IP-Adapters loaded by diffusers, made per-sample: a batch may mix characters, weights and start steps.

diffusers' IP-Adapter conditions a whole pipeline call on one set of image embeddings at one scale per layer. A
render batch here mixes characters and samples without one, so :func:`attach_ip_adapter` lets diffusers'
``load_ip_adapter`` build everything (image projection, IP attention processors, from the released file) and then
wraps what it built, without forking any of it:

- **embeddings per sample, through ``ip_adapter_image_embeds``.** The pipelines repeat the embeddings they are
  given for every sample of the batch, so a batch of ``B`` passes its ``B`` samples' embeddings as ``B`` "images"
  (``[1, B, ...]``, ``[2, B, ...]`` with SDXL's CFG negatives first); :class:`PerSampleProjection` (installed as
  the model's ``encoder_hid_proj``) keeps, for every row of the model's batch, the image of its own sample, and
  runs diffusers' projection on that: each row attends to its own character only.
- **scale per sample.** diffusers' ``IPAdapterAttnProcessor2_0`` adds its IP attention to the text attention
  before the output projection. A forward hook on its ``to_v_ip`` (:class:`RowScaledValues`) multiplies each row's
  image-token values by that row's scale; attention is linear in its values, so one pass of diffusers' own code
  computes ``to_out(text + s * ip)`` for every row, which is diffusers' scale ``s`` (a row at scale 1 *is* diffusers'
  output; at scale 0 it adds exactly nothing to the text attention). :class:`PerSampleFluxProcessor` scales the IP
  output diffusers' FLUX processor returns separately. When no row of a call takes the adapter, only the original
  processor runs.
- **FaceID's LoRA per sample.** diffusers would load it through PEFT for the whole batch; it is applied here by
  forward hooks on ``to_q``/``to_k``/``to_v``/``to_out.0`` for the rows whose identity is on at that step, or,
  while every row of the calls takes it, merged into the weights in place for the batch (:mod:`.lora`).
- **armed per batch only.** Outside :meth:`IPAdapterHandle.armed` the model has no ``encoder_hid_proj`` and every
  processor falls back to the original one, so a plain render with the adapter attached is the plain pipeline.

:meth:`IPAdapterHandle.detach` puts back the very processor objects, projection attribute, config values and
pipeline components the model and pipeline had before, and removes every hook.

Under an optimisation profile: the wrapped processors and LoRA hooks run inside blocks ``torch.compile`` traces, so
they read nothing but a :class:`CallGate` (a boolean and per-row tensors) that a forward pre-hook on the model fills
once per model call: no recompile per character, weight or start step, no graph break. The IP processors sit inside
the blocks a residual step cache skips, so a skipped step's residual carries their output (and a step where a
sample's adapter starts is always computed). On a quantised denoiser the adapter's own modules keep the pipeline's
precision; with fused projections (SDXL ``fuse_qkv``) FaceID's LoRA also hooks the fused ``to_qkv`` / ``to_kv``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from imagegen.identity.fixed_address import FixedSlots
from imagegen.identity.ipadapter.keep import KeptProjection, keep_projections
from imagegen.identity.ipadapter.lora import GATES, FaceIDLoRA, FusedRowLoRA, RowLoRA
from imagegen.identity.ipadapter.weights import AdapterFiles, IPAdapterWeightsError
from imagegen.identity.reattach import can_reattach
from imagegen.identity.steps import Phase, StepGatedState, per_sample, pick
from imagegen.pipelines.profiles import compute_step_when_changed

log = logging.getLogger(__name__)

#: attribute set on a UNet / transformer while an IP-Adapter handle is attached (refuses a second attach)
ATTACHED_ATTR = "_imagegen_ipadapter"
_MISSING = object()
LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out")


class IPAdapterState(StepGatedState):
    """The identity inputs of one batch of ``B`` samples that the wrapped layers read while armed.

    - ``scale``: per sample ``[B]`` (0: the sample renders exactly as without the adapter).
    - ``start_step``: the adapter acts from this denoising step on (int or ``[B]``); the step is advanced by
      :meth:`callback`, used as (or chained into) the pipeline's ``callback_on_step_end``.
    - ``layer_inputs``: per-sample tensors some projections read from an attribute rather than from the
      embeddings (FaceID-Plus's CLIP hidden states: ``{"clip_embeds": ([B, 1, T, C] cond, [B, 1, T, C] uncond)}``).

    The wrapped layers run per layer per step; they read the scales through :meth:`phase`, worked out on the host
    here for every step and uploaded once per device and dtype (see :mod:`imagegen.identity.steps`), so the
    loop has no host→device copy and no device→host sync of its own.
    """

    label = "IP-Adapter"

    def __init__(
        self,
        scale: float | Sequence[float] | torch.Tensor,
        batch: int,
        start_step: int | Sequence[int] | torch.Tensor = 0,
        layer_inputs: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        self.scale = per_sample(scale, batch, torch.float32, "scale")
        super().__init__(batch, start_step)
        self.layer_inputs = dict(layer_inputs or {})
        # both halves of a CFG batch [negative, positive] take their sample's scale
        self.gates = self.row_gates(self.scale.tolist())

    def _select(self, positions: list[int]) -> None:
        """Rows left the batch between two steps: scales and layer inputs of the samples at ``positions`` only (the
        image embeddings come sliced with the model call's inputs, ``imagegen.pipelines.cancel.take_images``)."""
        self.scale = self.scale[positions]
        self.layer_inputs = {
            name: (pick(cond, positions), pick(uncond, positions)) for name, (cond, uncond) in self.layer_inputs.items()
        }
        super()._select(positions)

    def rows(self, count: int, per_sample_values: torch.Tensor, negative: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row values for a model call on ``count`` rows: ``B`` samples, or ``2B`` = ``[negative, positive]``."""
        self.check_rows(count)
        if count == self.batch_size:
            return per_sample_values
        return torch.cat([per_sample_values if negative is None else negative, per_sample_values])

    def layer_input(self, name: str, count: int) -> torch.Tensor:
        cond, uncond = self.layer_inputs[name]
        return self.rows(count, cond, uncond)


class CallGate:
    """Which rows of the model call running take the adapter, as tensors: what the wrapped layers read.

    A forward pre-hook on the model (:meth:`IPAdapterHandle._before_call`, eager: the model itself is not compiled,
    only its repeated blocks are) works it out once per model call from the armed state's step phase (see
    :mod:`imagegen.identity.steps`: tables already on the device, no host traffic). The layers inside the
    blocks then read only these attributes of one long-lived object: a boolean and tensors whose shapes depend on
    the number of rows only, so blocks compiled by ``torch.compile`` are neither recompiled per character, weight or
    start step nor broken up by the state's Python bookkeeping. The tensors are copied into fixed slots when the
    phase changes (:mod:`imagegen.identity.fixed_address`): a compiled block reads them as static inputs, which CUDA
    graphs need at the addresses they were recorded with.
    """

    def __init__(self):
        #: the scales of the phase last begun, at fixed addresses (see :mod:`imagegen.identity.fixed_address`)
        self.slots = FixedSlots()
        self._held: tuple[Phase, torch.device, torch.dtype, tuple[torch.Tensor, ...]] | None = None
        self.clear()

    def clear(self) -> None:
        #: any row of this call takes the adapter (False: the wrapped layers run the original processor only)
        self.active = False
        #: every row takes it at scale exactly 1 (eager shortcut: diffusers' values as they are)
        self.all_one = False
        #: ``[R]`` float32 scale per row at this step (0: the row renders as without the adapter)
        self.scale: torch.Tensor | None = None
        #: ``[R]``: the same in the model call's dtype (what :class:`RowScaledValues` multiplies by)
        self.scale_rows: torch.Tensor | None = None
        #: ``[R]`` float32, 1 for the rows that take the adapter at this step, else 0 (FaceID's LoRA)
        self.on: torch.Tensor | None = None
        #: indices of the rows that take it, None when all do (eager paths only)
        self.rows: torch.Tensor | None = None

    def begin(
        self, state: IPAdapterState | None, count: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> Phase | None:
        """The gate of a model call on ``count`` rows of ``dtype`` at ``state``'s current step (cleared without a
        state); the step phase it was made from."""
        self.clear()
        if state is None:
            return None
        phase = state.phase(count)  # decided on the host; raises for a row count the state does not fit
        if phase.rows:
            self.active = True
            self.all_one = all(v == 1 for v in phase.values)
            self.scale, self.on, self.scale_rows = self._scales(phase, device, dtype)
            self.rows = None if phase.all else phase.rows_on(device)
            # the row count is the model's batch: dynamo may treat it as symbolic, as it does the batch itself when a
            # second batch size comes (these tensors, read through hook objects, would otherwise stay static and pin
            # the batch, so every batch size would recompile)
            torch._dynamo.maybe_mark_dynamic(self.scale, 0)
            torch._dynamo.maybe_mark_dynamic(self.on, 0)
            torch._dynamo.maybe_mark_dynamic(self.scale_rows, 0)
        return phase

    def _scales(
        self, phase: Phase, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scale, on, scale_rows)`` of ``phase`` held in the slots: copied on the device when the phase changes (a
        new batch or a start step reached), the same tensors for the other calls of a phase."""
        held = self._held
        if held is None or held[0] is not phase or held[1] != device or held[2] != dtype:
            scale = self.slots.hold("scale", phase.values_on(device, torch.float32))
            on = self.slots.hold("on", (scale != 0).float())  # on the device: no host traffic
            rows = self.slots.hold("scale_rows", phase.values_on(device, dtype))
            held = self._held = (phase, device, dtype, (scale, on, rows))
        return held[3]

    def forget(self) -> None:
        """Drop what a batch left (the slots and their addresses stay for the next one)."""
        self._held = None
        self.clear()


class IPAdapterHandle:
    """An IP-Adapter attached to one pipeline: arm it per batch with :meth:`armed`, :meth:`detach` at the end."""

    def __init__(self, pipe, model: nn.Module, family: str):
        self.pipe = pipe
        self.model = model
        self.family = family
        self.state: IPAdapterState | None = None
        self.projection: nn.Module | None = None
        self.attached = False
        self._processors: dict = {}
        self._model_attrs: dict[str, object] = {}
        self._config_attrs: dict[str, object] = {}
        self._pipe_components: dict[str, object] = {}
        self._pipe_config = None
        #: FaceID's LoRA (None for adapters without one)
        self.lora: FaceIDLoRA | None = None
        #: the IP processors' image-token projections, kept per batch (:mod:`.keep`)
        self.kept: list[KeptProjection] = []
        #: the processors installed while attached (diffusers' IP processors wrapped, the others as they were)
        self._installed: dict = {}
        #: SDXL: ``(to_v_ip linear, hook)`` scaling each row's image-token values (:class:`RowScaledValues`)
        self._scaled_values: list[tuple[nn.Linear, RowScaledValues]] = []
        self._value_hooks: list = []
        self._call_hook = None
        #: the rows of the model call running that take the adapter (set by :meth:`_before_call`)
        self.gate = CallGate()

    def _before_call(self, module, args, kwargs):
        """Forward pre-hook on the model: the gate of this call, and a step cache told when the step phase changed."""
        state = self.state
        if state is None:
            self.gate.clear()
            return None
        hidden = kwargs.get("hidden_states" if self.family == "flux" else "sample", args[0] if args else None)
        phase = self.gate.begin(state, hidden.shape[0], hidden.device, hidden.dtype)
        if self.lora is not None:
            self.lora.for_call(self.gate, hidden.device)
        # a sample's adapter switching on at this step: a step cache must not answer this call with the residual of a
        # step computed before (it would lack that sample's identity)
        compute_step_when_changed(module, phase)
        return None

    # snapshot / restore of everything diffusers' loader changes -------------------------------------------

    def _snapshot(self) -> None:
        self._processors = dict(self.model.attn_processors)
        for name in ("encoder_hid_proj",):
            self._model_attrs[name] = self._raw_attr(self.model, name)
        self._config_attrs["encoder_hid_dim_type"] = self.model.config.__dict__.get("encoder_hid_dim_type", _MISSING)
        for name in ("image_encoder", "feature_extractor"):
            if hasattr(self.pipe, name):
                self._pipe_components[name] = getattr(self.pipe, name)
        self._pipe_config = self.pipe._internal_dict

    @staticmethod
    def _raw_attr(module: nn.Module, name: str):
        if name in module._modules:
            return ("module", module._modules[name])
        if name in module.__dict__:
            return ("plain", module.__dict__[name])
        return ("absent", None)

    def _restore_model(self) -> None:
        for name, (kind, value) in self._model_attrs.items():
            if name in self.model._modules:
                del self.model._modules[name]
            self.model.__dict__.pop(name, None)
            if kind == "module":
                self.model._modules[name] = value
            elif kind == "plain":
                self.model.__dict__[name] = value
        config = self.model.config
        for name, value in self._config_attrs.items():
            if value is _MISSING:
                config.__dict__.pop(name, None)
            else:
                config.__dict__[name] = value

    def _restore_pipe(self) -> None:
        for name, value in self._pipe_components.items():
            if getattr(self.pipe, name, None) is not value:
                setattr(self.pipe, name, value)
        # the pipeline's config object itself (setting a component re-registers it in a new config)
        self.pipe._internal_dict = self._pipe_config

    # arming per batch --------------------------------------------------------------------------------------

    @contextmanager
    def armed(self, state: IPAdapterState) -> Iterator[IPAdapterState]:
        """The adapter acts on the model calls inside the block, per ``state``; disarmed afterwards."""
        if not self.attached:
            raise RuntimeError("this IP-Adapter handle was detached; attach the method again")
        if self.state is not None:
            raise RuntimeError("the IP-Adapter is already armed (one batch at a time)")
        self.state = state
        self.model.encoder_hid_proj = PerSampleProjection(self.projection, self)
        if self.family == "sdxl":
            self.model.config.__dict__["encoder_hid_dim_type"] = "ip_image_proj"
        try:
            yield state
        finally:
            self.state = None
            self.gate.forget()
            if self.lora is not None:
                self.lora.end_batch()
            for kept in self.kept:
                kept.forget()
            self._restore_model()
            # FLUX's transformer leaves the projected IP tokens in the pipeline's joint_attention_kwargs (the next
            # call resets them): drop them now rather than keep the last batch's tensors alive
            leftover = getattr(self.pipe, "_joint_attention_kwargs", None)
            if isinstance(leftover, dict):
                leftover.pop("ip_hidden_states", None)
                leftover.pop("ip_adapter_image_embeds", None)

    def detach(self) -> None:
        """Put back everything the pipeline and the model had before :func:`attach_ip_adapter`. What diffusers built
        (processors, projection) and the LoRA, the hooks and the gate's fixed slots stay with the handle for
        :meth:`reattach` (see :mod:`imagegen.identity.reattach`)."""
        if not self.attached:
            return
        if self.lora is not None:
            self.lora.unhook()
        for kept in self.kept:
            kept.remove()
        for hook in self._value_hooks:
            hook.remove()
        self._value_hooks.clear()
        if self._call_hook is not None:
            self._call_hook.remove()
            self._call_hook = None
        self.state = None
        self.gate.forget()
        if GATES.get(id(self.model)) is self.gate:
            GATES.pop(id(self.model))
        self.model.set_attn_processor(dict(self._processors))
        self._restore_model()
        if getattr(self.model, ATTACHED_ATTR, None) is self:
            delattr(self.model, ATTACHED_ATTR)
        self.attached = False

    def reattach(self) -> bool:
        """Install the same layers again after :meth:`detach`: no file read, no module built; False (nothing changed)
        when the model's processors are no longer the ones they were built around."""
        if self.attached:
            return True
        if not can_reattach(self.model, ATTACHED_ATTR, self._processors):
            return False
        self._install()
        return True

    def _install(self) -> None:
        """The wrapped processors, the value-scaling hooks, the kept projections, the LoRA's hooks (after the first
        attach: :func:`_install_lora` adds them as it builds the LoRA) and the gate's pre-hook on the model."""
        model = self.model
        model.set_attn_processor(dict(self._installed))
        for kept in self.kept:
            kept.install()
        if self._scaled_values:
            GATES[id(model)] = self.gate
            self._value_hooks = [linear.register_forward_hook(hook) for linear, hook in self._scaled_values]
        if self.lora is not None:
            self.lora.hook()
        self._call_hook = model.register_forward_pre_hook(self._before_call, with_kwargs=True)
        setattr(model, ATTACHED_ATTR, self)
        self.attached = True


class PerSampleProjection(nn.Module):
    """The model's ``encoder_hid_proj`` while armed: each row's own sample's embeddings, through diffusers' projection.

    Row ``r`` of a model call on ``R`` rows takes image ``r mod B`` of the ``B`` images the pipeline repeated for
    every row (rows are ``[negative, positive]`` halves under SDXL's CFG).

    The UNet runs its ``encoder_hid_proj`` at every denoising step on the same embeddings (diffusers' SDXL pipeline
    builds them once per call), and FaceID-Plus's projection is a few dozen layers: each step would pay them again,
    on the host too in eager mode. So the projected tokens are kept for the very embedding and layer-input tensors
    they were made from (this object lives for one armed batch; rows leaving the batch bring new tensors).
    """

    def __init__(self, projection: nn.Module, handle: IPAdapterHandle):
        super().__init__()
        self.projection = projection
        self.__dict__["handle"] = handle
        #: ``(inputs, projected)``: the tensors projected (kept alive: compared by identity) and the output
        self.__dict__["_kept"] = None

    @property
    def num_ip_adapters(self) -> int:
        return self.projection.num_ip_adapters

    @property
    def image_projection_layers(self) -> nn.ModuleList:
        return self.projection.image_projection_layers

    def forward(self, image_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        if torch.compiler.is_compiling():
            return self._project(image_embeds)
        state = self.handle.state
        extra = [t for pair in (state.layer_inputs.values() if state is not None else ()) for t in pair]
        inputs = (*image_embeds, *extra)
        kept = self._kept
        if kept is not None and len(kept[0]) == len(inputs):
            if all(a is b for a, b in zip(kept[0], inputs, strict=True)):
                return list(kept[1])
        projected = self._project(image_embeds)
        self.__dict__["_kept"] = (inputs, tuple(projected))
        return projected

    def _project(self, image_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        picked = []
        for embeds in image_embeds:
            rows, images = embeds.shape[0], embeds.shape[1]
            if rows % images:
                raise ValueError(f"{rows} rows cannot each take one of {images} per-sample embeddings")
            index = torch.arange(rows, device=embeds.device)
            picked.append(embeds[index, index % images].unsqueeze(1))
        rows = picked[0].shape[0]
        state = self.handle.state
        layers = list(self.projection.image_projection_layers)
        extra = state.layer_inputs if state is not None else {}
        for name in extra:
            for layer in layers:
                setattr(layer, name, state.layer_input(name, rows))
        try:
            return self.projection(picked)
        finally:
            for name in extra:
                for layer in layers:
                    setattr(layer, name, None)


class _PerSampleProcessor(nn.Module):
    """Owns diffusers' IP processor (``ip``); refers to the layer's original processor and the handle."""

    def __init__(self, plain, ip: nn.Module, handle: IPAdapterHandle):
        super().__init__()
        self.ip = ip
        # plain attributes, not submodules: the original processor and the handle are not owned here
        self.__dict__["plain"] = plain
        self.__dict__["handle"] = handle


class RowScaledValues:
    """A forward hook on an SDXL IP processor's ``to_v_ip``: the image tokens' values of each row times that row's
    scale at this step. Attention is linear in its values, so diffusers' processor (at its own scale, 1) then adds
    ``s * ip`` to each row's text attention before the output projection: diffusers' scale ``s``, per row, in one
    pass. A row at scale 1 is diffusers' output bit for bit (``v * 1``), a row at scale 0 adds exactly nothing.

    The gate is looked up in :data:`~imagegen.identity.ipadapter.lora.GATES` (by the model's ``id``), as FaceID's
    LoRA hooks do: reached through a module's hook, its tensors would pin the batch size of a compiled block.
    """

    def __init__(self, key: int):
        self.key = key

    def __call__(self, module, args, output: torch.Tensor) -> torch.Tensor | None:
        gate = GATES[self.key]
        if not torch.compiler.is_compiling() and gate.all_one:  # compiled code does not branch on weights
            return None
        rows = gate.scale_rows
        if rows.dtype != output.dtype:
            rows = rows.to(output.dtype)
        # values [R, tokens, width], or [R, images, tokens, width]: one scale per row either way
        return output * rows.view((-1,) + (1,) * (output.ndim - 1))


class PerSampleSDXLProcessor(_PerSampleProcessor):
    """A UNet cross-attention: diffusers' IP-Adapter processor, its IP attention scaled per row by the values of its
    image tokens (:class:`RowScaledValues`), or the original processor for calls where no row takes the adapter.

    One pass computes ``to_out(text + s * ip)`` for every row (it used to run both processors and mix their outputs:
    the text attention twice per layer under compile). A row at scale 0 runs the original processor's operations
    plus exactly nothing, unless that one runs fused projections (``fuse_qkv`` profiles: within their tolerance).
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.handle.gate.active or not isinstance(encoder_hidden_states, tuple):
            text = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
            return self.plain(attn, hidden_states, encoder_hidden_states=text, attention_mask=attention_mask, temb=temb)
        return self.ip(attn, hidden_states, encoder_hidden_states, attention_mask=attention_mask, temb=temb)


class PerSampleFluxProcessor(_PerSampleProcessor):
    """A FLUX double-block attention: diffusers' IP-Adapter processor, its IP output scaled per row."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
        ip_hidden_states: list[torch.Tensor] | None = None,
        ip_adapter_masks=None,
    ):
        gate = self.handle.gate
        if not gate.active or ip_hidden_states is None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        hidden, context, ip_out = self.ip(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, ip_hidden_states
        )
        # x * 1 is x exactly: rows at scale 1 are diffusers' output, rows at 0 add exactly nothing
        rows = gate.scale_rows if gate.scale_rows.dtype == ip_out.dtype else gate.scale.to(ip_out.dtype)
        s = rows.view((-1,) + (1,) * (ip_out.ndim - 1))
        return hidden, context, ip_out * s


@dataclass
class LoadSpec:
    """What :func:`attach_ip_adapter` hands diffusers' loader."""

    files: AdapterFiles
    #: ``{"image_proj": ..., "ip_adapter": ...}`` to load instead of reading the file (FaceID: without its LoRA)
    state_dict: dict | None = None
    #: FaceID's LoRA, ``{index: {"to_q": (down, up), ...}}`` by processor index (released numbering)
    lora: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None
    #: attributes set on every image projection layer (FaceID-PlusV2: ``shortcut=True``)
    projection_attrs: dict | None = None


def split_faceid_lora(
    ip_adapter: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """``(IP weights, LoRA by processor index)`` of a FaceID ``ip_adapter`` state dict (released key names)."""
    ip, lora = {}, {}
    for key, value in ip_adapter.items():
        index, _, rest = key.partition(".")
        layer = rest.split("_lora.", 1)[0]
        if "_lora." in rest and layer in LORA_LAYERS:
            lora.setdefault(int(index), {}).setdefault(layer, {})[rest.rsplit(".", 2)[-2]] = value
        else:
            ip[key] = value
    pairs = {}
    for index, layers in lora.items():
        for layer, parts in layers.items():
            if set(parts) != {"down", "up"}:
                raise IPAdapterWeightsError(f"FaceID LoRA of processor {index}.{layer} lacks its down or up weight")
            pairs.setdefault(index, {})[layer] = (parts["down"], parts["up"])
    return ip, pairs


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers warns that no image encoder is loaded: imagegen encodes references itself, at registration."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


@contextmanager
def _model_stays_put(model: nn.Module) -> Iterator[None]:
    """diffusers' UNet loader ends with ``unet.to(dtype=unet.dtype, device=unet.device)``, a no-op for a model already
    there, which torchao's quantised weights (an optimisation profile's int8 / fp8) cannot run: it is skipped while
    the adapter loads, and what the loader built is moved to the model's device and dtype by the caller."""
    model.__dict__["to"] = lambda *args, **kwargs: model
    try:
        yield
    finally:
        model.__dict__.pop("to", None)


def _model_place(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and float dtype of ``model``'s unquantised parameters (what new adapter modules take)."""
    for param in model.parameters():
        if type(param) in (torch.Tensor, nn.Parameter) and param.is_floating_point():
            return param.device, param.dtype
    return model.device, model.dtype


def _load(pipe, family: str, spec: LoadSpec) -> None:
    files = spec.files
    source = spec.state_dict if spec.state_dict is not None else str(files.adapter_dir)
    with _quiet_diffusers():
        if family == "sdxl":
            with _model_stays_put(pipe.unet):
                pipe.load_ip_adapter(
                    source,
                    subfolder=files.source.subfolder,
                    weight_name=files.source.weight_name,
                    image_encoder_folder=None,
                    local_files_only=True,
                )
            device, dtype = _model_place(pipe.unet)
            for processor in pipe.unet.attn_processors.values():
                if isinstance(processor, nn.Module):
                    processor.to(device=device, dtype=dtype)
            pipe.unet.encoder_hid_proj.to(device=device, dtype=dtype)
        else:
            pipe.load_ip_adapter(
                source,
                weight_name=files.source.weight_name,
                subfolder=files.source.subfolder,
                image_encoder_pretrained_model_name_or_path=None,
                local_files_only=True,
            )


def _check_ip_keys(unet, spec: LoadSpec) -> None:
    """The file's ``ip_adapter.*`` keys are exactly ``to_k_ip``/``to_v_ip`` of every cross-attention of ``unet``."""
    ip_keys = set(spec.state_dict["ip_adapter"])
    expected = set()
    for index, name in enumerate(unet.attn_processors):
        if not name.endswith("attn1.processor"):
            expected |= {f"{index}.to_k_ip.weight", f"{index}.to_v_ip.weight"}
    ip_keys = {k for k in ip_keys if "_lora." not in k}
    if ip_keys != expected:
        missing, unexpected = sorted(expected - ip_keys), sorted(ip_keys - expected)
        raise ValueError(f"ip_adapter keys do not fit this UNet: missing {missing[:4]}, unexpected {unexpected[:4]}")


def _check_filled(projection, processors: Mapping) -> None:
    """Nothing diffusers built for the adapter is left unfilled (still on the meta device) by the file."""
    modules = [projection, *(p for p in processors.values() if isinstance(p, torch.nn.Module))]
    for module in modules:
        empty = [n for n, t in module.named_parameters() if t.is_meta]
        if empty and not all(t.is_meta for t in module.parameters()):
            raise ValueError(f"the file leaves {type(module).__name__} weights unfilled: {empty[:4]}")


def attach_ip_adapter(pipe, family: str, spec: LoadSpec) -> IPAdapterHandle:
    """Load an IP-Adapter into ``pipe`` with diffusers' ``load_ip_adapter``, made per-sample (see the module doc)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    model = pipe.unet if family == "sdxl" else pipe.transformer
    if getattr(model, ATTACHED_ATTR, None) is not None:
        raise RuntimeError("an IP-Adapter is already attached to this model; detach the previous handle first")
    handle = IPAdapterHandle(pipe, model, family)
    handle._snapshot()
    try:
        if family == "sdxl":
            if spec.state_dict is None:  # read once: checked here, then handed to diffusers as it is
                from imagegen.identity.ipadapter.weights import read_adapter_state_dict

                spec = replace(spec, state_dict=read_adapter_state_dict(spec.files.weight_file))
            _check_ip_keys(model, spec)  # diffusers skips unknown keys and leaves missing ones unfilled
        _load(pipe, family, spec)
        loaded = model.attn_processors
        projection = model.encoder_hid_proj
        _check_filled(projection, loaded)
    except Exception as exc:
        # the model first (diffusers' projection adds attention layers of its own), then its processors
        handle._restore_model()
        model.set_attn_processor(dict(handle._processors))
        handle._restore_pipe()
        raise IPAdapterWeightsError(
            f"{spec.files.weight_file} could not be loaded into this {family} model by diffusers: {str(exc)[:600]}"
        ) from exc
    # keep what diffusers built; leave the model and pipeline as they were until a batch arms the adapter
    handle._restore_model()
    handle._restore_pipe()
    handle.projection = projection
    for layer in projection.image_projection_layers:
        for name, value in (spec.projection_attrs or {}).items():
            setattr(layer, name, value)
    wrapper = PerSampleSDXLProcessor if family == "sdxl" else PerSampleFluxProcessor
    ip_types = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, FluxIPAdapterAttnProcessor)
    for name, original in handle._processors.items():
        current = loaded[name]
        if isinstance(current, ip_types):
            handle._installed[name] = wrapper(original, current, handle)
            handle.kept += keep_projections(current, model)
            if family == "sdxl":
                handle._scaled_values += [(v, RowScaledValues(id(model))) for v in current.to_v_ip]
        else:
            handle._installed[name] = original
    handle._install()
    if spec.lora:
        _install_lora(handle, spec.lora)
    return handle


def _install_lora(handle: IPAdapterHandle, lora: Mapping[int, Mapping[str, tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """FaceID's LoRA (:class:`FaceIDLoRA`) on the attention layers the released indices name."""
    model = handle.model
    handle.lora = FaceIDLoRA(model)
    names = list(handle._processors)
    if set(lora) - set(range(len(names))):
        handle.detach()
        raise IPAdapterWeightsError(
            f"the FaceID LoRA names processors {sorted(set(lora) - set(range(len(names))))[:8]} but this UNet has "
            f"{len(names)}: is the checkpoint for another UNet architecture?"
        )
    param = next(model.parameters())
    for index, layers in lora.items():
        attn = model.get_submodule(names[index][: -len(".processor")])
        moved = {}
        for layer, (down, up) in layers.items():
            linear = attn.to_out[0] if layer == "to_out" else getattr(attn, layer)
            if down.shape[1] != linear.in_features or up.shape[0] != linear.out_features:
                handle.detach()
                raise IPAdapterWeightsError(
                    f"FaceID LoRA {index}.{layer} is {tuple(up.shape[0:1]) + tuple(down.shape[1:])} (out, in) but "
                    f"{names[index]} has {linear.out_features} x {linear.in_features}"
                )
            moved[layer] = (
                down.to(device=param.device, dtype=param.dtype),
                up.to(device=param.device, dtype=param.dtype),
            )
            handle.lora.add(linear, RowLoRA(*moved[layer], handle.gate, id(model)))
        # fused projections (an optimisation profile's fuse_qkv): the original processors compute q, k, v through
        # to_qkv (self-attention) or k, v through to_kv (cross-attention); the IP processors still use to_q/k/v
        for fused, parts in (("to_qkv", ("to_q", "to_k", "to_v")), ("to_kv", ("to_k", "to_v"))):
            linear = getattr(attn, fused, None) if getattr(attn, "fused_projections", False) else None
            if linear is None:
                continue
            if not set(parts) <= set(moved):
                handle.detach()
                raise IPAdapterWeightsError(
                    f"FaceID LoRA of processor {index} lacks {sorted(set(parts) - set(moved))} for the fused "
                    f"{fused} of {names[index]}: render with a profile without fuse_qkv"
                )
            handle.lora.add(linear, FusedRowLoRA([moved[p] for p in parts], handle.gate, id(model)))


def describe(handle: IPAdapterHandle) -> dict[str, object]:
    """What is attached (for logs and tests): processor and projection classes diffusers built."""
    wrapped = [
        p
        for p in handle.model.attn_processors.values()
        if isinstance(p, PerSampleSDXLProcessor | PerSampleFluxProcessor)
    ]
    return {
        "family": handle.family,
        "ip_processors": sorted({type(p.ip).__name__ for p in wrapped}),
        "wrapped_layers": len(wrapped),
        "projections": [type(layer).__name__ for layer in handle.projection.image_projection_layers],
        "lora_hooks": len(handle.lora.targets) if handle.lora is not None else 0,
    }


__all__ = [
    "ATTACHED_ATTR",
    "CallGate",
    "FusedRowLoRA",
    "IPAdapterHandle",
    "IPAdapterState",
    "LoadSpec",
    "PerSampleFluxProcessor",
    "PerSampleProjection",
    "PerSampleSDXLProcessor",
    "RowLoRA",
    "attach_ip_adapter",
    "describe",
    "split_faceid_lora",
]
