"""Does an image's provenance survive being shared? The attack suite of issue 16.

    python bench/watermark_robustness.py                      # 3 bundled photos x 512 and 1024 px, every attack
    python bench/watermark_robustness.py --sizes 1024 --photos astronaut --attacks jpeg70,resize0.5
    python bench/watermark_robustness.py --json out.json --markdown

Each bundled real photo (``imagegen.samples``: astronaut, grace_hopper, coffee) is resized to each width of
``--sizes`` and stamped by ``imagegen.provenance.stamp`` (the code that stamps every service output: watermark,
metadata, signed C2PA manifest); an audit row is written for it in a throw-away serve store, as the service does.
Every attack (re-encodes, resizes, centred crops, brightness, a screenshot-like resample, combinations) makes the
file a person would share, and ``imagegen.provenance.check_image`` reads it back with the store and the tenant.
Per attack and size: the watermark's marker found, its tag exact, the audit record (and so the request) reached,
which layers survived (manifest, text chunks), and the false marks the detector reports on the *unmarked* photos
under the same attack. PSNR of each stamped image against its photo is printed too. JSON + a table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

Attack = Callable[[Image.Image], bytes]
TENANT = "bench"


def _encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def _resize(image: Image.Image, factor: float) -> Image.Image:
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _crop(image: Image.Image, fraction: float) -> Image.Image:
    w, h = round(image.width * fraction), round(image.height * fraction)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return image.crop((left, top, left + w, top + h))


def _screenshot(image: Image.Image) -> bytes:
    """Shown scaled to 80% in a page, captured on a 1.25x display: two bilinear resamples, then PNG."""
    shown = image.resize((round(image.width * 0.8), round(image.height * 0.8)), Image.Resampling.BILINEAR)
    captured = shown.resize((round(shown.width * 1.25), round(shown.height * 1.25)), Image.Resampling.BILINEAR)
    return _encode(captured)


def _jpeg(quality: int) -> Attack:
    return lambda image: _encode(image, "JPEG", quality=quality)


def _then_jpeg(first: Callable[[Image.Image], Image.Image], quality: int = 70) -> Attack:
    return lambda image: _encode(first(image), "JPEG", quality=quality)


#: name -> what a person sharing the image does to the served file (input: the decoded served PNG)
ATTACKS: dict[str, Attack] = {
    "none (served PNG)": lambda image: b"",  # replaced by the served bytes themselves
    "png re-save": lambda image: _encode(image),
    "jpeg95": _jpeg(95),
    "jpeg85": _jpeg(85),
    "jpeg70": _jpeg(70),
    "jpeg50": _jpeg(50),
    "webp80": lambda image: _encode(image, "WEBP", quality=80),
    "resize0.5": lambda image: _encode(_resize(image, 0.5)),
    "resize0.75": lambda image: _encode(_resize(image, 0.75)),
    "resize1.5": lambda image: _encode(_resize(image, 1.5)),
    "resize2": lambda image: _encode(_resize(image, 2.0)),
    "crop95": lambda image: _encode(_crop(image, 0.95)),
    "crop90": lambda image: _encode(_crop(image, 0.90)),
    "crop80": lambda image: _encode(_crop(image, 0.80)),
    "brightness+10%": lambda image: _encode(ImageEnhance.Brightness(image).enhance(1.1)),
    "brightness-10%": lambda image: _encode(ImageEnhance.Brightness(image).enhance(0.9)),
    "screenshot": _screenshot,
    "resize0.5+jpeg70": _then_jpeg(lambda image: _resize(image, 0.5)),
    "resize0.75+jpeg70": _then_jpeg(lambda image: _resize(image, 0.75)),
    "crop90+jpeg70": _then_jpeg(lambda image: _crop(image, 0.90)),
}


def photos(names: list[str]) -> dict[str, Image.Image]:
    from imagegen import samples

    every = {"astronaut": samples.astronaut, "grace_hopper": samples.grace_hopper, "coffee": samples.no_face_image}
    unknown = sorted(set(names) - set(every))
    if unknown:
        raise SystemExit(f"unknown photo(s) {', '.join(unknown)}; choose from {', '.join(every)}")
    return {name: every[name]() for name in names}


def at_width(image: Image.Image, width: int) -> Image.Image:
    height = round(image.height * width / image.width)
    return image.resize((width, height), Image.Resampling.LANCZOS)


def psnr(a: Image.Image, b: Image.Image) -> float:
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(10 * np.log10(255**2 / np.mean(diff**2)))


def run(sizes: list[int], names: list[str], attacks: list[str], unmarked: bool) -> dict:
    from imagegen import provenance
    from imagegen.serve.store import ServeStore

    rows: list[dict] = []
    stamped: list[dict] = []
    with ServeStore.open() as store, Progress(transient=True) as progress:
        sources = photos(names)
        task = progress.add_task("stamping", total=len(sources) * len(sizes))
        for name, photo in sources.items():
            for size in sizes:
                image = at_width(photo, size)
                image_id, request_id = uuid.uuid4().hex, f"bench-{uuid.uuid4().hex[:12]}"
                started = time.perf_counter()
                png, record = provenance.stamp(
                    image,
                    {"preset": "bench", "method": None, "character": None, "seed": 0},
                    image_id=image_id,
                    request_id=request_id,
                )
                stamp_s = time.perf_counter() - started
                store.add_audit([_audit_row(image_id, request_id, record)])
                served = _open(png)
                stamped.append(
                    {
                        "photo": name,
                        "size": f"{image.width}x{image.height}",
                        "width": size,
                        "psnr_db": round(psnr(served, image), 2),
                        "stamp_s": round(stamp_s, 3),
                        "png": png,
                        "served": served,
                        "original": image,
                        "image_id": image_id,
                        "request_id": request_id,
                    }
                )
                progress.advance(task)
        task = progress.add_task("attacks", total=len(stamped) * len(attacks))
        for item in stamped:
            for attack in attacks:
                data = item["png"] if attack.startswith("none") else ATTACKS[attack](item["served"])
                started = time.perf_counter()
                report = provenance.check_image(data, store, tenant=TENANT)
                check_s = time.perf_counter() - started
                mark = report["watermark"]
                row = {
                    "photo": item["photo"],
                    "width": item["width"],
                    "attack": attack,
                    "marker_found": bool(mark.get("found")),
                    "tag_exact": mark.get("tag") == item["image_id"][:8],
                    "audit_reached": report.get("request_id") == item["request_id"],
                    "manifest_valid": report["layers"]["manifest"],
                    "text_chunks": report["layers"]["text_chunks"],
                    "found_at": {k: mark.get(k) for k in ("crop", "gain", "corrected_bytes") if k in mark},
                    "check_s": round(check_s, 3),
                }
                if unmarked:
                    original = item["original"]
                    data = _encode(original) if attack.startswith("none") else ATTACKS[attack](original)
                    row["false_mark"] = bool(provenance.read_watermark(_open(data)).get("found"))
                rows.append(row)
                progress.advance(task)
    return {
        "stamped": [{k: v for k, v in s.items() if k not in ("png", "served", "original")} for s in stamped],
        "rows": rows,
        "summary": summarise(rows, sizes, attacks),
    }


def _audit_row(image_id: str, request_id: str, record: dict) -> dict:
    from imagegen import provenance

    return {
        "image_id": image_id,
        "request_id": request_id,
        "job_id": None,
        "key_id": "bench",
        "tenant": TENANT,
        "preset": record.get("preset"),
        "character": None,
        "character_version": None,
        "method": None,
        "prompt_sha256": "0" * 64,
        "seed": 0,
        "watermark_tag": provenance.tag_for(image_id),
    }


def summarise(rows: list[dict], sizes: list[int], attacks: list[str]) -> list[dict]:
    out = []
    for attack in attacks:
        for size in sizes:
            group = [r for r in rows if r["attack"] == attack and r["width"] == size]
            if not group:
                continue
            entry = {"attack": attack, "width": size, "images": len(group)}
            for key in ("marker_found", "tag_exact", "audit_reached", "manifest_valid", "text_chunks", "false_mark"):
                if key in group[0]:
                    entry[key] = sum(r[key] for r in group)
            entry["check_s_max"] = max(r["check_s"] for r in group)
            out.append(entry)
    return out


COLUMNS = (
    ("marker_found", "marker found"),
    ("tag_exact", "tag exact"),
    ("audit_reached", "audit reached"),
    ("manifest_valid", "C2PA valid"),
    ("text_chunks", "text chunks"),
    ("false_mark", "false marks (unmarked)"),
)


def print_table(result: dict) -> None:
    console = Console(width=200)
    table = Table(title="provenance after sharing (count of images)")
    table.add_column("attack")
    table.add_column("width", justify="right")
    for _, label in COLUMNS:
        table.add_column(label, justify="right")
    table.add_column("check s (max)", justify="right")
    for s in result["summary"]:
        cells = [f"{s[k]}/{s['images']}" if k in s else "-" for k, _ in COLUMNS]
        table.add_row(s["attack"], str(s["width"]), *cells, f"{s['check_s_max']:.2f}")
    console.print(table)
    psnrs = ", ".join(f"{s['photo']} {s['size']}: {s['psnr_db']} dB" for s in result["stamped"])
    console.print(f"PSNR of the stamped images: {psnrs}")


def markdown(result: dict) -> str:
    header = ["attack", "width", *(label for _, label in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for s in result["summary"]:
        cells = [f"{s[k]}/{s['images']}" if k in s else "-" for k, _ in COLUMNS]
        lines.append("| " + " | ".join([s["attack"], str(s["width"]), *cells]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,1024", help="widths the photos are stamped at")
    parser.add_argument("--photos", default="astronaut,grace_hopper,coffee")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated names: " + ", ".join(ATTACKS))
    parser.add_argument("--no-unmarked", action="store_true", help="skip the false-mark runs on unmarked photos")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    parser.add_argument("--markdown", action="store_true", help="also print the summary as a Markdown table")
    args = parser.parse_args()
    attacks = [a for a in args.attacks.split(",") if a]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise SystemExit(f"unknown attack(s) {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="imagegen-wm-bench-") as home:
        os.environ["IMAGEGEN_HOME"] = home  # a throw-away store and development signer
        from imagegen.settings import get_settings

        get_settings.cache_clear()
        result = run(sizes, args.photos.split(","), attacks, not args.no_unmarked)
    result["command"] = " ".join(["python", *sys.argv])
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    print_table(result)
    if args.markdown:
        print(markdown(result))


if __name__ == "__main__":
    main()
