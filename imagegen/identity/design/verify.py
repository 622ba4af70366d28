"""Re-render an image from its recipe: the evidence a designed character's provenance offers anyone.

A kept image's recipe (``recipe.py``) names everything its render used: preset, profile, method,
prompt, seed, size, steps, guidance, identity weight and the digests of the parent images its
identity was computed from. ``rerender`` checks the parents against those digests, computes the
identity from them with the recipe's method (the code registration uses), renders the recipe
alone and returns the image; ``difference`` measures it against the stored one. A synthetic
character's parents are renders too, re-rendered from their own recipes first
(``rerender_chain``); an upload's parent must be supplied by whoever holds it.

Tolerance (README "Artists"): a re-render on the same kind of device and dtype is held to a maximum
absolute difference of ``MAX_ABS_DIFF`` and a mean of ``MAX_MEAN_DIFF`` (0-255 scale): batching
and threading change float rounding, not the picture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from imagegen.errors import ImagegenError
from imagegen.identity.design.recipe import pixel_digest, request_of
from imagegen.identity.methods import create_method, resolve_method
from imagegen.pipelines.conditioning import Conditioner, Tensors
from imagegen.pipelines.presets import Preset, get_preset
from imagegen.pipelines.renderer import Renderer
from imagegen.settings import Settings, get_settings

#: the re-render tolerance on one device type and dtype (0-255 scale; see the module docstring)
MAX_ABS_DIFF = 8
MAX_MEAN_DIFF = 1.0
#: the character name a re-render's identity goes by (the parents' identity, not a registered one)
PARENTS = "recipe-parents"


class RecipeMismatchError(ImagegenError):
    """Parent images that are not the ones the recipe names."""

    code = "recipe_mismatch"
    field = "parents"


class ParentIdentity:
    """An ``IdentityProvider`` whose one identity is computed from given parent images (no registry)."""

    def __init__(self, parents: Sequence[Image.Image], settings: Settings):
        self.parents = [p.convert("RGB") for p in parents]
        self.settings = settings

    def resolve_method(self, preset: Preset, requested: str | None) -> str:
        return resolve_method(preset, requested)

    def load(self, name: str, preset: Preset, device: torch.device, dtype: torch.dtype) -> Conditioner:
        return create_method(name, preset, device, dtype, self.settings)

    def tensors_for(self, character: str, conditioner: Conditioner, version: int | None = None) -> Tensors:
        return {k: v.detach().cpu() for k, v in conditioner.compute(self.parents).items()}  # type: ignore[attr-defined]


def check_parents(recipe: Mapping[str, Any], parents: Sequence[Image.Image]) -> None:
    """Refuse parents whose pixels are not the ones the recipe names (in order)."""
    expected = list(recipe.get("parents") or [])
    given = [pixel_digest(p) for p in parents]
    if given != expected:
        raise RecipeMismatchError(
            f"the recipe names {len(expected)} parent image(s) ({', '.join(d[:12] for d in expected) or 'none'}); "
            f"the given ones are {', '.join(d[:12] for d in given) or 'none'}"
        )


def rerender(
    recipe: Mapping[str, Any],
    parents: Sequence[Image.Image] = (),
    *,
    settings: Settings | None = None,
    device: str | None = None,
) -> Image.Image:
    """Render ``recipe`` again (its identity from ``parents``, checked against the recipe's digests)."""
    settings = settings or get_settings()
    check_parents(recipe, parents)
    conditioned = bool(recipe.get("method")) and bool(recipe.get("parents"))
    renderer = Renderer(
        get_preset(recipe["preset"]),
        settings=settings,
        device=device,
        identity=ParentIdentity(parents, settings) if conditioned else None,
        profile=recipe.get("profile"),
    )
    result = renderer.render([request_of(recipe, character=PARENTS if conditioned else None)])[0]
    if result.image is None:
        raise ImagegenError(f"the re-render came out unusable ({result.problem})")
    return result.image


def rerender_chain(
    recipe: Mapping[str, Any], parents_by_digest: Mapping[str, Mapping[str, Any]], **kwargs
) -> Image.Image:
    """Re-render a synthetic image: each parent from its own recipe first (they are renders too)."""
    parents = []
    for digest in recipe.get("parents") or []:
        parent = parents_by_digest.get(digest)
        if parent is None or not parent.get("preset"):
            raise RecipeMismatchError(f"parent {digest[:12]} has no recipe: it is an upload; supply the image itself")
        parents.append(rerender_chain(parent, parents_by_digest, **kwargs))
    return rerender(recipe, parents, **kwargs)


@dataclass(frozen=True)
class Difference:
    max_abs: float
    mean_abs: float

    @property
    def within_tolerance(self) -> bool:
        return self.max_abs <= MAX_ABS_DIFF and self.mean_abs <= MAX_MEAN_DIFF

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs": self.max_abs,
            "mean_abs": round(self.mean_abs, 4),
            "tolerance": {"max_abs": MAX_ABS_DIFF, "mean_abs": MAX_MEAN_DIFF},
            "within_tolerance": self.within_tolerance,
        }


def difference(a: Image.Image, b: Image.Image) -> Difference:
    """Pixel difference of two images of one size (0-255 scale)."""
    if a.size != b.size:
        raise ImagegenError(f"the images differ in size: {a.size} and {b.size}")
    x = np.asarray(a.convert("RGB"), dtype=np.int16)
    y = np.asarray(b.convert("RGB"), dtype=np.int16)
    diff = np.abs(x - y)
    return Difference(float(diff.max()), float(diff.mean()))
