"""Public-domain photos that ship inside installed PyPI packages, for tests and the offline demo.

Why these photos: face tests must run on *real* faces with *real* models, offline, without
checking photos of people into this repository. Two wheels we already depend on carry
public-domain portraits:

- ``skimage.data.astronaut()``: NASA portrait of astronaut Eileen Collins (public domain, a work
  of the US government; scikit-image's data README says so).
- matplotlib's sample data ``grace_hopper.jpg``: official US Navy portrait of Rear Admiral
  Grace Hopper (public domain, a work of the US government).

Both are different people, so they give a negative pair; :func:`augment` turns one photo into
same-identity variants (flip, crop, light, JPEG, rotation, downscale) for positive pairs.
:func:`no_face_image` is a photo with no face in it (a cup of coffee) for negatives.

Every image is a PIL ``RGB`` image and is deterministic for a given ``seed``.

**Sample characters** are built here, once, for the demo and the evaluation suites: one photo
plus its augmentations (:func:`reference_images`, :func:`reference_files`), its provenance
(:func:`provenance`) and the registration (:func:`register_sample_character`). This module sits
at the identity layer: it may use :mod:`imagegen.identity`, never serve, eval or the demo.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]
AugmentKind = Literal["flip", "crop", "brightness", "jpeg", "rotate", "downscale"]

#: every kind :func:`augment` knows, in a stable order (tests iterate over it)
AUGMENTATIONS: tuple[AugmentKind, ...] = ("flip", "crop", "brightness", "jpeg", "rotate", "downscale")

#: approximate face box (x0, y0, x1, y1) in :func:`astronaut` (dlib HOG's box, rounded outwards)
ASTRONAUT_FACE_BOX: Box = (170, 70, 270, 172)
#: approximate face box (x0, y0, x1, y1) in :func:`grace_hopper`
GRACE_HOPPER_FACE_BOX: Box = (160, 135, 378, 355)


def astronaut() -> Image.Image:
    """NASA portrait of Eileen Collins, 512x512 (``skimage.data.astronaut``; public domain).

    The face is about 90 px wide, top-left of centre (see :data:`ASTRONAUT_FACE_BOX`).
    """
    from skimage import data

    return Image.fromarray(data.astronaut()).convert("RGB")


def grace_hopper() -> Image.Image:
    """US Navy portrait of Grace Hopper, 512 wide x 600 high (matplotlib sample data; public domain).

    The face is about 215 px wide, near the centre (see :data:`GRACE_HOPPER_FACE_BOX`).
    """
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as stream:
        image = Image.open(stream)
        image.load()
    return image.convert("RGB")


def no_face_image() -> Image.Image:
    """A photo with no face in it: a cup of coffee, 600 wide x 400 high (``skimage.data.coffee``).

    A real photo (texture, edges, a round shape) is a better negative than a flat colour: a
    detector that fires on anything would fire here.
    """
    from skimage import data

    return Image.fromarray(data.coffee()).convert("RGB")


def side_by_side(images: Sequence[Image.Image], *, gap: int = 16, background=(255, 255, 255)) -> Image.Image:
    """Paste ``images`` left to right on one canvas (top-aligned), e.g. for a two-face photo."""
    if not images:
        raise ValueError("side_by_side needs at least one image")
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    height = max(im.height for im in images)
    canvas = Image.new("RGB", (width, height), background)
    x = 0
    for im in images:
        canvas.paste(im.convert("RGB"), (x, 0))
        x += im.width + gap
    return canvas


def augment(
    image: Image.Image,
    kind: AugmentKind,
    seed: int = 0,
    *,
    face_box: Box | None = None,
    **params: float,
) -> Image.Image:
    """A same-identity variant of ``image``: the face stays in frame and recognisable.

    ``kind`` is one of :data:`AUGMENTATIONS`; ``seed`` draws the strength from a range that keeps
    the face detectable by dlib's HOG detector (parameters can also be given explicitly):

    - ``flip``: horizontal mirror.
    - ``crop``: a random crop that keeps ``face_box`` plus a margin of 25% of its size
      (``face_box`` defaults to the centre half of the image).
    - ``brightness``: brightness factor in [0.65, 0.8] or [1.2, 1.35], contrast in [0.75, 1.25]
      (``brightness=``, ``contrast=``).
    - ``jpeg``: JPEG re-encode at quality 15..40 (``quality=``).
    - ``rotate``: rotation by +-4..8 degrees about the face centre (``degrees=``).
    - ``downscale``: resize by 0.5..0.65 (``scale=``); the astronaut's face ends up 45-60 px,
      which a detector finds only when it upsamples small images.
    """
    rng = np.random.default_rng(seed)
    image = image.convert("RGB")
    if kind == "flip":
        return ImageOps.mirror(image)
    if kind == "crop":
        return _crop_around(image, face_box or _centre_box(image), rng)
    if kind == "brightness":
        drawn = rng.uniform(0.65, 0.8) if rng.random() < 0.5 else rng.uniform(1.2, 1.35)
        bright = params.get("brightness", float(drawn))
        contrast = params.get("contrast", float(rng.uniform(0.75, 1.25)))
        out = ImageEnhance.Brightness(image).enhance(bright)
        return ImageEnhance.Contrast(out).enhance(contrast)
    if kind == "jpeg":
        quality = int(params.get("quality", int(rng.integers(15, 41))))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")
    if kind == "rotate":
        degrees = params.get("degrees", float(rng.uniform(4.0, 8.0) * rng.choice([-1.0, 1.0])))
        box = face_box or _centre_box(image)
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        fill = tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(axis=0))
        return image.rotate(degrees, resample=Image.Resampling.BICUBIC, center=centre, fillcolor=fill)
    if kind == "downscale":
        scale = params.get("scale", float(rng.uniform(0.5, 0.65)))
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return image.resize(size, Image.Resampling.LANCZOS)
    raise ValueError(f"unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTATIONS)}")


def _centre_box(image: Image.Image) -> Box:
    w, h = image.size
    return (w // 4, h // 4, 3 * w // 4, 3 * h // 4)


def _crop_around(image: Image.Image, box: Box, rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    x0, y0, x1, y1 = box
    mx, my = 0.25 * (x1 - x0), 0.25 * (y1 - y0)
    keep = (max(0, int(x0 - mx)), max(0, int(y0 - my)), min(w, int(x1 + mx)), min(h, int(y1 + my)))
    left = int(rng.integers(0, keep[0] + 1))
    top = int(rng.integers(0, keep[1] + 1))
    right = int(rng.integers(keep[2], w + 1))
    bottom = int(rng.integers(keep[3], h + 1))
    return image.crop((left, top, right, bottom))


# -- sample characters -----------------------------------------------------------------------------
#: name -> (loader, face box) of every photo a sample character can be made of
PHOTOS: dict[str, tuple[Callable[[], Image.Image], Box]] = {
    "astronaut": (astronaut, ASTRONAUT_FACE_BOX),
    "grace_hopper": (grace_hopper, GRACE_HOPPER_FACE_BOX),
}
#: display name of each sample character
NAMES = {"astronaut": "Eileen Collins (NASA portrait)", "grace_hopper": "Grace Hopper (US Navy portrait)"}
#: who made each photo and where it ships: the provenance of a sample character
CREATORS = {
    "astronaut": "NASA (public-domain US government work)",
    "grace_hopper": "US Navy (public-domain US government work)",
}
SOURCES = {
    "astronaut": "skimage.data.astronaut(): NASA portrait of Eileen Collins, public-domain US government work",
    "grace_hopper": "matplotlib sample data grace_hopper.jpg: US Navy portrait, public-domain US government work",
}
#: augmentations (seeded 0, 1, ...) that make a reference set out of one photo
REFERENCE_KINDS: tuple[AugmentKind, ...] = ("flip", "brightness", "jpeg", "downscale")


def reference_images(sample: str) -> list[tuple[str, Image.Image]]:
    """The photo ``sample`` (a key of :data:`PHOTOS`) and same-person augmentations of it, named."""
    if sample not in PHOTOS:
        raise ValueError(f"unknown sample photo {sample!r}; choose one of {', '.join(PHOTOS)}")
    load, box = PHOTOS[sample]
    base = load()
    variants = [(f"{sample}-{k}.png", augment(base, k, seed=i, face_box=box)) for i, k in enumerate(REFERENCE_KINDS)]
    return [(f"{sample}.png", base), *variants]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def reference_files(sample: str) -> list[tuple[str, bytes]]:
    """:func:`reference_images` as PNG upload bytes: what registration and the HTTP API take."""
    return [(name, png_bytes(image)) for name, image in reference_images(sample)]


def provenance(sample: str) -> dict[str, str]:
    """Where the photos of sample character ``sample`` come from (a public-domain licence)."""
    return {"kind": "licensed", "creator": CREATORS[sample], "evidence": SOURCES[sample]}


def register_sample_character(
    registry: Any,
    character_id: str,
    sample: str,
    *,
    name: str | None = None,
    card: dict | None = None,
    replace: bool = False,
) -> Any | None:
    """Register and approve photo ``sample`` as character ``character_id``; returns the ``Registration``.

    Only approved characters render with an identity method; the sample sets pass the reference
    report, so approval goes through the same checks an artist's character does. An existing
    character of that id is deleted first with ``replace``, else left exactly as it is (None).
    """
    from imagegen.identity.characters import approve_character, register_character

    if registry.characters.exists(character_id):
        if not replace:
            return None
        registry.characters.delete(character_id)
    register_character(
        registry,
        character_id=character_id,
        name=name or NAMES[sample],
        provenance=provenance(sample),
        files=reference_files(sample),
        card=card or {"style_notes": "public-domain sample portrait"},
    )
    registration = approve_character(registry, character_id)
    log.info("registered sample character %s from %s", character_id, sample)
    return registration
