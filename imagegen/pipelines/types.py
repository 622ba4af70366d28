"""What a render is asked for and what it returns.

``RenderRequest`` is validated twice: statically by pydantic (types, value ranges that hold for
every model) and against a preset by ``check_against`` (sizes and steps the preset allows). A
request may leave size, steps and guidance out; ``resolved`` fills them from the preset.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from imagegen.errors import InvalidRequestError
from imagegen.ids import validate_character_id
from imagegen.pipelines.presets import Preset

MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 2000


class RenderRequest(BaseModel):
    """One image to render."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)
    steps: int | None = Field(default=None, ge=1)
    guidance: float | None = Field(default=None, ge=0, le=50)
    #: FLUX only: true classifier-free guidance with the negative prompt when > 1 (doubles the cost)
    true_cfg_scale: float = Field(default=1.0, ge=1.0, le=50)
    #: registered character whose face to render (None: no identity conditioning)
    character: str | None = Field(default=None, max_length=64)
    #: the character's registration this request may render (None: whichever is current). The service pins the
    #: version it authorised the caller against, so a character deleted and registered again under the same id (by
    #: anyone) while the request waited is refused by the renderer instead of rendered with the new face
    character_version: int | None = Field(default=None, ge=1)
    #: strength of the identity conditioning (0 = none)
    identity_weight: float = Field(default=1.0, ge=0, le=3)
    #: identity only from this denoising step on (later = more freedom for composition)
    identity_start_step: int = Field(default=0, ge=0)
    #: identity method (None: the preset's default, from configs/models.yaml)
    method: str | None = Field(default=None, max_length=64)

    @field_validator("character")
    @classmethod
    def _character_slug(cls, value: str | None) -> str | None:
        return None if value is None else validate_character_id(value)

    def resolved(self, preset: Preset) -> RenderRequest:
        """This request with every default filled from the preset and a seed drawn if none was given."""
        d = preset.defaults
        return self.model_copy(
            update={
                "seed": self.seed if self.seed is not None else random.SystemRandom().randrange(2**32),
                "width": self.width or d.width,
                "height": self.height or d.height,
                "steps": self.steps or d.steps,
                "guidance": d.guidance if self.guidance is None else self.guidance,
            }
        )

    def check_against(self, preset: Preset) -> None:
        """Raise ``InvalidRequestError`` naming the field when the preset cannot render this request."""
        lim = preset.limits
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            if not lim.min_size <= value <= lim.max_size:
                raise InvalidRequestError(
                    f"{name} {value} is outside [{lim.min_size}, {lim.max_size}] for preset '{preset.name}'",
                    field=name,
                )
            if value % preset.size_multiple:
                raise InvalidRequestError(
                    f"{name} {value} must be a multiple of {preset.size_multiple} for preset '{preset.name}'",
                    field=name,
                )
        if self.steps is not None and self.steps > lim.max_steps:
            raise InvalidRequestError(
                f"steps {self.steps} is above the maximum {lim.max_steps} for preset '{preset.name}'",
                field="steps",
            )
        if self.true_cfg_scale > 1 and preset.family != "flux":
            raise InvalidRequestError(
                "true_cfg_scale applies to FLUX presets only; SDXL uses guidance for classifier-free guidance",
                field="true_cfg_scale",
            )

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call (identity is per sample)."""
        return (self.width, self.height, self.steps, self.guidance, self.true_cfg_scale)


@dataclass
class RenderResult:
    """A rendered image and everything needed to reproduce it."""

    request: RenderRequest  # resolved: seed, size, steps and guidance filled in
    preset: str
    image: Image.Image | None
    #: "nan" or "black" when the pipeline produced an unusable image (``image`` is then None)
    problem: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    #: the pipeline call this image came from: id (unique per renderer), size, distinct characters
    batch: dict[str, Any] = field(default_factory=dict)
    #: the optimisation profile the renderer ran (``imagegen.pipelines.profiles``): part of the recipe, since
    #: profiles other than ``quality`` render within stated tolerances of it, not bit for bit
    profile: str = "quality"

    @property
    def seed(self) -> int:
        assert self.request.seed is not None
        return self.request.seed

    @property
    def ok(self) -> bool:
        return self.problem is None

    def metadata(self) -> dict[str, Any]:
        """What gets written next to the pixels (PNG text chunks, HTTP responses)."""
        req = self.request
        return {
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "seed": req.seed,
            "preset": self.preset,
            "profile": self.profile,
            "width": req.width,
            "height": req.height,
            "steps": req.steps,
            "guidance": req.guidance,
            "true_cfg_scale": req.true_cfg_scale,
            "character": req.character,
            "identity_weight": req.identity_weight if req.character else None,
            "identity_start_step": req.identity_start_step if req.character else None,
            "method": req.method,
            "timings": self.timings,
            "versions": self.versions,
        }
