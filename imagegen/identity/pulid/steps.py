"""What the FLUX and SDXL PuLID batch states share: per-sample values and the denoising-step gate."""

from __future__ import annotations

from collections.abc import Callable

import torch


def per_sample(value, batch: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``value`` (a number, a sequence or a tensor) as a CPU tensor of one value per sample ``[batch]``."""
    tensor = torch.as_tensor(value, dtype=dtype).detach().cpu()
    if tensor.ndim == 0:
        tensor = tensor.expand(batch).clone()
    if tensor.shape != (batch,):
        raise ValueError(f"{name} must be a number or have one value per sample ({batch}), got {tuple(tensor.shape)}")
    return tensor


class StepGatedState:
    """Identity inputs of one batch that switch on per sample from denoising step ``start_step``.

    ``self.step`` is the step about to run; :meth:`callback` (a diffusers ``callback_on_step_end``)
    advances it, so the pipeline's own loop drives the gate.
    """

    id_tokens: torch.Tensor
    start_step: torch.Tensor
    step: int = 0

    @property
    def batch_size(self) -> int:
        return self.id_tokens.shape[0]

    def gate(self, values: torch.Tensor) -> torch.Tensor:
        """``values [B]`` where the sample's identity is on at the current step, 0 elsewhere."""
        return torch.where(self.step >= self.start_step, values, torch.zeros_like(values))

    def callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """A diffusers ``callback_on_step_end``: step ``step`` is done, the next one is ``step + 1``."""
        self.step = step + 1
        return callback_kwargs

    def chain(self, callback: Callable | None) -> Callable:
        """A ``callback_on_step_end`` that advances this state, then calls ``callback`` (when given)."""

        def on_step_end(pipe, step, timestep, callback_kwargs):
            callback_kwargs = self.callback(pipe, step, timestep, callback_kwargs)
            return callback(pipe, step, timestep, callback_kwargs) if callback is not None else callback_kwargs

        return on_step_end
