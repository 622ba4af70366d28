"""EVA02-CLIP-L-14-336's visual tower, as PuLID uses it, built with timm.

PuLID feeds IDFormer two things from EVA-CLIP: the 768-d image embedding (``head(norm(x)[:, 0])``, L2-normalised
by the caller before it is concatenated with the ArcFace embedding) and five hidden states: the tokens
**entering** blocks 4, 8, 12, 16 and 20 (0-based) of the 24, CLS token kept (577 tokens at 336 px).

timm's ``eva02_large_patch14_clip_336`` is the same network; the official checkpoint
(``EVA02_CLIP_L_336_psz14_s6B.pt``, keys ``visual.*``) is renamed by ``timm.models.eva.checkpoint_filter_fn``.
The rotary tables are buffers timm computes; they are never loaded.

Tiny versions are the same timm class at other sizes (:data:`TINY_EVA_CLIP`). The hidden states are always taken
entering blocks ``depth * k / 6`` for ``k = 1..5``: ``4, 8, 12, 16, 20`` for the real 24 blocks, ``1, 2, 3, 4, 5``
for the tiny 6, so every scale of IDFormer still sees a different depth and the last block stays unused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

TIMM_MODEL = "eva02_large_patch14_clip_336"
#: OpenAI CLIP normalisation (what EVA-CLIP and PuLID use)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: the official checkpoint's prefix for the visual tower
OFFICIAL_PREFIX = "visual."


@dataclass(frozen=True)
class EvaClipConfig:
    """Sizes of the visual tower; the defaults are EVA02-CLIP-L-14-336's."""

    img_size: int = 336
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    #: width of the image embedding (the CLIP projection)
    output_dim: int = 768

    @property
    def hidden_blocks(self) -> tuple[int, ...]:
        """Indices of the blocks whose *input* tokens are returned as hidden states."""
        if self.depth % 6:
            raise ValueError(f"EVA-CLIP depth {self.depth} must be a multiple of 6 to pick 5 evenly spaced scales")
        return tuple(self.depth * k // 6 for k in range(1, 6))

    @property
    def num_tokens(self) -> int:
        return (self.img_size // self.patch_size) ** 2 + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], head_dim: int = 64) -> EvaClipConfig:
        """The sizes of an EVA-CLIP visual tower from its weights (official ``visual.*`` names, prefix optional).

        The split of the width into heads is not visible in the weights; EVA02's heads are 64 wide.
        """
        prefix = OFFICIAL_PREFIX if any(k.startswith(OFFICIAL_PREFIX) for k in state_dict) else ""
        patch = state_dict[f"{prefix}patch_embed.proj.weight"]
        width, patch_size = int(patch.shape[0]), int(patch.shape[-1])
        grid = math.isqrt(int(state_dict[f"{prefix}pos_embed"].shape[1]) - 1)
        blocks = {int(k[len(prefix) :].split(".")[1]) for k in state_dict if k.startswith(f"{prefix}blocks.")}
        if width % head_dim:
            raise ValueError(f"EVA-CLIP width {width} is not a multiple of the head width {head_dim}")
        return cls(
            img_size=grid * patch_size,
            patch_size=patch_size,
            embed_dim=width,
            depth=len(blocks),
            num_heads=width // head_dim,
            output_dim=int(state_dict[f"{prefix}head.weight"].shape[0]),
        )


EVA02_CLIP_L_336 = EvaClipConfig()
#: the tiny tower of the tiny presets' stand-in: 112 px (8x8 patches + CLS = 65 tokens), width 64, 6 blocks of one
#: 64-wide head (EVA02's head width, so its sizes read back from its weights like the released file's)
TINY_EVA_CLIP = EvaClipConfig(img_size=112, patch_size=14, embed_dim=64, depth=6, num_heads=1, output_dim=32)


class EvaClipVision(nn.Module):
    """``forward(pixels) -> (embedding [B, output_dim], hidden states: 5 x [B, tokens, embed_dim])``.

    ``pixels`` are already resized to ``config.img_size`` and normalised with :data:`CLIP_MEAN`/:data:`CLIP_STD`.
    The embedding is *not* L2-normalised (PuLID normalises it itself).
    """

    def __init__(self, config: EvaClipConfig = EVA02_CLIP_L_336):
        super().__init__()
        import timm

        self.config = config
        self.model = timm.create_model(
            TIMM_MODEL,
            pretrained=False,
            num_classes=config.output_dim,
            img_size=config.img_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
        )
        self.model.eval()

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        indices = [i - 1 for i in self.config.hidden_blocks]  # output of block i-1 = input of block i
        x, intermediates = self.model.forward_intermediates(
            pixels, indices=indices, return_prefix_tokens=True, norm=False, output_fmt="NLC"
        )
        hidden = [torch.cat((prefix, spatial), dim=1) for spatial, prefix in intermediates]
        return self.model.forward_head(x), hidden

    def load_checkpoint(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load (``strict=True``) the official EVA-CLIP layout (with or without ``visual.``) or timm's own."""
        self.model.load_state_dict(to_timm_state_dict(state_dict, self.model), strict=True)


def to_timm_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm key names for an EVA-CLIP visual state dict.

    Accepted layouts: the official full CLIP checkpoint (``visual.*``, text tower ignored), its visual tower
    without the prefix, open_clip's ``visual.trunk.*``, or timm's own names (returned as they are).
    """
    from timm.models.eva import checkpoint_filter_fn

    if "blocks.0.mlp.fc1_g.weight" in state_dict or "blocks.0.attn.norm.weight" in state_dict:
        return dict(state_dict)  # already timm's layout
    if not any(k.startswith(OFFICIAL_PREFIX) for k in state_dict):
        state_dict = {OFFICIAL_PREFIX + k: v for k, v in state_dict.items()}
    if "visual.pos_embed" not in state_dict and "visual.trunk.pos_embed" not in state_dict:
        raise ValueError("not an EVA-CLIP visual state dict: no visual.pos_embed")
    return checkpoint_filter_fn(dict(state_dict), model)


_TIMM_TO_OFFICIAL = (
    ("mlp.fc1_g.", "mlp.w1."),
    ("mlp.fc1_x.", "mlp.w2."),
    ("mlp.fc2.", "mlp.w3."),
    ("mlp.norm.", "mlp.ffn_ln."),
    ("attn.norm.", "attn.inner_attn_ln."),
    ("attn.q_proj.bias", "attn.q_bias"),
    ("attn.v_proj.bias", "attn.v_bias"),
)


def to_official_state_dict(model: EvaClipVision | nn.Module) -> dict[str, torch.Tensor]:
    """The official checkpoint's layout (``visual.*``) of a timm EVA-CLIP tower; rotary buffers left out."""
    timm_model = model.model if isinstance(model, EvaClipVision) else model
    out = {}
    for key, value in timm_model.state_dict().items():
        if "rope" in key:
            continue
        for old, new in _TIMM_TO_OFFICIAL:
            key = key.replace(old, new)
        out[OFFICIAL_PREFIX + key] = value
    return out
