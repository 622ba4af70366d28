"""Reference-image ingestion: accept only safe, decodable PNG/JPEG/WebP and normalise it.

Uploaded images are untrusted, and what they cost is decided by their headers, not their size on
the wire: a 35 KB blank PNG can claim 6000x6000 pixels (108 MB once decoded, and a face detector
run over all of it). So a set of references goes through three stages, cheapest first, and the
first two decode nothing:

1. **bytes**: size limit, and duplicates found by the SHA-256 of the raw bytes (eight copies of
   one file are refused before any of them is opened);
2. **headers**: format by content (not by file name), width and height read by ``Image.open``
   (which parses only the header): a per-image limit (``MAX_PIXELS``, ``MAX_SIDE``, and Pillow's
   decompression-bomb check raised to an error) and a budget over all images of one request
   (``MAX_REQUEST_PIXELS``);
3. **pixels**: decode one image at a time, JPEGs already at a reduced DCT scale, shrink the
   longest side to ``REFERENCE_MAX_SIDE``, apply the EXIF orientation and re-encode to PNG.

Shrinking before face analysis bounds the memory and the detector's time per reference whatever
was uploaded; 1536 px keeps a portrait's face far above what the embedders use (112-160 px
crops). The shrunk image is what is stored, so the face boxes and landmarks saved with a
reference are in the stored image's own coordinates. Re-encoding strips every metadata chunk
(EXIF with GPS, XMP, ICC, comments): a reference set must not carry where and with what a photo
was taken.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from PIL import Image, UnidentifiedImageError

from imagegen.errors import ImagegenError
from imagegen.identity.models import InvalidReferenceError
from imagegen.text import clean_filename

ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
#: one reference file, as uploaded
MAX_BYTES = 20 * 1024 * 1024
#: one reference image, from its header (a 40-Mpixel RGB image is 120 MB decoded)
MAX_PIXELS = 40_000_000
MAX_SIDE = 8192
MIN_SIDE = 64
#: all references of one registration together, from their headers: ten 12-Mpixel phone photos
#: fit; eight 6000x6000 blanks (288 Mpixel) do not
MAX_REQUEST_PIXELS = 128_000_000
#: references are shrunk to this longest side before face analysis and storage
REFERENCE_MAX_SIDE = 1536

_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class InvalidImageError(ImagegenError):
    """A reference image that cannot or must not be used."""

    code = "invalid_image"
    field = "references"


class ImageTooLargeError(InvalidImageError):
    """One image whose header claims more pixels than a reference may have."""

    code = "image_too_large"


class UploadTooLargeError(InvalidImageError):
    """A set of references whose headers claim more pixels, together, than one request may decode."""

    code = "upload_too_large"


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, known before a single pixel is decoded."""

    filename: str
    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class IngestedImage:
    """A reference image after validation: RGB pixels and their canonical PNG bytes.

    ``original_size`` is the uploaded image's (upright) size; ``size`` the stored one, at most
    ``REFERENCE_MAX_SIDE`` on its longest side.
    """

    filename: str
    image: Image.Image
    png_bytes: bytes
    source_format: str
    original_size: tuple[int, int] | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.png_bytes).hexdigest()

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _open(data: bytes, name: str, max_bytes: int, max_pixels: int) -> tuple[Image.Image, ImageHeader]:
    """Open ``data`` lazily (header only) and apply every check a header allows."""
    if not data:
        raise InvalidImageError(f"{name}: the file is empty")
    if len(data) > max_bytes:
        raise InvalidImageError(f"{name}: {len(data):,} bytes is over the {max_bytes:,}-byte limit for a reference")
    try:
        with warnings.catch_warnings():
            # our own limit below is stricter than Pillow's warning and says more; its error (twice
            # its limit) still stops a header that claims billions of pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name}: refused as a decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(f"{name}: not an image (or a format Pillow cannot read)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"{name}: the image is corrupt or truncated ({exc})") from exc
    fmt = probe.format
    if fmt not in ALLOWED_FORMATS:
        raise InvalidImageError(f"{name}: format {fmt or 'unknown'} is not accepted; use PNG, JPEG or WebP")
    width, height = probe.size
    if width * height > max_pixels or max(width, height) > MAX_SIDE:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} pixels is over the limit ({max_pixels:,} pixels, {MAX_SIDE} px a side); "
            f"references need no more than {REFERENCE_MAX_SIDE} px a side"
        )
    if min(width, height) < MIN_SIDE:
        raise InvalidImageError(f"{name}: {width}x{height} is too small; references need {MIN_SIDE} px a side")
    return probe, ImageHeader(name, fmt, width, height)


