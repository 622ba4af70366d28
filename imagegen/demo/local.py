"""The offline part of the demo: a character from packaged photos and a grid of renders.

Registers a demo character from public-domain photos that ship in installed packages (the NASA
astronaut portrait from scikit-image, augmented), with its reference report and contact sheet;
the provenance says exactly where the photos come from. Approves it and renders a small grid
with the tiny FLUX and SDXL presets (real diffusers pipelines loaded with ``from_pretrained``;
random weights, so the pictures are noise), each prompt without identity, with the demo
character through PuLID and through an IP-Adapter method (loaded by diffusers'
``load_ip_adapter`` on the same pipeline), and a contact sheet.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.progress import Progress

from imagegen import samples
from imagegen.identity.provider import identity_renderer
from imagegen.identity.registry import Registry
from imagegen.images import contact_sheet, save_png
from imagegen.pipelines.types import RenderRequest

DEMO_PRESETS = ("tiny-flux", "tiny-sdxl")
DEMO_PROMPTS = ("a photo of a woman at a cafe at night", "portrait of a man in a studio, soft lighting")
DEMO_SEEDS = (7, 8)
DEMO_CHARACTER = "demo-astronaut"
#: the packaged photo the demo character is made of (see :mod:`imagegen.samples`)
DEMO_SAMPLE = "astronaut"
#: the IP-Adapter method each tiny preset also renders the character with (PuLID is their default)
DEMO_IPADAPTER = {"tiny-flux": "ipadapter-flux", "tiny-sdxl": "ipadapter-faceid-plusv2-sdxl"}


def register_demo_character(out: Path) -> dict[str, Path]:
    """(Re-)register the demo character and write its report and contact sheet into ``out``."""
    with Registry.open() as registry:
        registration = samples.register_sample_character(
            registry,
            DEMO_CHARACTER,
            DEMO_SAMPLE,
            name="Demo astronaut",
            card={"look": "short brown hair, orange flight suit", "style_notes": "NASA portrait lighting"},
            replace=True,
        )
    return registration.write_artifacts(out / "characters")


def run_local_demo(out: Path, progress_factory: Callable[[], Progress]) -> dict[str, Path]:
    """Register the demo character and render the demo grid into ``out``; returns what was written, by label."""
    renders = out / "renders"
    renders.mkdir(parents=True, exist_ok=True)
    images, labels = [], []
    with progress_factory() as bar:
        task = bar.add_task("demo character", total=1)
        character = register_demo_character(out)
        bar.advance(task)
        for preset in DEMO_PRESETS:
            requests = [
                RenderRequest(prompt=p, seed=s, character=c, method=m)
                for p in DEMO_PROMPTS
                for s in DEMO_SEEDS
                for c, m in ((None, None), (DEMO_CHARACTER, None), (DEMO_CHARACTER, DEMO_IPADAPTER[preset]))
            ]
            task = bar.add_task(f"demo {preset}", total=len(requests))
            renderer = identity_renderer(preset)
            for result in renderer.render(requests, strict=True):
                who = result.request.character or "plain"
                if result.request.character and result.request.method.startswith("ipadapter"):
                    who = f"{who}-ipadapter"
                name = f"{preset}-{who}-p{DEMO_PROMPTS.index(result.request.prompt)}-seed{result.seed}.png"
                save_png(result.image, renders / name, result.metadata())
                images.append(result.image)
                conditioning = result.request.method.split("-")[0] if result.request.character else "plain"
                labels.append(f"{preset[5:]} {conditioning} s{result.seed}")
                bar.advance(task)
    sheet_path = out / "renders-grid.png"
    contact_sheet(images, labels, columns=len(DEMO_PROMPTS) * len(DEMO_SEEDS) * 3).save(sheet_path)
    return {
        "reference report": character["report"],
        "reference contact sheet": character["contact_sheet"],
        "renders": renders,
        "grid": sheet_path,
    }
