"""``imagegen studio``: the Studio page on a local service with the embedded defaults.

It starts what ``imagegen serve`` starts (configs/serve.yaml: the tiny presets, the SQLite database
of ``IMAGEGEN_HOME``, a local Ray), creates an API key for the local user (scopes ``render``,
``characters:write``, ``characters:approve``), prints the Studio's URL and that key, and runs until
Ctrl-C / SIGTERM; the key is revoked when the Studio stops (only its hash was stored, and nothing
else needs it). Registered on the main app by ``imagegen/cli.py``.
"""

from __future__ import annotations

import os
import signal
import time
import webbrowser

import typer
from rich.console import Console

from imagegen.serve.cli import _check_database

console = Console(width=200)
#: what the local user may do in the Studio: render, design and register, approve
STUDIO_SCOPES = ["render", "characters:write", "characters:approve"]
DEFAULT_PRESETS = ["tiny-flux", "tiny-sdxl"]


def studio_command(
    host: str = typer.Option("127.0.0.1", help="Listen address (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, help="Port of the service (the Studio is at /studio/)."),
    preset: list[str] = typer.Option(
        None, "--preset", help="Presets to serve (repeatable; default: the tiny presets, tiny-flux and tiny-sdxl)."
    ),
    tenant: str = typer.Option("default", help="Tenant of the local user's key."),
    num_cpus: int = typer.Option(None, help="CPUs of the local Ray (default: all)."),
    open_browser: bool = typer.Option(False, "--open", help="Open the Studio in the default browser."),
    allow_unverified_age: bool = typer.Option(
        False,
        "--allow-unverified-age",
        help="DEVELOPMENT ONLY: render characters whose apparent age was never verified (no age estimator "
        "installed); stamped into every image's provenance. Same as IMAGEGEN_ALLOW_UNVERIFIED_AGE=1.",
    ),
) -> None:
    """Open the Studio on a local service (tiny presets, SQLite) and print its URL and a key for you."""
    from imagegen.ids import validate_tenant_id
    from imagegen.serve.auth import create_key, revoke_key
    from imagegen.serve.launcher import start_service
    from imagegen.serve.store import ServeStore
    from imagegen.settings import get_settings

    validate_tenant_id(tenant)
    if allow_unverified_age:
        os.environ["IMAGEGEN_ALLOW_UNVERIFIED_AGE"] = "1"  # the replicas get IMAGEGEN_* (launcher.prepare_config)
        get_settings.cache_clear()
    _check_database()
    stop = {"now": False}

    def _stop(*_: object) -> None:
        stop["now"] = True

    def _on_sigterm() -> None:
        signal.signal(signal.SIGTERM, _stop)

    _on_sigterm()
    console.print(
        "starting the Studio's service (configs/serve.yaml on a local Ray; the first start builds the tiny models) ..."
    )
    service = start_service(
        host=host,
        port=port,
        presets=preset or DEFAULT_PRESETS,
        num_cpus=num_cpus,
        log_to_driver=False,  # the URL and the key stay readable; replicas log to $TMPDIR/ray/session_*/logs
        on_ray_started=_on_sigterm,
    )
    record = None
    try:
        with ServeStore.open() as store:
            record, key = create_key(store, "studio-local", STUDIO_SCOPES, tenant=tenant)
        url = f"{service.url}/studio/"
        settings = get_settings()
        console.print(f"imagegen Studio: {url}")
        console.print(f"  data: {settings.home} (database {settings.registry_url.split('://')[0]})")
        if settings.allow_unverified_age:
            console.print(
                "  DEVELOPMENT ONLY: characters with an unverified apparent age render (--allow-unverified-age)"
            )
        console.print(
            f"API key for the local user (tenant {tenant}; revoked when the Studio stops), paste it in the page:"
        )
        print(key, flush=True)
        if open_browser:
            webbrowser.open(url)
        while not stop["now"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("shutting down")
        if record is not None:
            with ServeStore.open() as store:
                revoke_key(store, record.id)
        service.stop()
        console.print("stopped")
