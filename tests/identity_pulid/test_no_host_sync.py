"""No host syncs in the denoising loop: identity weights and step gates reach the device once per pipeline call.

The hooks of PuLID (FLUX, SDXL) and of the per-sample IP-Adapter run per layer per step. On a GPU, a host→device
copy there (a CPU tensor ``.to(device)``) or a device→host read (``.item()``, ``bool(t)``, ``.nonzero()``,
``.cpu()``) blocks until every queued kernel has run. Host-device traffic is not observable on a CPU-only
machine, so the models here are built on the ``meta`` device and every aten op of a few denoising steps is
recorded (:class:`OpRecorder`): any op that also touches a CPU tensor is host data entering the loop, and
``_local_scalar_dense`` & co. are syncs. The first step may upload the state's tables (a fixed number of copies,
whatever the number of layers); later steps, including those where a sample's start step switches it on, must not
touch the host at all.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from imagegen.identity.ipadapter.adapter import (
    CallGate,
    IPAdapterState,
    PerSampleFluxProcessor,
    PerSampleSDXLProcessor,
    RowLoRA,
)
from imagegen.identity.pulid.flux_ca import (
    CrossAttentionConfig,
    PerceiverAttentionCA,
    PulidFluxState,
    attach_pulid_flux,
)
from imagegen.identity.pulid.sdxl_processor import PulidSDXLAttnProcessor, PulidSDXLHandle, PulidSDXLState

META = torch.device("meta")
#: ops that read a tensor's value back to the host (``.item()``, ``bool()``, ``.tolist()``, data-dependent shapes)
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.equal.default"}
SYNC_PREFIXES = ("aten.nonzero", "aten.masked_select", "aten.unique")
#: the most copies a state may make to the device in the first step (values and row-index tables)
MAX_UPLOADS = 2
COPY_OPS = ("aten._to_copy.", "aten.to.", "aten.copy_.")
STEPS = 4
LAYERS = 6


class OpRecorder(TorchDispatchMode):
    """Every aten op run inside, with whether it touched a CPU tensor (input or output) or reads values back."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = pytree.tree_leaves((args, kwargs, out))
        on_host = any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in leaves)
        self.ops.append((str(func), on_host))
        return out

    @property
    def host_ops(self) -> list[str]:
        return [name for name, on_host in self.ops if on_host]

    @property
    def syncs(self) -> list[str]:
        return [name for name, _ in self.ops if name in SYNC_OPS or name.startswith(SYNC_PREFIXES)]


def run_steps(state, step_fn) -> list[OpRecorder]:
    """``step_fn()`` (the model calls of one denoising step) for :data:`STEPS` steps, the ops of each recorded; the
    step advances through the state's ``callback``, as the pipeline's ``callback_on_step_end`` does."""
    recorders = []
    for step in range(STEPS):
        recorder = OpRecorder()
        with torch.inference_mode(), recorder:
            step_fn()
        recorders.append(recorder)
        state.callback(None, step, None, {})
    return recorders


def assert_no_host_traffic(recorders: list[OpRecorder], baseline: int) -> None:
    assert all(len(r.ops) > baseline for r in recorders), "the identity did not run in every step"
    for step, recorder in enumerate(recorders):
        assert not recorder.syncs, f"step {step}: device->host reads {recorder.syncs}"
    first = recorders[0].host_ops
    assert len(first) <= MAX_UPLOADS and all(name.startswith(COPY_OPS) for name in first), f"step 0 host ops: {first}"
    for step, recorder in enumerate(recorders[1:], start=1):
        assert not recorder.host_ops, f"step {step}: ops on host tensors {recorder.host_ops}"


def count_ops(fn) -> int:
    recorder = OpRecorder()
    with torch.inference_mode(), recorder:
        fn()
    return len(recorder.ops)


