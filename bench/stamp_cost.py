"""What stamping a served image costs: watermark, PNG encode, C2PA signature, and a batch stamped side by side.

Every image the service returns is watermarked, encoded and signed once, in its renderer replica, on the render's
critical path (``RendererActor.finish_all``). At 1024 px that is hundreds of CPU milliseconds per image, so it is
measured here on a real photo (scikit-image's astronaut, upscaled), best of ``--repeat``:

    .venv/bin/python bench/stamp_cost.py [--size 1024] [--batch 4] [--repeat 3] [--json out.json]

Prints a table and a JSON line: ``watermark_ms``, ``png_pil_level6_ms`` / ``png_pil_level1_ms`` /
``png_pil_level1_rle_ms`` (PIL, which picks a filter per row: its default level, the served level, and that level with
the served zlib strategy) and ``png_served_ms`` (what is served: ``imagegen.provenance.png``, in strips on
``png_strip_threads`` threads when large; ``png_served_one_piece_ms`` on one) with their sizes,
``sign_ms``, ``sign_busy_ms`` (the signature while another Python thread is busy: ``provenance.c2pa_embed``),
``stamp_ms`` (the whole ``provenance.stamp`` of a lone image; ``stamp_one_piece_ms`` with its PNG in one piece),
``batch_serial_ms`` and ``batch_threads_ms`` (``--batch`` images one after another, in one piece, against
``STAMP_THREADS`` side by side with the strip threads divided between them, as a replica stamps a batch),
``launch_op_us`` / ``launch_op_beside_stamps_us`` (a small torch op, alone and while a thread stamps without pause:
the GIL the stamps take from the thread launching a render's kernels when they run behind it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image
from rich.console import Console
from rich.table import Table


def best_ms(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1), out


def launch_loop_beside(work: Callable[[], Any], ops: int = 100_000) -> tuple[float, float]:
    """Microseconds per small torch op, alone and while another thread stamps without pause: what a replica's stamps
    behind the next batch (``RendererConfig.overlap_finishing``) cost the thread that launches a render's kernels.
    Each torch call lets go of the GIL and takes it back, so it waits whenever the stamp's Python parts hold it. One
    torch thread: the measure is the GIL, not this machine's two cores shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randn(64, 64)

    def loop() -> float:
        y, started = x, time.perf_counter()
        for _ in range(ops):
            y = y * 1.0001
        return round((time.perf_counter() - started) / ops * 1e6, 3)

    try:
        alone = min(loop() for _ in range(3))
        stop = threading.Event()

        def stamping() -> None:
            while not stop.is_set():
                work()

        stamper = threading.Thread(target=stamping, daemon=True)
        stamper.start()
        try:
            beside = min(loop() for _ in range(3))
        finally:
            stop.set()
            stamper.join()
    finally:
        torch.set_num_threads(threads)
    return alone, beside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("IMAGEGEN_HOME", tempfile.mkdtemp(prefix="stamp-bench-"))

    from skimage import data

    import imagegen.provenance.stamp  # noqa: F401 - the module, not the package's re-exported function
    from imagegen.provenance import c2pa_embed, manifest, watermark
    from imagegen.provenance import png as served_png
    from imagegen.provenance.keys import signer_material
    from imagegen.serve.actors import STAMP_THREADS, encode_threads

    stamp_module = sys.modules["imagegen.provenance.stamp"]
    photo = Image.fromarray(data.astronaut()).resize((args.size, args.size), Image.LANCZOS)
    signer = signer_material()
    figures: dict[str, Any] = {
        "size": args.size,
        "batch": args.batch,
        "stamp_threads": STAMP_THREADS,
        "png_strip_threads": served_png.STRIP_THREADS,
    }

    figures["watermark_ms"], marked = best_ms(lambda: watermark.embed(photo, 0x1234ABCD), args.repeat)

    def pil_encode(level: int, strategy: int = zlib.Z_DEFAULT_STRATEGY) -> bytes:
        buffer = io.BytesIO()
        marked.save(buffer, format="PNG", compress_level=level, compress_type=strategy)
        return buffer.getvalue()

    # PIL (a filter chosen per row) at its default level, at the served level, and with the served strategy too;
    # then what is served: libpng with the Paeth filter on every row (imagegen.provenance.png)
    level = served_png.COMPRESS_LEVEL
    for name, encode in {
        "png_pil_level6": lambda: pil_encode(6),
        f"png_pil_level{level}": lambda: pil_encode(level),
        f"png_pil_level{level}_rle": lambda: pil_encode(level, zlib.Z_RLE),
        "png_served_one_piece": lambda: served_png.encode(marked, threads=1),
        "png_served": lambda: served_png.encode(marked),
    }.items():
        figures[f"{name}_ms"], png = best_ms(encode, args.repeat)
        figures[f"{name}_kb"] = len(png) // 1024
    record = {"image_id": "1234abcd" * 4, "request_id": "bench", "preset": "bench", "watermark": {}, "c2pa": {}}
    figures["sign_ms"], _ = best_ms(lambda: manifest.sign(png, "png", record, signer), args.repeat)
    # the same signature while another Python thread of the process is busy (a replica's other threads)
    busy = threading.Event()

    def spin() -> None:
        while not busy.is_set():
            sum(range(1000))

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        figures["sign_busy_ms"], _ = best_ms(lambda: manifest.sign(png, "png", record, signer), args.repeat)
    finally:
        busy.set()
        spinner.join()
    figures["sign_holds_gil"] = c2pa_embed.holds_gil()

    def stamp(index: int, threads: int | None = None) -> bytes:
        image_id = f"{index:08x}" + "0" * 24
        metadata = {"preset": "bench"}
        return stamp_module.stamp(photo, metadata, image_id=image_id, request_id="bench", encode_threads=threads)[0]

    figures["stamp_one_piece_ms"], _ = best_ms(lambda: stamp(0, 1), args.repeat)
    figures["stamp_ms"], _ = best_ms(lambda: stamp(0, encode_threads(1)), args.repeat)
    figures["batch_serial_ms"], _ = best_ms(lambda: [stamp(i, 1) for i in range(args.batch)], args.repeat)
    # as a replica stamps a batch: STAMP_THREADS side by side, the strip threads divided between them
    with ThreadPoolExecutor(STAMP_THREADS) as pool:
        threads = encode_threads(args.batch)
        figures["batch_threads_ms"], _ = best_ms(
            lambda: list(pool.map(lambda i: stamp(i, threads), range(args.batch))), args.repeat
        )
    figures["launch_op_us"], figures["launch_op_beside_stamps_us"] = launch_loop_beside(lambda: stamp(0))
    figures["load_average_1m"] = round(os.getloadavg()[0], 2)

    table = Table(title=f"stamping a {args.size} px photo (best of {args.repeat})")
    table.add_column("what")
    table.add_column("ms", justify="right")
    for key, value in figures.items():
        table.add_row(key, str(value))
    Console(stderr=True).print(table)
    line = json.dumps(figures)
    print(line)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(line + "\n")


if __name__ == "__main__":
    main()
