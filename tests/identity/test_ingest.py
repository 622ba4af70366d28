"""Untrusted uploads: only decodable PNG/JPEG/WebP within limits get in, stripped of metadata."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from imagegen.identity.ingest import (
    REFERENCE_MAX_SIDE,
    ImageTooLargeError,
    InvalidImageError,
    UploadTooLargeError,
    ingest_image,
    ingest_images,
)
from imagegen.identity.models import InvalidReferenceError
from tests.photos import bomb_png, encode


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


# -- what an upload costs is decided from its bytes and headers, before anything is decoded ----------
def test_oversized_header_is_refused_without_decoding():
    """144 Mpixel claimed by a 1 KB file: refused from the header (its body would not even decode)."""
    with pytest.raises(ImageTooLargeError, match="12000x12000 pixels is over the limit") as info:
        ingest_image(bomb_png(12000, 12000), "huge.png")
    assert (info.value.code, info.value.field) == ("image_too_large", "references")
    with pytest.raises(ImageTooLargeError, match="decompression bomb") as info:
        ingest_image(bomb_png(100000, 100000), "bomb.png")
    assert info.value.code == "image_too_large"


@pytest.fixture(scope="module")
def blank_6000() -> bytes:
    """The hostile upload of the issue: a blank 6000x6000 PNG, a few tens of KB on the wire."""
    return encode(Image.new("RGB", (6000, 6000), "white"))


def test_eight_identical_blank_pngs_are_refused_as_duplicates_before_decoding(blank_6000):
    assert len(blank_6000) < 1_000_000
    files = [(f"blank-{i}.png", blank_6000) for i in range(8)]
    with pytest.raises(InvalidReferenceError, match=r"reference 1 \(blank-1.png\) has the same bytes as reference 0"):
        ingest_images(files)


def test_request_pixel_budget_is_checked_from_headers(blank_6000):
    """Eight different 6000x6000 headers: 288 Mpixel in all, refused before any body is read
    (the bodies are not valid image data: decoding any of them would fail as corrupt)."""
    files = [(f"big-{i}.png", bomb_png(6000, 6000 - i)) for i in range(8)]
    with pytest.raises(UploadTooLargeError, match="over the 128,000,000-pixel limit") as info:
        ingest_images(files)
    assert (info.value.code, info.value.field) == ("upload_too_large", "references")
    # the budget is a parameter: one real 36-Mpixel blank passes a budget that holds it, shrunk on the way
    (image,) = ingest_images([("blank.png", blank_6000)], max_request_pixels=36_000_000)
    assert image.size == (REFERENCE_MAX_SIDE, REFERENCE_MAX_SIDE) and image.original_size == (6000, 6000)
    with pytest.raises(UploadTooLargeError):
        ingest_images([("blank.png", blank_6000)], max_request_pixels=35_999_999)


def test_the_same_picture_in_two_encodings_is_a_duplicate():
    picture = image((300, 200))
    files = [("a.png", encode(picture, compress_level=1)), ("b.png", encode(picture, compress_level=9))]
    assert files[0][1] != files[1][1]
    with pytest.raises(InvalidReferenceError, match=r"reference 1 \(b.png\) has the same pixels as reference 0"):
        ingest_images(files)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_large_references_are_shrunk_upright_before_analysis(fmt):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    gradient = Image.linear_gradient("L").resize((3000, 2000)).convert("RGB")
    data = encode(gradient, fmt, exif=exif.tobytes())
    result = ingest_image(data, f"big.{fmt.lower()}")
    assert result.size == (1024, 1536) and result.original_size == (2000, 3000)
    reopened = Image.open(io.BytesIO(result.png_bytes))
    assert reopened.size == (1024, 1536) and not reopened.getexif()
    # the top of the original (dark) is on the right once upright
    pixels = result.image.convert("L")
    assert pixels.getpixel((1000, 768)) < 40 and pixels.getpixel((20, 768)) > 215


def test_a_strip_too_narrow_once_shrunk_is_refused():
    with pytest.raises(InvalidImageError, match="too narrow"):
        ingest_image(encode(image((8000, 70))), "strip.png")


def test_small_references_are_kept_at_their_size():
    result = ingest_image(encode(image((640, 480))), "small.png")
    assert result.size == result.original_size == (640, 480)


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("evil\u202egpj.png", "evilgpj.png"),  # a right-to-left override would show it as "evilpng.jpg"
        ("../../etc/x.png", "x.png"),
        ("C:\\Users\\me\\face.jpg", "face.jpg"),
        ("a\x00b\x1b[31m.png", "ab[31m.png"),
        ("\u2066\u2069", "image"),
        ("x" * 300 + ".png", "x" * 128),
    ],
)
def test_an_upload_keeps_a_visible_file_name_only(given, kept):
    """The file name is shown in reports, contact sheets and listings: no path, control or text-direction
    characters, and bounded (a security review uploaded a right-to-left override and a ``<script>`` name)."""
    assert ingest_image(encode(image(), "PNG"), given).filename == kept