def test_pulid_flux_hooks():
    with META:
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=LAYERS // 2,
            num_single_layers=LAYERS // 2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ).to(torch.bfloat16)
        config = CrossAttentionConfig(dim=32, dim_head=16, heads=2, kv_dim=48)
        cas = [PerceiverAttentionCA(config) for _ in range(LAYERS)]
        inputs = dict(
            hidden_states=torch.randn(2, 16, 16, dtype=torch.bfloat16),
            encoder_hidden_states=torch.randn(2, 6, 32, dtype=torch.bfloat16),
            pooled_projections=torch.randn(2, 32, dtype=torch.bfloat16),
            img_ids=torch.zeros(16, 3),
            txt_ids=torch.zeros(6, 3),
            timestep=torch.ones(2, dtype=torch.bfloat16),
            guidance=torch.ones(2, dtype=torch.bfloat16),
        )
        tokens, negative = torch.randn(2, 8, 48), torch.randn(2, 8, 48)  # float32: cast to the model's dtype
    handle = attach_pulid_flux(transformer, cas, 1, 1)
    try:
        baseline = count_ops(lambda: transformer(**inputs, return_dict=False))
        # sample 1 starts at step 2; true CFG: two transformer calls per step (cond, then uncond id tokens)
        state = PulidFluxState(tokens, [1.0, 0.5], uncond_id_tokens=negative, start_step=[0, 2])
        with handle.use(state):
            recorders = run_steps(state, lambda: [transformer(**inputs, return_dict=False) for _ in range(2)])
        assert_no_host_traffic(recorders, 2 * baseline)
    finally:
        handle.detach()


def sdxl_attentions(processor) -> list[Attention]:
    layers = []
    with META:
        for _ in range(LAYERS):
            attn = Attention(query_dim=64, cross_attention_dim=48, heads=2, dim_head=32, bias=False, out_bias=True)
            attn.set_processor(processor())
            layers.append(attn)
    return layers


@pytest.mark.parametrize("ortho", [None, "v2"])
def test_pulid_sdxl_processors(ortho):
    handle = PulidSDXLHandle(None, {}, {})
    layers = sdxl_attentions(lambda: PulidSDXLAttnProcessor(64, 48, handle).to(META))
    with META:
        hidden, text = torch.randn(4, 16, 64), torch.randn(4, 7, 48)  # a CFG batch of 2 samples
        tokens, negative = torch.randn(2, 32, 48), torch.randn(2, 32, 48)
    baseline = count_ops(lambda: [attn(hidden, text) for attn in layers])
    state = PulidSDXLState(tokens, [0.8, 0.5], uncond_id_tokens=negative, num_zero=8, ortho=ortho, start_step=[0, 2])
    with handle.use(state):
        recorders = run_steps(state, lambda: [attn(hidden, text) for attn in layers])
    assert_no_host_traffic(recorders, baseline)


def test_ip_adapter_processors_and_lora():
    state = IPAdapterState([0.7, 1.0], 2, start_step=[0, 2])
    handle = SimpleNamespace(state=None, gate=CallGate())
    layers = sdxl_attentions(
        lambda: PerSampleSDXLProcessor(
            AttnProcessor2_0(), IPAdapterAttnProcessor2_0(64, 48, num_tokens=(4,), scale=1.0).to(META), handle
        )
    )
    with META:
        for attn in layers:  # FaceID's LoRA on the queries
            attn.to_q.register_forward_hook(RowLoRA(torch.randn(4, 64), torch.randn(64, 4), handle.gate))
        hidden, text, ip_tokens = torch.randn(4, 16, 64), torch.randn(4, 7, 48), torch.randn(4, 4, 48)
    flux = PerSampleFluxProcessor(
        lambda attn, h, c, mask, rope: (h, c), lambda attn, h, c, mask, rope, ip: (h, c, 2 * h), handle
    )

    def step():
        handle.gate.begin(handle.state, 4, META)  # what the model's forward pre-hook does, once per model call
        for attn in layers:
            attn(hidden, encoder_hidden_states=(text, [ip_tokens]))
            flux(attn, hidden, text, ip_hidden_states=[ip_tokens])

    baseline = count_ops(step)  # disarmed: the plain processors
    handle.state = state
    assert_no_host_traffic(run_steps(state, step), baseline)
