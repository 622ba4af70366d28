"""SDXL family: prompt encoding (both text encoders, CFG negatives) and one batched pipeline call."""

from __future__ import annotations

import torch

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
