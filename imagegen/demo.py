"""The README's first command: the main job end to end on the embedded defaults.

Renders a small grid with the tiny FLUX and SDXL presets (real diffusers pipelines loaded with
``from_pretrained``; random weights, so the pictures are noise) into an output directory, and a
contact sheet of everything it rendered.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.progress import Progress

from imagegen.images import contact_sheet, save_png
from imagegen.pipelines.renderer import Renderer
from imagegen.pipelines.types import RenderRequest

DEMO_PRESETS = ("tiny-flux", "tiny-sdxl")
DEMO_PROMPTS = ("a photo of a woman at a cafe at night", "portrait of a man in a studio, soft lighting")
DEMO_SEEDS = (7, 8)


def run_demo(out: Path, progress_factory: Callable[[], Progress]) -> dict[str, Path]:
    """Render the demo grid into ``out``; returns what was written, by label."""
    renders = out / "renders"
    renders.mkdir(parents=True, exist_ok=True)
    images, labels = [], []
    with progress_factory() as bar:
        for preset in DEMO_PRESETS:
            requests = [RenderRequest(prompt=p, seed=s) for p in DEMO_PROMPTS for s in DEMO_SEEDS]
            task = bar.add_task(f"demo {preset}", total=len(requests))
            renderer = Renderer(preset)
            for result in renderer.render(requests, strict=True):
                name = f"{preset}-p{DEMO_PROMPTS.index(result.request.prompt)}-seed{result.seed}.png"
                save_png(result.image, renders / name, result.metadata())
                images.append(result.image)
                labels.append(f"{preset} s{result.seed}")
                bar.advance(task)
    sheet_path = out / "renders-grid.png"
    contact_sheet(images, labels, columns=len(DEMO_PROMPTS) * len(DEMO_SEEDS)).save(sheet_path)
    return {"renders": renders, "grid": sheet_path}
