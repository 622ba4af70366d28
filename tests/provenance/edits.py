"""Edit an image's pixels *in place*: the file keeps every other byte (its C2PA manifest included).

Re-encoding with Pillow would drop the manifest (Pillow does not copy unknown chunks), which
tests that the manifest is lost, not that it refuses an edit. These helpers change pixel data
inside the file and leave the manifest where it was, so validation must notice the edit.
"""

from __future__ import annotations

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data.startswith(PNG_SIGNATURE)
    chunks, at = [], len(PNG_SIGNATURE)
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind = data[at + 4 : at + 8]
        chunks.append((kind, data[at + 8 : at + 8 + length]))
        at += 12 + length
    return chunks


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def edit_png_pixels(data: bytes) -> bytes:
    """``data`` with one row of pixels brightened: IDAT re-compressed, every other chunk kept as is."""
    chunks = png_chunks(data)
    raw = bytearray(zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT")))
    width = struct.unpack(">I", dict(chunks)[b"IHDR"][:4])[0]
    row = 1 + width * 3  # filter byte + RGB
    start = (len(raw) // row // 2) * row  # a row in the middle
    raw[start] = 0  # filter "none": the bytes below are the pixels
    for i in range(start + 1, start + row):
        raw[i] = 255
    out, idat_written = bytearray(PNG_SIGNATURE), False
    for kind, body in chunks:
        if kind == b"IDAT":
            if not idat_written:
                out += _chunk(b"IDAT", zlib.compress(bytes(raw)))
                idat_written = True
            continue
        out += _chunk(kind, body)
    return bytes(out)


def edit_jpeg_pixels(data: bytes) -> bytes:
    """``data`` with some entropy-coded bytes of its scan changed (segments before the scan untouched)."""
    assert data[:2] == b"\xff\xd8"
    at = 2
    while data[at : at + 2] != b"\xff\xda":  # walk the segments (their bodies may hold any byte)
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        at += 2 + length
    (length,) = struct.unpack(">H", data[at + 2 : at + 4])
    scan = at + 2 + length
    middle = scan + (len(data) - scan) // 2
    out = bytearray(data)
    changed = 0
    for i in range(middle, len(data) - 2):
        if out[i] not in (0xFF, 0x00, 0x7F, 0x80) and out[i - 1] != 0xFF and out[i + 1] != 0xFF:
            out[i] ^= 0x01
            changed += 1
            if changed == 16:
                break
    assert changed == 16
    return bytes(out)
