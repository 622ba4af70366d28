"""What hostile reference uploads cost before they are refused: wall time and peak memory.

    .venv/bin/python bench/upload_limits.py            # table + JSON on stdout
    .venv/bin/python bench/upload_limits.py --json out.json

Each case runs ``ingest_images`` (what ``POST /v1/characters`` and ``imagegen characters add``
call before any face analysis) in a fresh child process, so the peak resident memory it reports
(the child's ``VmHWM``, reset after imports, minus its resident size then; Linux) is that case's alone.
The cases are the issue's: eight identical blank 6000x6000 PNGs (before the limits: 58 s and
2.3 GB of ingress memory), eight *different* 6000x6000 headers (288 Mpixel in one request), one
144-Mpixel header; and, for scale, an accepted set: six 12-Mpixel photo-like JPEGs (each decoded,
shrunk to 1536 px and re-encoded).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import struct
import sys
import time
import zlib

import numpy as np
from PIL import Image


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def cases() -> dict[str, list[tuple[str, bytes]]]:
    blank = encoded(Image.new("RGB", (6000, 6000), "white"), "PNG")
    rng = np.random.default_rng(0)
    photos = []
    for _ in range(6):
        small = rng.integers(0, 256, size=(75, 100, 3), dtype=np.uint8)  # smooth once upscaled: photo-like size
        photos.append(encoded(Image.fromarray(small).resize((4000, 3000), Image.BILINEAR), "JPEG", quality=90))
    return {
        "8 identical blank 6000x6000 PNGs": [(f"blank-{i}.png", blank) for i in range(8)],
        "8 different 6000x6000 headers (288 Mpx)": [(f"h{i}.png", png_header(6000, 6000 - i)) for i in range(8)],
        "one 144-Mpixel header": [("huge.png", png_header(12_000, 12_000))],
        "accepted: 6 photo-like 12-Mpixel JPEGs": [(f"p{i}.jpg", data) for i, data in enumerate(photos)],
    }


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def run_case(files: list[tuple[str, bytes]], queue: mp.Queue) -> None:
    from imagegen.identity.ingest import ingest_images

    with open("/proc/self/clear_refs", "w") as refs:  # reset the peak (VmHWM) to the current size
        refs.write("5")
    baseline = _rss_kb("VmRSS")
    started = time.perf_counter()
    try:
        ingest_images(files)
        outcome = "accepted"
    except Exception as exc:  # noqa: BLE001 - the refusal is the measurement
        outcome = f"refused: {getattr(exc, 'code', type(exc).__name__)}"
    seconds = time.perf_counter() - started
    peak = _rss_kb("VmHWM")
    queue.put({"seconds": seconds, "peak_mb": max(0, peak - baseline) / 1024, "outcome": outcome})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for label, files in cases().items():
        queue = ctx.Queue()
        child = ctx.Process(target=run_case, args=(files, queue))
        child.start()
        result = queue.get()
        child.join()
        rows.append({"case": label, "upload_kb": round(sum(len(d) for _, d in files) / 1024), **result})
    print(f"{'case':44} {'upload KB':>10} {'seconds':>9} {'peak MB':>8}  outcome")
    for row in rows:
        figures = f"{row['upload_kb']:>10} {row['seconds']:>9.3f} {row['peak_mb']:>8.1f}"
        print(f"{row['case']:44} {figures}  {row['outcome']}")
    print(json.dumps({"python": sys.version.split()[0], "cases": rows}, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
