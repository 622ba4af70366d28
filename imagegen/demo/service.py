"""The service part of the demo: start the service, drive it with the Python client, stop it.

``run_service_demo(out)`` starts configs/serve.yaml on a local Ray (or uses ``url`` + ``api_key``
of a running one), creates an API key, registers and approves a character over HTTP, renders
synchronously and as a job (printing the SSE progress), checks the provenance of what came back
and writes the images into ``out/service/``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from imagegen.client import Client, RenderedPNG

DEMO_SERVICE_CHARACTER = "demo-service-astronaut"


def run_service_demo(
    out: Path,
    files: list[tuple[str, bytes]],
    provenance: dict,
    *,
    url: str | None = None,
    api_key: str | None = None,
    port: int = 18765,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Returns what was written, by label."""
    from imagegen.provenance import check_image

    service = None
    if url is None:
        from imagegen.serve.auth import create_key
        from imagegen.serve.launcher import start_service
        from imagegen.serve.store import ServeStore

        log("starting the service (configs/serve.yaml, local Ray) ...")
        service = start_service(port=port, log_to_driver=False)
        url = service.url
        with ServeStore.open() as store:
            api_key = create_key(store, "demo", ["admin"])[1]
    target = out / "service"
    target.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    try:
        with Client(url, api_key) as client:
            client.wait_ready()
            if any(c["id"] == DEMO_SERVICE_CHARACTER for c in client.list_characters()):
                client.delete_character(DEMO_SERVICE_CHARACTER)
            created = client.create_character(DEMO_SERVICE_CHARACTER, "Demo astronaut (service)", files, provenance)
            log(f"registered {DEMO_SERVICE_CHARACTER} over HTTP: report {created['report']['verdict']}")
            client.approve_character(DEMO_SERVICE_CHARACTER)
            render = client.render(
                prompt="a photo of a woman at a cafe at night", character=DEMO_SERVICE_CHARACTER, seed=7, num_images=2
            )
            for image in render.images:
                written[f"sync seed {image.seed}"] = _save(target / f"sync-seed{image.seed}.png", image)
            job = client.submit_job(
                prompt="portrait in a studio, soft lighting", character=DEMO_SERVICE_CHARACTER, seed=11, steps=8
            )
            for event in client.events(job["job_id"]):
                if event.type == "progress":
                    log(f"  job {job['job_id'][:8]}: step {event.data['step']}/{event.data['steps']}")
                else:
                    log(f"  job {job['job_id'][:8]}: {event.type}")
            done = client.wait_job(job["job_id"])
            for image in Client.job_images(done):
                written[f"job seed {image.seed}"] = _save(target / f"job-seed{image.seed}.png", image)
            first = next(iter(written.values()))
            report = target / "provenance-check.json"
            report.write_text(json.dumps(check_image(first), indent=2, default=str))
            written["provenance check"] = report
    finally:
        if service is not None:
            log("stopping the service ...")
            service.stop()
    return written


def _save(path: Path, image: RenderedPNG) -> Path:
    image.save(str(path))
    return path
