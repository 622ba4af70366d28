"""IDFormer: PuLID's id encoder, shared by PuLID-FLUX v0.9.1 and PuLID v1.1 (SDXL).

It turns one face into ``num_queries`` id tokens of width ``output_dim``:

- ``x``: the id vector, ``[B, id_dim]`` (or ``[B, n_images, id_dim]`` for several reference images): the raw
  ArcFace embedding concatenated with the L2-normalised EVA-CLIP image embedding (512 + 768 = 1280).
- ``y``: the EVA-CLIP hidden states, one ``[B, n_images * tokens, vit_dim]`` tensor per scale (5 scales).

A perceiver resampler: learned query latents plus the id vector's ``num_id_token`` tokens attend, scale by scale,
to the id tokens and the mapped ViT features. Parameter names are those of the released checkpoints
(``pulid_encoder.*`` in ``pulid_flux_v0.9.1.safetensors``, ``id_adapter.*`` in ``pulid_v1.1.safetensors``), so
their state dicts load with ``strict=True``. Every size is a constructor argument, so tiny versions can be built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class IDFormerConfig:
    """Sizes of an IDFormer; the defaults are the released model's."""

    dim: int = 1024
    depth: int = 10
    dim_head: int = 64
    heads: int = 16
    num_id_token: int = 5
    num_queries: int = 32
    output_dim: int = 2048
    ff_mult: int = 4
    #: width of the id vector: ArcFace (512) + EVA-CLIP embedding (768)
    id_dim: int = 1280
    #: width of the MLP that maps the id vector to id tokens
    id_hidden: int = 1024
    #: width of the EVA-CLIP hidden states
    vit_dim: int = 1024
    #: width of the MLPs that map each scale of hidden states
    vit_hidden: int = 1024
    #: number of hidden-state scales (``mapping_0`` ... ``mapping_{n-1}``); ``depth`` is split evenly over them
    num_scales: int = 5

    def __post_init__(self):
        if self.depth % self.num_scales:
            raise ValueError(f"IDFormer depth {self.depth} must be a multiple of num_scales {self.num_scales}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], dim_head: int = 64) -> IDFormerConfig:
        """The sizes of the IDFormer whose (unprefixed) state dict this is.

        The split of the attention width into heads is not visible in the weights; ``dim_head`` (64 in the
        released checkpoints) decides it.
        """
        latents = state_dict["latents"]
        dim = latents.shape[-1]
        inner = state_dict["layers.0.0.to_q.weight"].shape[0]
        if inner % dim_head:
            raise ValueError(f"attention width {inner} is not a multiple of dim_head {dim_head}")
        layer_ids = {int(k.split(".")[1]) for k in state_dict if k.startswith("layers.")}
        scale_ids = {int(k.split(".")[0][len("mapping_") :]) for k in state_dict if k.startswith("mapping_")}
        return cls(
            dim=dim,
            depth=len(layer_ids),
            dim_head=dim_head,
            heads=inner // dim_head,
            num_id_token=state_dict["id_embedding_mapping.6.weight"].shape[0] // dim,
            num_queries=latents.shape[1],
            output_dim=state_dict["proj_out"].shape[1],
            ff_mult=state_dict["layers.0.1.1.weight"].shape[0] // dim,
            id_dim=state_dict["id_embedding_mapping.0.weight"].shape[1],
            id_hidden=state_dict["id_embedding_mapping.0.weight"].shape[0],
            vit_dim=state_dict["mapping_0.0.weight"].shape[1],
            vit_hidden=state_dict["mapping_0.0.weight"].shape[0],
            num_scales=len(scale_ids),
        )


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, heads * d]`` → ``[B, heads, L, d]``."""
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, L, d]`` → ``[B, L, heads * d]``."""
    batch, heads, length, width = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * width)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax attention without mask; inputs and output are ``[B, L, heads * d]``."""
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
    return merge_heads(out)


class PerceiverAttention(nn.Module):
    """Latents attend to ``cat(context, latents)`` (the IDFormer layer's attention)."""

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8, kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        kv_dim = kv_dim or dim
        self.norm1 = nn.LayerNorm(kv_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        context = self.norm1(context)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((context, latents), dim=1)).chunk(2, dim=-1)
        return self.to_out(attention(q, k, v, self.heads))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """Pre-norm GELU MLP without biases (keys ``0`` norm, ``1`` up, ``3`` down)."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


def _mapping(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.LayerNorm(hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, hidden),
        nn.LayerNorm(hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, out_dim),
    )


class IDFormer(nn.Module):
    """The id encoder: ``forward(x, y) -> [B, num_queries, output_dim]`` id tokens."""

    def __init__(self, config: IDFormerConfig | None = None, **sizes):
        super().__init__()
        config = config or IDFormerConfig(**sizes)
        self.config = config
        c = config
        self.layers_per_scale = c.depth // c.num_scales
        scale = c.dim**-0.5
        self.latents = nn.Parameter(torch.randn(1, c.num_queries, c.dim) * scale)
        self.proj_out = nn.Parameter(torch.randn(c.dim, c.output_dim) * scale)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PerceiverAttention(dim=c.dim, dim_head=c.dim_head, heads=c.heads), feed_forward(c.dim, c.ff_mult)]
            )
            for _ in range(c.depth)
        )
        for i in range(c.num_scales):
            setattr(self, f"mapping_{i}", _mapping(c.vit_dim, c.vit_hidden, c.dim))
        self.id_embedding_mapping = _mapping(c.id_dim, c.id_hidden, c.dim * c.num_id_token)

    def forward(self, x: torch.Tensor, y: Sequence[torch.Tensor]) -> torch.Tensor:
        c = self.config
        if len(y) != c.num_scales:
            raise ValueError(f"IDFormer takes {c.num_scales} hidden-state scales, got {len(y)}")
        batch = x.shape[0]
        n_images = x.shape[1] if x.ndim == 3 else 1
        id_tokens = self.id_embedding_mapping(x).reshape(batch, c.num_id_token * n_images, c.dim)
        latents = torch.cat((self.latents.expand(batch, -1, -1), id_tokens), dim=1)
        for i in range(c.num_scales):
            context = torch.cat((id_tokens, getattr(self, f"mapping_{i}")(y[i])), dim=1)
            for attn, ff in self.layers[i * self.layers_per_scale : (i + 1) * self.layers_per_scale]:
                latents = attn(context, latents) + latents
                latents = ff(latents) + latents
        return latents[:, : c.num_queries] @ self.proj_out

    def unconditional(self, x: torch.Tensor, y: Sequence[torch.Tensor]) -> torch.Tensor:
        """The negative id tokens PuLID uses for CFG: the encoding of all-zero inputs of *one* image.

        ``x``/``y`` are the conditional inputs (one or several images); only their batch size, widths and
        per-image token count are used, as upstream zeroes the first image's inputs whatever their number.
        """
        n_images = x.shape[1] if x.ndim == 3 else 1
        zeros_x = x.new_zeros(x.shape[0], x.shape[-1])
        zeros_y = [h.new_zeros(h.shape[0], h.shape[1] // n_images, h.shape[2]) for h in y]
        return self(zeros_x, zeros_y)