def read_header(data: bytes, filename: str = "image", max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS):
    """Format and size of one upload from its header alone (nothing is decoded); refuses what is over a limit."""
    probe, header = _open(data, filename or "image", max_bytes, max_pixels)
    probe.close()
    return header


def _target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def ingest_image(
    data: bytes,
    filename: str = "image",
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_side: int = REFERENCE_MAX_SIDE,
) -> IngestedImage:
    """Validate, shrink and normalise one uploaded image; raise ``InvalidImageError`` saying what is wrong."""
    name = clean_filename(filename or "")  # shown in reports and listings: no path, control or bidi characters
    probe, header = _open(data, name, max_bytes, max_pixels)
    target = _target_size(header.width, header.height, max_side)
    if min(target) < MIN_SIDE:
        raise InvalidImageError(
            f"{name}: {header.width}x{header.height} is too narrow: shrunk to {max_side} px on its longest side "
            f"it would be under {MIN_SIDE} px on the other"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if header.format == "JPEG":
                probe.draft("RGB", target)  # decode at 1/2, 1/4 or 1/8 scale when that still covers target
            probe.load()  # decode everything now: a truncated file fails here, not later
            orientation = probe.getexif().get(_ORIENTATION_TAG)
            rgb = probe if probe.mode == "RGB" else probe.convert("RGB")
            probe = None  # the decoded original is no longer needed (converted, or about to be resized)
            if rgb.size != target:
                rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
            if orientation in _TRANSPOSE_FOR_ORIENTATION:
                rgb = rgb.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{name}: refused as a decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"{name}: the image is corrupt or truncated ({exc})") from exc
    clean = Image.new("RGB", rgb.size)
    clean.paste(rgb)  # a fresh image object: no info dict, no EXIF, no ICC profile
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG", optimize=False)
    upright = (header.height, header.width) if orientation in (5, 6, 7, 8) else (header.width, header.height)
    return IngestedImage(
        filename=name, image=clean, png_bytes=buffer.getvalue(), source_format=header.format, original_size=upright
    )


def _refuse_duplicate(index: int, filename: str, first: int, what: str) -> NoReturn:
    raise InvalidReferenceError(
        f"reference {index} ({filename or 'no filename'}) has the same {what} as reference {first}; "
        "remove the duplicate"
    )


def ingest_images(
    files: Sequence[tuple[str, bytes]],
    *,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_request_pixels: int | None = MAX_REQUEST_PIXELS,
    max_side: int = REFERENCE_MAX_SIDE,
) -> list[IngestedImage]:
    """Ingest the references of one request: bytes and headers of all of them first, then pixels.

    Every refusal that the raw bytes or the headers allow (size, duplicates by raw SHA-256,
    format, per-image pixels, the request's pixel budget) happens before anything is decoded.
    ``max_request_pixels=None`` skips the budget (references already stored, re-checked).
    Duplicates are refused as the registry refuses them (``InvalidReferenceError``), earlier.
    """
    seen: dict[str, int] = {}
    for index, (name, data) in enumerate(files):
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            _refuse_duplicate(index, name, seen[digest], "bytes")
        seen[digest] = index
    headers = [read_header(data, name, max_bytes, max_pixels) for name, data in files]
    total = sum(h.pixels for h in headers)
    if max_request_pixels is not None and total > max_request_pixels:
        largest = ", ".join(f"{h.filename} {h.width}x{h.height}" for h in sorted(headers, key=lambda h: -h.pixels)[:3])
        raise UploadTooLargeError(
            f"the references claim {total:,} pixels in all, over the {max_request_pixels:,}-pixel limit of one "
            f"registration (largest: {largest}); send fewer or smaller images "
            f"({REFERENCE_MAX_SIDE} px a side is all a reference needs)"
        )
    images: list[IngestedImage] = []
    normalised: dict[str, int] = {}
    for index, (name, data) in enumerate(files):
        image = ingest_image(data, name, max_bytes, max_pixels, max_side)
        if image.sha256 in normalised:  # the same picture in another encoding: refused before face analysis
            _refuse_duplicate(index, image.filename, normalised[image.sha256], "pixels")
        normalised[image.sha256] = index
        images.append(image)
    return images
