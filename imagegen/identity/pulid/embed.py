"""From aligned face crops to PuLID id tokens, the way PuLID computes them.

Per reference image: the aligned face crop (5 landmarks, 512 px) has its background and hair painted white
(BiSeNet labels :data:`BACKGROUND_LABELS`; the caller supplies that mask) and the rest turned to grayscale, is
resized (bicubic) to EVA-CLIP's input size and normalised with the OpenAI CLIP mean/std. EVA-CLIP gives the
embedding (L2-normalised here) and five hidden states. The id vector is the **raw** ArcFace embedding
(``face.embedding``, not the normalised one) concatenated with that embedding.

Several images of one character are stacked (``x: [1, n, id_dim]``, hidden states concatenated along the tokens)
and encoded together; the negative id tokens are the encoding of zeros of one image
(:meth:`IDFormer.unconditional`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from imagegen.identity.pulid.encoder import IDFormer
from imagegen.identity.pulid.eva_clip import CLIP_MEAN, CLIP_STD, EvaClipVision

#: BiSeNet face-parsing labels PuLID paints white (background, hair, hat, ears, earrings, neck, cloth...)
BACKGROUND_LABELS = (0, 16, 18, 7, 8, 9, 14, 15)


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of ``[n, 3, H, W]`` RGB, repeated on the three channels."""
    gray = 0.299 * images[:, 0:1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3]
    return gray.repeat(1, 3, 1, 1)


def background_mask(parsing: torch.Tensor) -> torch.Tensor:
    """``[n, 1, H, W]`` bool: True where a face-parsing label map (``[n, 1, H, W]`` ints) is background/hair."""
    return torch.isin(parsing, torch.tensor(BACKGROUND_LABELS, device=parsing.device))


def eva_pixels(faces: torch.Tensor, img_size: int, background: torch.Tensor | None = None) -> torch.Tensor:
    """EVA-CLIP input from aligned face crops ``[n, 3, H, W]`` in [0, 1] (RGB).

    ``background`` (``[n, 1, H, W]`` bool, see :func:`background_mask`) is painted white and the rest turned
    to grayscale; without it the whole crop is turned to grayscale.
    """
    features = to_gray(faces)
    if background is not None:
        features = torch.where(background, torch.ones_like(faces), features)
    features = F.interpolate(features, size=(img_size, img_size), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=faces.device, dtype=faces.dtype)[None, :, None, None]
    std = torch.tensor(CLIP_STD, device=faces.device, dtype=faces.dtype)[None, :, None, None]
    return (features - mean) / std


def id_inputs(
    eva: EvaClipVision, arcface: torch.Tensor, pixels: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """IDFormer inputs of one character from ``n`` reference faces.

    ``arcface``: ``[n, 512]`` raw ArcFace embeddings; ``pixels``: ``[n, 3, S, S]`` from :func:`eva_pixels`.
    Returns ``x: [1, n, id_dim]`` and the hidden states ``[1, n * tokens, width]`` per scale.
    """
    if arcface.ndim != 2 or arcface.shape[0] != pixels.shape[0]:
        raise ValueError(f"need one ArcFace embedding per face image: {tuple(arcface.shape)} vs {pixels.shape[0]}")
    embedding, hidden = eva(pixels)
    embedding = F.normalize(embedding, dim=-1)
    x = torch.cat([arcface.to(embedding), embedding], dim=-1).unsqueeze(0)
    y = [h.reshape(1, -1, h.shape[-1]) for h in hidden]
    return x, y


@torch.inference_mode()
def id_tokens(
    encoder: IDFormer, eva: EvaClipVision, arcface: torch.Tensor, pixels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(id tokens, negative id tokens)``, each ``[1, num_queries, output_dim]``, of one character."""
    x, y = id_inputs(eva, arcface, pixels)
    x, y = x.to(encoder.latents), [h.to(encoder.latents) for h in y]
    return encoder(x, y), encoder.unconditional(x, y)


def stack_batch(tokens: Sequence[torch.Tensor | None], template: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, N, C]`` id tokens of a batch and a ``[B]`` mask of the samples that have any.

    ``tokens[i]`` is a character's ``[1, N, C]`` (or ``[N, C]``) tokens or None for a sample without one (its
    row is zeros; give it weight 0). ``template`` fixes shape, dtype and device.
    """
    rows, present = [], []
    for t in tokens:
        present.append(t is not None)
        rows.append(torch.zeros_like(template) if t is None else t.reshape(template.shape).to(template))
    return torch.stack(rows), torch.tensor(present)
