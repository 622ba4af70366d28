"""BFL single-file FLUX.1 transformer state dict → diffusers ``FluxTransformer2DModel``, at any size.

PuLID-FLUX and the BFL reference (``flux/model.py``) name the transformer's weights ``double_blocks.*``,
``single_blocks.*``, ``img_in`` ... diffusers' own single-file converter assumes the full model's width (3072),
so it cannot convert the tiny models tests and offline runs use. This converter reads every size from the
checkpoint itself: the width from ``img_in.weight``, the head width from the QK-norm scales, the depths from the
block indices, the text and pooled widths from ``txt_in`` / ``vector_in`` and guidance embedding from the
presence of ``guidance_in``.

What is renamed (BFL → diffusers), per block:

- double block ``i`` → ``transformer_blocks.i``: ``img_mod.lin`` → ``norm1.linear``, ``txt_mod.lin`` →
  ``norm1_context.linear``, ``img_attn.qkv`` → ``attn.to_q|to_k|to_v`` (split in three),
  ``txt_attn.qkv`` → ``attn.add_q_proj|add_k_proj|add_v_proj``, QK-norm scales → ``attn.norm_q|norm_k`` and
  ``attn.norm_added_q|norm_added_k``, ``img_attn.proj`` → ``attn.to_out.0``, ``txt_attn.proj`` →
  ``attn.to_add_out``, ``img_mlp.0|2`` → ``ff.net.0.proj|ff.net.2``, ``txt_mlp`` → ``ff_context``.
- single block ``i`` → ``single_transformer_blocks.i``: ``linear1`` → ``attn.to_q|to_k|to_v`` + ``proj_mlp``
  (split by width), ``linear2`` → ``proj_out``, ``modulation.lin`` → ``norm.linear``.
- ``final_layer.adaLN_modulation.1`` → ``norm_out.linear`` with its two halves swapped (BFL chunks the
  modulation as shift, scale; diffusers as scale, shift).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

#: prefixes some single-file checkpoints put before the transformer's keys (ComfyUI, BFL full checkpoints)
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
#: BFL's default rotary axes for a 128-wide head
DEFAULT_AXES_DIMS_ROPE = (16, 56, 56)

_EMBEDDERS = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_DOUBLE_PLAIN = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE_PLAIN = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}


def strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without a known single-file prefix (``model.diffusion_model.`` ...)."""
    for prefix in KNOWN_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def split_pulid(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(transformer keys, pulid keys)``: ``pulid_ca.*`` / ``pulid_encoder.*`` are set apart from the rest."""
    pulid = {k: v for k, v in state_dict.items() if k.startswith(("pulid_ca.", "pulid_encoder."))}
    return {k: v for k, v in state_dict.items() if k not in pulid}, pulid


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    ids = {int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    if ids and ids != set(range(len(ids))):
        raise ValueError(f"{prefix}* blocks are not numbered 0..{len(ids) - 1}: {sorted(ids)}")
    return len(ids)


def bfl_flux_config(state_dict: Mapping[str, torch.Tensor], axes_dims_rope: Sequence[int] | None = None) -> dict:
    """The ``FluxTransformer2DModel`` config of a BFL-layout state dict, every size read from the weights.

    ``axes_dims_rope`` (the rotary split of a head) is not stored in the weights: BFL's ``(16, 56, 56)`` is used
    for 128-wide heads; other head widths must name theirs (it must sum to the head width).
    """
    sd = strip_prefix(state_dict)
    if "img_in.weight" not in sd or "double_blocks.0.img_attn.norm.query_norm.scale" not in sd:
        raise ValueError("not a BFL FLUX transformer state dict (no img_in.weight / double_blocks.0.*)")
    hidden, in_channels = sd["img_in.weight"].shape
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    if hidden % head_dim:
        raise ValueError(f"width {hidden} is not a multiple of the head width {head_dim}")
    mlp_hidden = sd["double_blocks.0.img_mlp.0.weight"].shape[0]
    if mlp_hidden != 4 * hidden:
        raise ValueError(f"MLP width {mlp_hidden} is not 4x the width {hidden}; diffusers' FLUX fixes mlp_ratio=4")
    if "double_blocks.0.img_attn.qkv.bias" not in sd:
        raise ValueError("qkv without bias is not supported by diffusers' FluxTransformer2DModel")
    if axes_dims_rope is None:
        if head_dim != sum(DEFAULT_AXES_DIMS_ROPE):
            raise ValueError(f"head width {head_dim}: pass axes_dims_rope (three even sizes summing to {head_dim})")
        axes_dims_rope = DEFAULT_AXES_DIMS_ROPE
    if sum(axes_dims_rope) != head_dim:
        raise ValueError(f"axes_dims_rope {tuple(axes_dims_rope)} must sum to the head width {head_dim}")
    out_channels = sd["final_layer.linear.weight"].shape[0]
    return {
        "patch_size": 1,
        "in_channels": int(in_channels),
        "out_channels": int(out_channels) if out_channels != in_channels else None,
        "num_layers": _count_blocks(sd, "double_blocks."),
        "num_single_layers": _count_blocks(sd, "single_blocks."),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(hidden // head_dim),
        "joint_attention_dim": int(sd["txt_in.weight"].shape[1]),
        "pooled_projection_dim": int(sd["vector_in.in_layer.weight"].shape[1]),
        "guidance_embeds": "guidance_in.in_layer.weight" in sd,
        "axes_dims_rope": tuple(int(a) for a in axes_dims_rope),
    }


def _copy(out: dict, sd: Mapping[str, torch.Tensor], src: str, dst: str, used: set) -> None:
    for suffix in (".weight", ".bias"):
        if src + suffix in sd:
            out[dst + suffix] = sd[src + suffix]
            used.add(src + suffix)


def _split(out: dict, sd: Mapping[str, torch.Tensor], src: str, dsts: Sequence[str], sizes, used: set) -> None:
    for suffix in (".weight", ".bias"):
        if src + suffix in sd:
            for dst, part in zip(dsts, torch.split(sd[src + suffix], list(sizes), dim=0), strict=True):
                out[dst + suffix] = part.clone()
            used.add(src + suffix)


def convert_bfl_flux_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split) a BFL-layout FLUX transformer state dict into diffusers' layout.

    ``pulid_*`` keys are ignored (see :func:`split_pulid`); any other key that is not converted raises, so a
    checkpoint of another architecture is never silently half-loaded.
    """
    sd, _ = split_pulid(strip_prefix(state_dict))
    if "img_in.weight" not in sd or "double_blocks.0.img_mlp.0.weight" not in sd:
        raise ValueError("not a BFL FLUX transformer state dict (no img_in.weight / double_blocks.0.*)")
    hidden = sd["img_in.weight"].shape[0]
    mlp_hidden = sd["double_blocks.0.img_mlp.0.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for src, dst in _EMBEDDERS.items():
        _copy(out, sd, src, dst, used)
    for key in ("final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"):
        if key in sd:
            shift, scale = sd[key].chunk(2, dim=0)
            out["norm_out.linear." + key.rsplit(".", 1)[1]] = torch.cat([scale, shift], dim=0)
            used.add(key)
    for i in range(_count_blocks(sd, "double_blocks.")):
        src, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for a, b in _DOUBLE_PLAIN.items():
            _copy(out, sd, src + a, dst + b, used)
        for a, b in _DOUBLE_NORMS.items():
            out[dst + b] = sd[src + a]
            used.add(src + a)
        qkv = [dst + "attn.to_q", dst + "attn.to_k", dst + "attn.to_v"]
        _split(out, sd, src + "img_attn.qkv", qkv, (hidden,) * 3, used)
        added = [dst + "attn.add_q_proj", dst + "attn.add_k_proj", dst + "attn.add_v_proj"]
        _split(out, sd, src + "txt_attn.qkv", added, (hidden,) * 3, used)
    for i in range(_count_blocks(sd, "single_blocks.")):
        src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for a, b in _SINGLE_PLAIN.items():
            _copy(out, sd, src + a, dst + b, used)
        for a, b in _SINGLE_NORMS.items():
            out[dst + b] = sd[src + a]
            used.add(src + a)
        parts = [dst + "attn.to_q", dst + "attn.to_k", dst + "attn.to_v", dst + "proj_mlp"]
        _split(out, sd, src + "linear1", parts, (hidden, hidden, hidden, mlp_hidden), used)
    left = sorted(set(sd) - used)
    if left:
        raise ValueError(f"{len(left)} BFL FLUX keys were not converted, e.g. {left[:5]}")
    return out


def flux_transformer_from_bfl(
    state_dict: Mapping[str, torch.Tensor],
    axes_dims_rope: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
):
    """A diffusers ``FluxTransformer2DModel`` built and loaded (``strict=True``) from a BFL-layout state dict."""
    from diffusers import FluxTransformer2DModel

    sd, _ = split_pulid(strip_prefix(state_dict))
    config = bfl_flux_config(sd, axes_dims_rope)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    converted = convert_bfl_flux_to_diffusers(sd)
    if dtype is not None:
        converted = {k: v.to(dtype) for k, v in converted.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    # buffers are not in the checkpoint; FLUX's transformer has none, so nothing stays on the meta device
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise ValueError(f"parameters missing from the checkpoint: {leftovers[:5]}")
    return model.eval()
