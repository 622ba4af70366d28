"""SDXL family: prompt encoding (both text encoders, CFG negatives) and one batched pipeline call."""

from __future__ import annotations

import torch

from imagegen.pipelines.cancel import empty, take, take_images
from imagegen.pipelines.types import RenderRequest

Embeds = dict[str, torch.Tensor]


def uses_cfg(request: RenderRequest) -> bool:
    return (request.guidance or 0) > 1


def encode(pipe, request: RenderRequest, device: torch.device, max_sequence_length: int) -> Embeds:
    """Prompt embeddings of one request (batch dimension 1), with the negative ones when CFG is on."""
    cfg = uses_cfg(request)
    prompt_embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=request.prompt,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=cfg,
        negative_prompt=request.negative_prompt or None,
    )
    embeds = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
    if cfg:
        embeds.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
    return embeds


def embed_key(request: RenderRequest) -> tuple:
    cfg = uses_cfg(request)
    return ("sdxl", request.prompt, request.negative_prompt if cfg else None, cfg)


def call(pipe, embeds: Embeds, first: RenderRequest, generators: list[torch.Generator], callback, **extra):
    """Run the pipeline for a compatible batch; returns float images in [0, 1], shape [B, H, W, 3]."""
    return pipe(
        height=first.height,
        width=first.width,
        num_inference_steps=first.steps,
        guidance_scale=first.guidance,
        generator=generators,
        output_type="np",
        callback_on_step_end=callback,
        **embeds,
        **extra,
    ).images


#: the UNet's per-row keyword inputs (the sample and timestep come positionally)
ROW_INPUTS = ("encoder_hidden_states", "timestep_cond")
#: the per-row entries of ``added_cond_kwargs`` (SDXL micro-conditioning)
ROW_ADDED = ("text_embeds", "time_ids")
#: the IP-Adapter's per-sample image embeddings in ``added_cond_kwargs`` (a list, one tensor per adapter)
IMAGE_EMBEDS = "image_embeds"


def denoiser(pipe) -> torch.nn.Module:
    """The module called once per step with the batch's rows (``2B`` with CFG: negatives first)."""
    return pipe.unet


def denoiser_rows(args: tuple, kwargs: dict) -> int:
    sample = args[0] if args else kwargs["sample"]
    return int(sample.shape[0])


def select_rows(args: tuple, kwargs: dict, index: torch.Tensor) -> tuple[tuple, dict] | None:
    """The UNet's inputs for the rows in ``index``; None when some input may be per row unseen
    (``cross_attention_kwargs``, ``added_cond_kwargs`` beyond micro-conditioning and IP-Adapter embeddings laid
    out per sample, masks, ControlNet residuals).

    PuLID's id tokens are not inputs: the conditioning narrows its own state (``BatchConditioning.select_rows``).
    """
    if len(args) != 2:
        return None
    added = kwargs.get("added_cond_kwargs") or {}
    if set(added) - {*ROW_ADDED, IMAGE_EMBEDS}:
        return None
    for name, value in kwargs.items():
        if name in ROW_INPUTS or name in ("added_cond_kwargs", "return_dict"):
            continue
        if not empty(value):
            return None
    rows = denoiser_rows(args, kwargs)
    sample, timestep = args
    selected = {k: take(v, index, rows) if k in ROW_INPUTS else v for k, v in kwargs.items()}
    if kwargs.get("added_cond_kwargs") is not None:
        sliced = {k: take(v, index, rows) for k, v in added.items() if k != IMAGE_EMBEDS}
        if IMAGE_EMBEDS in added:
            embeds = added[IMAGE_EMBEDS]
            if not isinstance(embeds, list | tuple):
                return None
            sliced[IMAGE_EMBEDS] = [take_images(e, index, rows) for e in embeds]
            if any(e is None for e in sliced[IMAGE_EMBEDS]):
                return None
        selected["added_cond_kwargs"] = sliced
    return (take(sample, index, rows), take(timestep, index, rows)), selected
