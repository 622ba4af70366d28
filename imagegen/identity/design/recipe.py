"""Recipes and the recipe chain: the evidence that a character is synthetic.

Every image the design flow renders is stored with its *recipe*: preset, profile, identity method,
prompt, negative prompt, seed, size, steps, guidance, identity weight and start step, the library
versions, and the **digests of its parent images** (the pick it was conditioned on; none for a
plain candidate). An image is named by the SHA-256 of its decoded pixels (``pixel_digest``), so
a PNG re-saved with other metadata is still the same image while any edited pixel is not.

A set may be registered ``synthetic`` only when every kept image was rendered by this system and
every parent in its chain was too (``chain_problems``): an uploaded photo anywhere in the chain
makes that impossible, however the files were named. The chain is checked against the digests the
design stored when *it* rendered them, never against metadata inside a file (which anyone can
write). Anyone can re-render a kept image from its recipe: re-render each parent from its own
recipe, compute the identity from the parents with the same method, render the image
(``request_of``); README "Artists" states the tolerance the re-render is held to.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from typing import Any

from PIL import Image

from imagegen.pipelines.types import RenderRequest

#: recipe fields copied from a render's metadata (``RenderResult.metadata()``)
RECIPE_FIELDS = (
    "preset",
    "profile",
    "method",
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "steps",
    "guidance",
    "true_cfg_scale",
    "identity_weight",
    "identity_start_step",
    "versions",
)


def pixel_digest(image: Image.Image) -> str:
    """SHA-256 of an image's RGB pixels and size: the same picture in any encoding has one digest."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    h = hashlib.sha256()
    h.update(b"RGB" + struct.pack(">II", rgb.width, rgb.height))
    h.update(rgb.tobytes())
    return h.hexdigest()


def make_recipe(metadata: Mapping[str, Any], parents: Iterable[str], image_digest: str) -> dict[str, Any]:
    """The recipe of one rendered image from its render metadata and the digests of its parents.

    The renderer's ``character`` (a design's internal draft key) is not part of it: a recipe names
    its identity by the parent images it was computed from.
    """
    recipe = {name: metadata.get(name) for name in RECIPE_FIELDS}
    if not recipe.get("method"):
        recipe["identity_weight"] = None
        recipe["identity_start_step"] = None
    recipe["parents"] = list(parents)
    recipe["image_digest"] = image_digest
    return recipe


def request_of(recipe: Mapping[str, Any], character: str | None = None) -> RenderRequest:
    """The ``RenderRequest`` that re-renders ``recipe`` (``character``: whose identity, for a conditioned one)."""
    conditioned = bool(recipe.get("method")) and bool(recipe.get("parents"))
    fields: dict[str, Any] = {
        "prompt": recipe["prompt"],
        "negative_prompt": recipe.get("negative_prompt") or "",
        "seed": recipe["seed"],
        "width": recipe.get("width"),
        "height": recipe.get("height"),
        "steps": recipe.get("steps"),
        "guidance": recipe.get("guidance"),
        "true_cfg_scale": recipe.get("true_cfg_scale") or 1.0,
    }
    if conditioned:
        fields.update(
            character=character,
            method=recipe["method"],
            identity_weight=recipe.get("identity_weight", 1.0),
            identity_start_step=recipe.get("identity_start_step") or 0,
        )
    return RenderRequest(**fields)


def chain_problems(kept: Iterable[Mapping[str, Any]], by_digest: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Why the kept images cannot be called synthetic (empty: every chain is this system's renders).

    ``kept`` and ``by_digest``'s values are image records with ``digest``, ``origin`` (``rendered`` |
    ``upload``), ``recipe`` (rendered ones) and ``label``; ``by_digest`` holds every image of the design.
    """
    problems: list[str] = []
    seen: set[str] = set()

    def walk(image: Mapping[str, Any], path: str) -> None:
        digest = image["digest"]
        if digest in seen:
            return
        seen.add(digest)
        if image.get("origin") != "rendered" or not image.get("recipe"):
            problems.append(f"{path} is an upload, not an image this system rendered")
            return
        recipe = image["recipe"]
        if recipe.get("image_digest") != digest:
            problems.append(f"{path}: its recipe names another image")
            return
        for parent in recipe.get("parents") or []:
            found = by_digest.get(parent)
            if found is None:
                problems.append(f"{path}: parent image {parent[:12]} was not rendered by this design")
                continue
            walk(found, f"{path} <- {found.get('label', parent[:12])}")

    for image in kept:
        walk(image, str(image.get("label", image["digest"][:12])))
    return problems
