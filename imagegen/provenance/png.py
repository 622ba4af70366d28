"""Served PNGs: OpenCV's libpng with one filter for every row, and PIL's text chunks framed in.

PIL chooses a filter for each row by trying all five, which is most of its encode time, and has no option to fix
one. At the served zlib settings (level 1, run-length strategy) a 1024 px photo encodes in 66 ms with PIL against
41 ms with libpng and the Paeth filter on every row, for the same size (1210 against 1206 KB); 0.14 against 0.26 ms
at 64 px (``bench/stamp_cost.py``). OpenCV is already loaded for the watermark, and lets go of the GIL while it
encodes, as PIL does. The text chunks stay PIL's (``PngInfo.add_itxt`` serialises them); they are framed here and
placed where PIL places them, after ``IHDR``. Served PNGs carry text chunks only: any other chunk is refused rather
than placed by rules of PIL's that this module would have to copy.

A large image is encoded in horizontal strips on several threads (``encode_strips``): zlib is most of an encode and
runs on one core, so a lone 1024 px render's PNG waited ~30 ms for it. libpng filters each strip (Paeth, zlib
level 0: the filtered rows come out stored), the strip's first row against the real row above it (the strip is
encoded with that row on top, whose stored bytes are dropped); each strip's rows are compressed as one piece of a
single deflate stream (a sync flush ends every piece but the last), and the pieces' Adler-32 checksums are
combined. The file decodes to the same filtered rows, byte for byte, as one libpng encode, and is the same size
within a few hundred bytes (the run-length strategy's matches never reach across a strip's edge anyway).
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image, PngImagePlugin

from imagegen.provenance.c2pa_embed import PNG_SIGNATURE, manifest_offset

#: zlib level of served PNGs: level 1 encodes a 1024 px render several times faster than the default 6 for ~13% more
#: bytes; the encode runs on the render's critical path
COMPRESS_LEVEL = 1
#: zlib strategy: run-length matches only (``Z_RLE``) suit PNG's filtered rows (faster and smaller at level 1)
COMPRESS_STRATEGY = cv2.IMWRITE_PNG_STRATEGY_RLE
#: every row's filter: Paeth predicts photos best of the five (the size of PIL's per-row choice, at one filter's cost)
ROW_FILTER = cv2.IMWRITE_PNG_FILTER_PAETH
#: PIL modes encoded as they are (to OpenCV's channel order); any other is converted to RGB first
_TO_OPENCV = {"RGB": cv2.COLOR_RGB2BGR, "RGBA": cv2.COLOR_RGBA2BGRA, "L": None}
_PARAMS = [
    cv2.IMWRITE_PNG_COMPRESSION,
    COMPRESS_LEVEL,
    cv2.IMWRITE_PNG_STRATEGY,
    COMPRESS_STRATEGY,
    cv2.IMWRITE_PNG_FILTER,
    ROW_FILTER,
]
#: the chunks ``encode`` places (PIL's text chunks), right after ``IHDR`` as PIL does
TEXT_CHUNKS = frozenset({b"tEXt", b"iTXt", b"zTXt"})


#: threads that encode one large image's strips (shared by every image of the process)
STRIP_THREADS = max(1, min(8, os.cpu_count() or 1))
#: an image of at least this many pixels is encoded in strips (below it, a thread hand-over costs more than it saves)
STRIP_MIN_PIXELS = 320 * 320
#: no strip is thinner than this many rows (each is an encode of its own, with its fixed cost)
STRIP_MIN_ROWS = 64
#: the zlib header of a level-1 stream (deflate, 32 KiB window, "fastest" level flag; CMF * 256 + FLG is 0 mod 31)
_ZLIB_HEADER = b"\x78\x01"
_STORED = [cv2.IMWRITE_PNG_COMPRESSION, 0, cv2.IMWRITE_PNG_FILTER, ROW_FILTER]
_ADLER_BASE = 65521
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def encode(image: Image.Image, info: PngImagePlugin.PngInfo | None = None, threads: int | None = None) -> bytes:
    """``image`` as PNG bytes with ``info``'s chunks (RGB, RGBA and L as they are; other modes as RGB).

    ``threads``: the most strips a large image is encoded in at once (default ``STRIP_THREADS``; 1: in one piece).
    A caller encoding several images side by side divides the threads between them: strips cost ~20% more CPU
    than one encode, a price worth paying only for cores that would otherwise idle."""
    if image.mode not in _TO_OPENCV:
        image = image.convert("RGB")
    pixels = np.asarray(image)
    conversion = _TO_OPENCV[image.mode]
    if conversion is not None:
        pixels = cv2.cvtColor(pixels, conversion)
    strips = strip_count(pixels.shape[0], pixels.shape[1], threads)
    if strips > 1:
        data = encode_strips(pixels, strips)
    else:
        ok, encoded = cv2.imencode(".png", pixels, _PARAMS)
        if not ok:
            raise ValueError(f"OpenCV could not encode a {image.mode} image of {image.size} as PNG")
        data = encoded.tobytes()
    if info is None or not info.chunks:
        return data
    others = sorted({bytes(kind) for kind, *_ in info.chunks} - TEXT_CHUNKS)
    if others:
        raise ValueError(f"served PNGs carry text chunks only, not {b', '.join(others).decode(errors='replace')}")
    header_end = manifest_offset(data, "image/png")  # right after IHDR (checked), where the C2PA manifest goes too
    text = b"".join(chunk(kind, body) for kind, body, *_ in info.chunks)
    return data[:header_end] + text + data[header_end:]


def chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, data, and the CRC-32 of type and data."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def strip_count(rows: int, columns: int, threads: int | None = None) -> int:
    """How many strips an image of ``rows`` x ``columns`` pixels is encoded in (1: in one piece)."""
    threads = STRIP_THREADS if threads is None else threads
    if rows * columns < STRIP_MIN_PIXELS:
        return 1
    return max(1, min(threads, rows // STRIP_MIN_ROWS))


def encode_strips(pixels: np.ndarray, strips: int) -> bytes:
    """OpenCV-ordered ``pixels`` (``[rows, columns]`` or ``[rows, columns, channels]``, uint8) as a PNG without
    text chunks, its rows compressed in ``strips`` pieces on the strip threads."""
    rows = pixels.shape[0]
    edges = [rows * i // strips for i in range(strips + 1)]
    pieces = list(_strip_pool().map(_strip, [(pixels, edges[i], edges[i + 1], i == strips - 1) for i in range(strips)]))
    checksum = pieces[0].adler
    for piece in pieces[1:]:
        checksum = adler32_combine(checksum, piece.adler, piece.length)
    stream = b"".join([_ZLIB_HEADER, *(piece.deflate for piece in pieces), struct.pack(">I", checksum)])
    header = pieces[0].header
    ihdr = header[:4] + struct.pack(">I", rows) + header[8:]
    return b"".join([PNG_SIGNATURE, chunk(b"IHDR", ihdr), chunk(b"IDAT", stream), chunk(b"IEND", b"")])


class _Strip(NamedTuple):
    """One strip's part of the file."""

    #: the strip's own ``IHDR`` data (its height is replaced by the image's)
    header: bytes
    #: its filtered rows as a piece of the image's deflate stream
    deflate: bytes
    #: Adler-32 of its filtered rows, and their length (what combining the checksums needs)
    adler: int
    length: int


