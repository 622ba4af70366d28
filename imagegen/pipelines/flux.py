"""FLUX.1 family: prompt encoding and one batched pipeline call.

Prompt embeddings come from the renderer's cache, so the pipeline is always called with
``prompt_embeds``; one CPU generator per sample makes each sample's noise independent of the
batch it lands in.
"""

from __future__ import annotations

import torch

from imagegen.pipelines.cancel import empty, take
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


#: the transformer's per-row inputs (``txt_ids`` / ``img_ids`` are per token, shared by every row)
ROW_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
#: inputs that may be passed as long as they carry nothing (anything else: the call is not sliced)
SHARED_INPUTS = ("txt_ids", "img_ids", "return_dict", "controlnet_blocks_repeat")


def denoiser(pipe) -> torch.nn.Module:
    """The module called once per step (twice with true CFG) with the batch's rows."""
    return pipe.transformer


def denoiser_rows(args: tuple, kwargs: dict) -> int:
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return int(hidden.shape[0])


def select_rows(args: tuple, kwargs: dict, index: torch.Tensor) -> tuple[tuple, dict] | None:
    """The transformer's inputs for the rows in ``index``; None when some input may be per row unseen
    (identity or IP-Adapter tensors in ``joint_attention_kwargs``, ControlNet residuals)."""
    if args:
        return None
    for name, value in kwargs.items():
        if name in ROW_INPUTS or name in SHARED_INPUTS:
            continue
        if not empty(value):
            return None
    rows = denoiser_rows(args, kwargs)
    return args, {k: take(v, index, rows) if k in ROW_INPUTS else v for k, v in kwargs.items()}
