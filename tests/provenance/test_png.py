"""The served PNG encoder (``imagegen.provenance.png``): lossless in every mode a render or an upload has, PIL's text
chunks where PIL puts them, and about PIL's size at the served zlib level."""

from __future__ import annotations

import io
import struct
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