def _strip(task: tuple[np.ndarray, int, int, bool]) -> _Strip:
    """Rows ``start:end`` as a :class:`_Strip`, encoded with the row above on top so that libpng filters the first
    against its real neighbour."""
    pixels, start, end, last = task
    above = 1 if start > 0 else 0
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(pixels[start - above : end]), _STORED)
    if not ok:
        raise ValueError(f"OpenCV could not encode rows {start}-{end} of a {pixels.shape} image as PNG")
    header, stored = _ihdr_and_data(encoded.tobytes())
    filtered = zlib.decompress(stored)
    row_bytes = len(filtered) // (end - start + above)
    if above:
        filtered = filtered[row_bytes:]  # the row above: filtered against nothing, it is the previous strip's
    deflate = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS, 8, zlib.Z_RLE)
    piece = deflate.compress(filtered) + deflate.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
    return _Strip(header, piece, zlib.adler32(filtered), len(filtered))


def _ihdr_and_data(data: bytes) -> tuple[bytes, bytes]:
    """A PNG's ``IHDR`` data and its ``IDAT`` chunks' data joined (the zlib stream)."""
    at, header, idat = 8, b"", []
    while at < len(data):
        length = struct.unpack(">I", data[at : at + 4])[0]
        kind = data[at + 4 : at + 8]
        if kind == b"IHDR":
            header = data[at + 8 : at + 8 + length]
        elif kind == b"IDAT":
            idat.append(data[at + 8 : at + 8 + length])
        at += 12 + length
    return header, b"".join(idat)


def adler32_combine(first: int, second: int, second_length: int) -> int:
    """The Adler-32 of two byte strings one after the other, from each one's checksum and the second's length
    (zlib's ``adler32_combine``, which Python's ``zlib`` does not expose)."""
    base = _ADLER_BASE
    remainder = second_length % base
    low = first & 0xFFFF
    high = (remainder * low) % base
    low = (low + (second & 0xFFFF) + base - 1) % base
    high = (high + (first >> 16) + (second >> 16) + base - remainder) % base
    return low | (high << 16)


def _strip_pool() -> ThreadPoolExecutor:
    """The process's strip threads (made anew in a forked child, which inherits the pool but not its threads)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool, _pool_pid = ThreadPoolExecutor(STRIP_THREADS, thread_name_prefix="png-strip"), os.getpid()
        return _pool
