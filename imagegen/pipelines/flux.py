"""FLUX.1 family: prompt encoding and one batched pipeline call.

Prompt embeddings come from the renderer's cache, so the pipeline is always called with
``prompt_embeds``; one CPU generator per sample makes each sample's noise independent of the
batch it lands in.
"""

from __future__ import annotations

import torch

from imagegen.pipelines.cancel import empty, take, take_images
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
#: what ``joint_attention_kwargs`` may hold in a sliced call: the IP-Adapter's per-sample image embeddings, and
#: the projected tokens the transformer left there in the previous call (projected again from the embeddings)
JOINT_IP = ("ip_adapter_image_embeds", "ip_hidden_states")


def denoiser(pipe) -> torch.nn.Module:
    """The module called once per step (twice with true CFG) with the batch's rows."""
    return pipe.transformer


def denoiser_rows(args: tuple, kwargs: dict) -> int:
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return int(hidden.shape[0])


def select_rows(args: tuple, kwargs: dict, index: torch.Tensor) -> tuple[tuple, dict] | None:
    """The transformer's inputs for the rows in ``index``; None when some input may be per row unseen
    (anything in ``joint_attention_kwargs`` but IP-Adapter embeddings laid out per sample, ControlNet residuals).

    PuLID's id tokens are not inputs: the conditioning narrows its own state (``BatchConditioning.select_rows``).
    """
    if args:
        return None
    rows = denoiser_rows(args, kwargs)
    selected = {}
    for name, value in kwargs.items():
        if name in ROW_INPUTS:
            selected[name] = take(value, index, rows)
        elif name == "joint_attention_kwargs" and not empty(value):
            joint = _joint_attention(value, index, rows)
            if joint is None:
                return None
            selected[name] = joint
        elif name in SHARED_INPUTS or empty(value):
            selected[name] = value
        else:
            return None
    return args, selected


def _joint_attention(joint, index: torch.Tensor, rows: int) -> dict | None:
    """A new ``joint_attention_kwargs`` with the IP-Adapter embeddings of the rows in ``index`` (the pipeline's own
    dict, which the transformer edits, is left alone); None when it holds anything else."""
    if not isinstance(joint, dict) or set(joint) - set(JOINT_IP) or "ip_adapter_image_embeds" not in joint:
        return None
    embeds = joint["ip_adapter_image_embeds"]
    if not isinstance(embeds, list | tuple):
        return None
    sliced = [take_images(e, index, rows) for e in embeds]
    if any(e is None for e in sliced):
        return None
    return {"ip_adapter_image_embeds": sliced}
