"""Reference-image ingestion: accept only safe, decodable PNG/JPEG/WebP and normalise it.

Uploaded images are untrusted. Before anything else looks at the pixels this module checks the
byte size, the format (by content, not by file name), the pixel count (Pillow's
decompression-bomb protection, raised to an error instead of a warning), decodes the whole image
(truncated files fail here), applies the EXIF orientation and re-encodes to PNG. Re-encoding
strips every metadata chunk (EXIF with GPS, XMP, ICC, comments): a reference set must not carry
where and with what a photo was taken.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from imagegen.errors import ImagegenError

ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
MAX_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000
MAX_SIDE = 8192
MIN_SIDE = 64


class InvalidImageError(ImagegenError):
    """A reference image that cannot or must not be used."""

    code = "invalid_image"
    field = "images"


@dataclass(frozen=True)
class IngestedImage:
    """A reference image after validation: RGB pixels and their canonical PNG bytes."""

    filename: str
    image: Image.Image
    png_bytes: bytes
    source_format: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.png_bytes).hexdigest()

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def ingest_image(data: bytes, filename: str = "image", max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS):
    """Validate and normalise one uploaded image; raise ``InvalidImageError`` saying what is wrong."""
    name = filename or "image"
    if not data:
        raise InvalidImageError(f"{name}: the file is empty")
    if len(data) > max_bytes:
        raise InvalidImageError(f"{name}: {len(data):,} bytes is over the {max_bytes:,}-byte limit for a reference")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            fmt = probe.format
            if fmt not in ALLOWED_FORMATS:
                raise InvalidImageError(f"{name}: format {fmt or 'unknown'} is not accepted; use PNG, JPEG or WebP")
            width, height = probe.size
            if width * height > max_pixels or max(width, height) > MAX_SIDE:
                raise InvalidImageError(
                    f"{name}: {width}x{height} pixels is over the limit ({max_pixels:,} pixels, {MAX_SIDE} px a side)"
                )
            if min(width, height) < MIN_SIDE:
                raise InvalidImageError(f"{name}: {width}x{height} is too small; references need {MIN_SIDE} px a side")
            probe.load()  # decode everything now: a truncated file fails here, not later
            upright = ImageOps.exif_transpose(probe)
            rgb = upright.convert("RGB")
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"{name}: refused as a decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(f"{name}: not an image (or a format Pillow cannot read)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"{name}: the image is corrupt or truncated ({exc})") from exc
    clean = Image.new("RGB", rgb.size)
    clean.paste(rgb)  # a fresh image object: no info dict, no EXIF, no ICC profile
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG", optimize=False)
    return IngestedImage(filename=name, image=clean, png_bytes=buffer.getvalue(), source_format=fmt)
