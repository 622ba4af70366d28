"""The robust watermark on a 1024 px real photo: what the README promises survives, and nothing is invented.

The cases asserted here are the ones README.md ("Provenance") promises; bench/watermark_robustness.py
runs the whole attack suite on every bundled photo at 512 and 1024 px (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from imagegen import samples
from imagegen.provenance import read_watermark, watermark
from tests.provenance.helpers import decode, encode


def psnr(a: Image.Image, b: Image.Image) -> float:
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(10 * np.log10(255**2 / np.mean(diff**2)))


def resized(image: Image.Image, factor: float) -> Image.Image:
    return image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.LANCZOS)


def centre_crop(image: Image.Image, fraction: float) -> Image.Image:
    w, h = round(image.width * fraction), round(image.height * fraction)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return image.crop((left, top, left + w, top + h))


#: the promises of README.md, at 1024 px
ATTACKS = {
    "jpeg70": lambda im: decode(encode(im, "JPEG", quality=70)),
    "jpeg50": lambda im: decode(encode(im, "JPEG", quality=50)),
    "webp80": lambda im: decode(encode(im, "WEBP", quality=80)),
    "resize0.5": lambda im: resized(im, 0.5),
    "resize2": lambda im: resized(im, 2.0),
    "crop90": lambda im: centre_crop(im, 0.9),
    "brightness-10%": lambda im: ImageEnhance.Brightness(im).enhance(0.9),
    "resize0.5+jpeg70": lambda im: decode(encode(resized(im, 0.5), "JPEG", quality=70)),
}


def test_invisible_at_1024px(stamped_1024):
    assert stamped_1024.image.size == (1024, 1024)
    assert psnr(stamped_1024.image, stamped_1024.photo) >= 38


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_tag_survives(stamped_1024, attack):
    reading = read_watermark(ATTACKS[attack](stamped_1024.image).convert("RGB"))
    assert reading["found"], reading
    assert reading["tag"] == stamped_1024.image_id[:8]


def test_an_unmarked_photo_is_never_read_as_marked():
    photo = samples.astronaut().resize((1024, 1024), Image.Resampling.LANCZOS)
    for attack in ("jpeg70", "crop90"):
        assert not read_watermark(ATTACKS[attack](photo).convert("RGB"))["found"], attack


def test_off_centre_crops_lose_it_as_documented(stamped_1024):
    # README: only centred crops are searched; a corner crop is not found (and so not mis-read)
    corner = stamped_1024.image.crop((0, 0, 820, 820))
    assert not read_watermark(corner)["found"]


def test_reed_solomon_corrects_wrong_bytes():
    tag = 0x0BADCAFE
    votes = watermark.codeword_bits(tag).astype(np.float64) * 2 - 1
    assert len(votes) == watermark.CODE_BITS == 96
    flipped = votes.copy()
    for byte in (0, 5, 9):  # three whole bytes wrong, the marker's first among them
        flipped[byte * 8 : byte * 8 + 8] *= -1
    assert watermark._decode_votes(flipped) == (tag, 3)
    # four wrong bytes, two of them weakly held: those two are declared erasures
    weak = votes.copy()
    for byte in (0, 5):
        weak[byte * 8 : byte * 8 + 8] *= -1
    for byte in (2, 7):
        weak[byte * 8 : byte * 8 + 8] *= -0.1
    assert watermark._decode_votes(weak) == (tag, 4)
    # four strongly wrong bytes: nothing (beyond the code), never a wrong tag
    strong = flipped.copy()
    strong[16:24] *= -1
    assert watermark._decode_votes(strong) is None
    # every byte wrong: nothing, never a wrong tag
    assert watermark._decode_votes(-votes) is None


def test_images_stamped_by_the_old_scheme_are_still_recognised():
    from imwatermark import WatermarkEncoder

    photo = samples.astronaut().convert("RGB").resize((256, 256))  # the old encoder loops in Python: keep it small
    bits = [(watermark.MAGIC >> (15 - i)) & 1 for i in range(16)] + [(0x12345678 >> (31 - i)) & 1 for i in range(32)]
    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", bits)
    old = Image.fromarray(encoder.encode(np.ascontiguousarray(np.asarray(photo)[:, :, ::-1]), "dwtDctSvd")[:, :, ::-1])
    reading = read_watermark(old)
    assert reading["found"] and reading["scheme"] == watermark.LEGACY_SCHEME and reading["tag"] == "12345678"


def test_the_embedding_moves_each_block_by_its_svd_triple():
    """The embedding's power iteration gives each DCT block's largest singular triple as an SVD does
    (signs aside), on real image blocks: the marks stay those of the SVD-based embedding."""
    u = watermark._u_channel(np.asarray(samples.astronaut().resize((512, 512))))
    blocks = watermark._DCT @ watermark._blocks(watermark._haar_ll(u.astype(np.float64))) @ watermark._DCT.T
    left, largest, right = watermark._top_singular(blocks)
    u_svd, s_svd, vt_svd = np.linalg.svd(blocks)
    np.testing.assert_allclose(largest, s_svd[:, 0], rtol=1e-9)
    rank_one = left[:, :, None] * right[:, None, :]
    np.testing.assert_allclose(rank_one, u_svd[:, :, :1] * vt_svd[:, :1, :], atol=1e-6)


def test_the_change_lands_in_u_rounded_and_saturated_as_the_pixel_formula_says():
    """The marked pixels are ``clip(rint(channel + delta))`` for B and G (the change to U spread so that Y and V
    stay), R untouched: the fast path computes exactly the formula, ties and saturation included."""
    rgb = np.asarray(samples.astronaut().resize((300, 200)))
    delta_u = np.random.default_rng(3).normal(0, 40, rgb.shape[:2]).astype(np.float32)  # saturates some pixels
    delta_u[0, :8] = np.float32(0.5 / watermark.B_PER_U)  # halves: rounded to even
    delta_b = delta_u * np.float32(watermark.B_PER_U)
    expected = rgb.copy()
    expected[..., 2] = np.clip(np.rint(rgb[..., 2] + delta_b), 0, 255)
    expected[..., 1] = np.clip(np.rint(rgb[..., 1] + delta_b * np.float32(watermark.G_PER_B)), 0, 255)
    marked = watermark._add_to_u(rgb, delta_u)
    assert marked.dtype == np.uint8 and np.array_equal(marked, expected)
    assert (marked[..., 2] == 255).any() and (marked[..., 2] == 0).any()
