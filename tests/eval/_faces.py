"""Real faces for the evaluation tests: public-domain photos, their augmentations, a faceless set.

Two people: the NASA astronaut portrait and Grace Hopper (``imagegen.samples``). A character's
*references* are augmentations of its photo (light, JPEG, downscale, rotation); its clean
*renders* are augmentations of the **mirrored** photo. Mirroring changes what the embedder sees
about as much as a second photo of the person does (dlib: 0.72-0.85 against the references), so
a clean render is the same person without being a copy of any reference (copy bound 0.90).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from imagegen import samples

REFERENCE_KINDS = ("brightness", "jpeg", "downscale", "rotate")
RENDER_KINDS = ("crop", "brightness", "rotate", "jpeg", "downscale")
BOXES = {"astronaut": samples.ASTRONAUT_FACE_BOX, "hopper": samples.GRACE_HOPPER_FACE_BOX}


def photo(person: str) -> Image.Image:
    return samples.astronaut() if person == "astronaut" else samples.grace_hopper()


def reference_images(person: str) -> list[Image.Image]:
    """The photo and four same-person augmentations of it."""
    base, box = photo(person), BOXES[person]
    return [base] + [samples.augment(base, k, seed=i, face_box=box) for i, k in enumerate(REFERENCE_KINDS, 1)]


def render_images(person: str, count: int, seed: int) -> list[Image.Image]:
    """``count`` stand-in renders: augmentations of the mirrored photo."""
    base, box = photo(person), BOXES[person]
    mirrored = ImageOps.mirror(base)
    mbox = (base.width - box[2], box[1], base.width - box[0], box[3])
    return [samples.augment(mirrored, RENDER_KINDS[i % 5], seed=seed + i, face_box=mbox) for i in range(count)]


def no_face_images(count: int) -> list[Image.Image]:
    """A photo without a face (coffee), augmented, and seeded noise."""
    coffee = samples.no_face_image()
    images = [coffee, samples.augment(coffee, "brightness", seed=1), samples.augment(coffee, "crop", seed=2)]
    rng = np.random.default_rng(0)
    while len(images) < count:
        images.append(Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)))
    return images[:count]


def write_png(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path
