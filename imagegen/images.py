"""Writing rendered images with their metadata, and reading it back.

Every PNG carries what made it as PNG text chunks: one chunk per headline field (``prompt``,
``seed``, ``preset`` ...) so ordinary tools show them, plus ``imagegen`` holding the whole record
as JSON (timings and library versions included).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from imagegen.files import atomic_write

#: written as their own PNG text chunks too (``prompt_sha256`` stands in for the prompt in shared images)
HEADLINE_FIELDS = (
    "prompt",
    "negative_prompt",
    "prompt_sha256",
    "seed",
    "preset",
    "width",
    "height",
    "steps",
    "guidance",
)
RECORD_KEY = "imagegen"


def png_info(metadata: dict[str, Any]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key in HEADLINE_FIELDS:
        if metadata.get(key) is not None:
            info.add_itxt(key, str(metadata[key]))
    info.add_itxt(RECORD_KEY, json.dumps(metadata, sort_keys=True, default=str))
    return info


def save_png(image: Image.Image, path: Path, metadata: dict[str, Any]) -> Path:
    """Write ``image`` with ``metadata`` atomically (temp file + rename): no half-written PNGs."""
    return atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG", pnginfo=png_info(metadata)))


def read_png_metadata(path: Path) -> dict[str, Any]:
    """The full record written by ``save_png`` (empty when the file has none)."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}) or {}
        raw = text.get(RECORD_KEY)
    return json.loads(raw) if raw else {}


def contact_sheet(images: list[Image.Image], labels: list[str], columns: int, cell: int = 128) -> Image.Image:
    """A grid of images with a caption under each: what a person looks at first."""
    from PIL import ImageDraw

    rows = max(1, -(-len(images) // columns))
    caption = 14
    sheet = Image.new("RGB", (columns * cell, rows * (cell + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (index % columns) * cell, (index // columns) * (cell + caption)
        sheet.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        draw.text((x + 2, y + cell + 1), label[: cell // 6], fill="black")
    return sheet
