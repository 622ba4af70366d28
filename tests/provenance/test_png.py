"""The served PNG encoder (``imagegen.provenance.png``): lossless in every mode a render or an upload has, PIL's text
chunks where PIL puts them, and about PIL's size at the served zlib level."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from imagegen import samples
from imagegen.provenance import png


def chunk_types(data: bytes) -> list[bytes]:
    """The chunks' types in order (a run of IDAT chunks as one: encoders split the image data differently), each
    chunk's CRC checked."""
    kinds, at = [], 8
    while at < len(data):
        length = struct.unpack(">I", data[at : at + 4])[0]
        body = data[at + 4 : at + 8 + length]
        assert struct.unpack(">I", data[at + 8 + length : at + 12 + length])[0] == zlib.crc32(body), body[:4]
        if not (kinds and kinds[-1] == body[:4] == b"IDAT"):
            kinds.append(body[:4])
        at += 12 + length
    return kinds


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_every_pixel_comes_back_in_its_own_mode(mode):
    photo = samples.astronaut().convert("RGB").resize((96, 80))
    image = photo.convert(mode)
    if mode == "RGBA":
        image.putalpha(Image.linear_gradient("L").resize(image.size))
    decoded = Image.open(io.BytesIO(png.encode(image)))
    assert decoded.mode == mode and decoded.size == image.size
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_a_palette_image_is_served_as_rgb():
    image = samples.astronaut().convert("RGB").resize((64, 64)).convert("P")
    decoded = Image.open(io.BytesIO(png.encode(image)))
    assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), np.asarray(image.convert("RGB")))


def test_text_chunks_are_pils_and_sit_where_pil_puts_them():
    image = samples.astronaut().convert("RGB").resize((64, 64))
    info = PngImagePlugin.PngInfo()
    info.add_itxt("imagegen", '{"seed": 7}')
    info.add_itxt("character", "mïa")  # UTF-8, as iTXt carries it
    info.add_text("plain", "latin-1 text")
    info.add_text("squeezed", "x" * 500, zip=True)
    data = png.encode(image, info)
    assert chunk_types(data) == [b"IHDR", b"iTXt", b"iTXt", b"tEXt", b"zTXt", b"IDAT", b"IEND"]
    decoded = Image.open(io.BytesIO(data))
    expected = {"imagegen": '{"seed": 7}', "character": "mïa", "plain": "latin-1 text", "squeezed": "x" * 500}
    assert decoded.text == expected
    # PIL's own file has the same chunks, in the same order
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    assert chunk_types(buffer.getvalue()) == chunk_types(data)


def test_a_chunk_other_than_text_is_refused():
    info = PngImagePlugin.PngInfo()
    info.add(b"prVt", b"private", after_idat=True)
    with pytest.raises(ValueError, match="text chunks only, not prVt"):
        png.encode(Image.new("RGB", (8, 8)), info)


def test_a_photo_is_as_small_as_pils_at_the_served_level():
    photo = samples.astronaut().convert("RGB")
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG", compress_level=png.COMPRESS_LEVEL, compress_type=zlib.Z_RLE)
    assert len(png.encode(photo)) <= 1.03 * len(buffer.getvalue())


def idat_rows(data: bytes) -> bytes:
    """The filtered rows a PNG carries (its IDAT chunks' zlib stream, inflated: the checksum is checked too)."""
    return zlib.decompress(png._ihdr_and_data(data)[1])


@pytest.mark.parametrize(("mode", "size"), [("RGB", (1024, 1024)), ("RGBA", (700, 333)), ("L", (512, 517))])
def test_a_large_image_encoded_in_strips_carries_the_rows_of_one_encode(mode, size):
    """Strips on several threads: every pixel back, and byte for byte the filtered rows libpng writes in one piece
    (each strip's first row filtered against the real row above it), at the same size."""
    image = samples.astronaut().convert("RGB").resize(size).convert(mode)
    if mode == "RGBA":
        image.putalpha(Image.linear_gradient("L").resize(image.size))
    in_one_piece = png.encode(image, threads=1)
    for threads in (2, 3, 8):
        assert png.strip_count(size[1], size[0], threads) == min(threads, size[1] // png.STRIP_MIN_ROWS) > 1
        data = png.encode(image, threads=threads)
        assert chunk_types(data) == [b"IHDR", b"IDAT", b"IEND"]
        decoded = Image.open(io.BytesIO(data))
        assert decoded.mode == mode and decoded.size == image.size
        assert np.array_equal(np.asarray(decoded), np.asarray(image))
        assert idat_rows(data) == idat_rows(in_one_piece)
        assert abs(len(data) - len(in_one_piece)) <= 0.002 * len(in_one_piece)


def test_strips_keep_the_text_chunks_where_one_encode_puts_them():
    image = samples.astronaut().convert("RGB")
    info = PngImagePlugin.PngInfo()
    info.add_itxt("imagegen", '{"seed": 7}')
    data = png.encode(image, info, threads=2)
    assert chunk_types(data) == chunk_types(png.encode(image, info, threads=1)) == [b"IHDR", b"iTXt", b"IDAT", b"IEND"]
    assert Image.open(io.BytesIO(data)).text == {"imagegen": '{"seed": 7}'}


def test_small_images_and_thin_strips_stay_in_one_piece():
    """A strip is an encode of its own: below the size where threads pay, or thinner than STRIP_MIN_ROWS, none."""
    assert png.strip_count(64, 64, 8) == 1
    assert png.strip_count(png.STRIP_MIN_ROWS * 3, 4096, 8) == 3
    assert png.strip_count(1024, 1024, 1) == 1


def test_adler32_checksums_combine_as_one_over_both():
    rng = np.random.default_rng(0)
    for first_len, second_len in [(0, 10), (10, 0), (1, 65521), (70_000, 200_001), (3, 5)]:
        first, second = rng.bytes(first_len), rng.bytes(second_len)
        combined = png.adler32_combine(zlib.adler32(first), zlib.adler32(second), second_len)
        assert combined == zlib.adler32(first + second)


def test_a_forked_child_encodes_strips_on_threads_of_its_own():
    """A child forked after the parent encoded in strips inherits the pool but not its threads: it must not hang."""
    image = samples.astronaut().convert("RGB")
    expected = png.encode(image, threads=2)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.write(write, b"1" if png.encode(image, threads=2) == expected else b"0")
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 30
    while os.waitpid(child, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(child, 9)
            pytest.fail("the forked child hung encoding strips")
        time.sleep(0.05)
    assert os.read(read, 1) == b"1"
