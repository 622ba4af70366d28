"""FLUX.1 family: prompt encoding and one batched pipeline call.

Prompt embeddings come from the renderer's cache, so the pipeline is always called with
``prompt_embeds``; one CPU generator per sample makes each sample's noise independent of the
batch it lands in.
"""

from __future__ import annotations

import torch

from imagegen.pipelines.types import RenderRequest

Embeds = dict[str, torch.Tensor]


def encode(pipe, request: RenderRequest, device: torch.device, max_sequence_length: int) -> Embeds:
    """Prompt embeddings of one request (batch dimension 1), negative ones only for true CFG."""
    prompt_embeds, pooled, _ = pipe.encode_prompt(
        prompt=request.prompt, prompt_2=None, device=device, max_sequence_length=max_sequence_length
    )
    embeds = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
    if request.true_cfg_scale > 1:
        negative, negative_pooled, _ = pipe.encode_prompt(
            prompt=request.negative_prompt, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        embeds.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
    return embeds


def embed_key(request: RenderRequest) -> tuple:
    """What the prompt embeddings of a request depend on."""
    return ("flux", request.prompt, request.negative_prompt if request.true_cfg_scale > 1 else None)


def call(pipe, embeds: Embeds, first: RenderRequest, generators: list[torch.Generator], callback, **extra):
    """Run the pipeline for a compatible batch; returns float images in [0, 1], shape [B, H, W, 3]."""
    kwargs = dict(
        height=first.height,
        width=first.width,
        num_inference_steps=first.steps,
        guidance_scale=first.guidance,
        generator=generators,
        output_type="np",
        callback_on_step_end=callback,
        **embeds,
        **extra,
    )
    if first.true_cfg_scale > 1:
        kwargs["true_cfg_scale"] = first.true_cfg_scale
    return pipe(**kwargs).images
