"""Real face photos as upload bytes: public-domain portraits from installed packages, augmented.

Same-identity sets come from augmenting one photo; Grace Hopper is the other identity and the
coffee cup the image without a face.
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import cache

from PIL import Image

from imagegen import samples

SAME_PERSON_KINDS = ("flip", "crop", "brightness", "jpeg", "rotate")


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@cache
def astronaut_set(count: int = 6) -> tuple[tuple[str, bytes], ...]:
    """``count`` same-person references: the astronaut and augmentations of her photo."""
    base = samples.astronaut()
    files = [("astronaut.png", encode(base))]
    for i in range(count - 1):
        kind = SAME_PERSON_KINDS[i % len(SAME_PERSON_KINDS)]
        variant = samples.augment(base, kind, seed=i, face_box=samples.ASTRONAUT_FACE_BOX)
        files.append((f"astronaut-{kind}-{i}.jpg", encode(variant, "JPEG", quality=92)))
    return tuple(files)


@cache
def hopper_set(count: int = 2) -> tuple[tuple[str, bytes], ...]:
    base = samples.grace_hopper()
    files = [("hopper.png", encode(base))]
    for i in range(count - 1):
        kind = ("flip", "brightness", "jpeg")[i % 3]
        variant = samples.augment(base, kind, seed=i, face_box=samples.GRACE_HOPPER_FACE_BOX)
        files.append((f"hopper-{kind}-{i}.png", encode(variant)))
    return tuple(files)


@cache
def no_face() -> tuple[str, bytes]:
    return ("coffee.png", encode(samples.no_face_image()))


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge image, with a tiny compressed body."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
