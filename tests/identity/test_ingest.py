"""Untrusted uploads: only decodable PNG/JPEG/WebP within limits get in, stripped of metadata."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from imagegen.identity.ingest import InvalidImageError, ingest_image
from tests.photos import encode


def image(size=(200, 160), colour=(200, 100, 50)) -> Image.Image:
    return Image.new("RGB", size, colour)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_become_png(fmt):
    result = ingest_image(encode(image(), fmt), f"x.{fmt.lower()}")
    assert result.source_format == fmt and result.size == (200, 160)
    assert Image.open(io.BytesIO(result.png_bytes)).format == "PNG"


def test_exif_orientation_is_applied_and_metadata_stripped():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    exif[0x010F] = "SecretCameraMaker"
    data = encode(image((200, 100)), "JPEG", exif=exif.tobytes())
    result = ingest_image(data, "photo.jpg")
    assert result.size == (100, 200)
    reopened = Image.open(io.BytesIO(result.png_bytes))
    assert not reopened.getexif() and b"SecretCameraMaker" not in result.png_bytes
    assert not reopened.info.get("exif")


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge image, with a tiny compressed body."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"this is not an image at all", "not an image"),
        (encode(image(), "PNG")[:300], "corrupt or truncated"),
        (encode(image(), "GIF"), "format GIF is not accepted"),
        (encode(image(), "BMP"), "format BMP is not accepted"),
        (encode(image((40, 40)), "PNG"), "too small"),
        (bomb_png(8000, 6000), "over the limit"),
        (bomb_png(100000, 100000), "decompression bomb"),
    ],
)
def test_bad_uploads_are_refused_with_a_reason(data, message):
    with pytest.raises(InvalidImageError, match=message):
        ingest_image(data, "upload")


def test_oversized_file_is_refused_before_decoding():
    with pytest.raises(InvalidImageError, match="-byte limit for a reference"):
        ingest_image(encode(image()), "big.png", max_bytes=1000 if len(encode(image())) > 1000 else 10)
