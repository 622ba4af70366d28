"""``imagegen serve``, ``imagegen keys ...`` and ``imagegen provenance check|keygen``.

Registered on the main app by ``imagegen/cli.py``; nothing heavy (Ray, FastAPI) is imported
until a command runs.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from imagegen.terminal import PROFILE_HELP

keys_app = typer.Typer(
    help="API keys of the HTTP service (stored hashed in the registry database).", no_args_is_help=True
)
provenance_app = typer.Typer(
    help="Provenance of rendered images (C2PA manifest, metadata, watermark).", no_args_is_help=True
)
console = Console(width=200)


def _store():
    from imagegen.serve.store import ServeStore

    return ServeStore.open()


@keys_app.command("create")
def keys_create(
    name: str = typer.Option(..., help="Who or what uses the key (a service, a team)."),
    scope: list[str] = typer.Option(
        ["render"],
        "--scope",
        "-s",
        help="render | characters:write | characters:approve | admin (repeat for several).",
    ),
    tenant: str = typer.Option(
        "default", help="The tenant the key belongs to: it sees and renders only that tenant's characters."
    ),
) -> None:
    """Create a key and print it ONCE (only its SHA-256 is stored)."""
    from imagegen.ids import validate_tenant_id
    from imagegen.serve.auth import check_scopes, create_key

    validate_tenant_id(tenant)  # refused before the database is opened
    check_scopes(scope)
    with _store() as store:
        record, plaintext = create_key(store, name, scope, tenant=tenant)
    console.print(
        f"key id {record.id}  tenant {record.tenant}  scopes {', '.join(record.scopes)}  name {escape(record.name)}"
    )
    console.print("store it now, it is not shown again:")
    print(plaintext)


@keys_app.command("list")
def keys_list(as_json: bool = typer.Option(False, "--json", help="JSON instead of a table.")) -> None:
    """Every key: id, tenant, name, scopes, created, last used, revoked (never the secret)."""
    with _store() as store:
        keys = store.list_keys()
    if as_json:
        print(json.dumps([k.public() for k in keys], indent=2))
        return
    table = Table(title="API keys")
    for column in ("id", "tenant", "name", "scopes", "created", "last used", "revoked"):
        table.add_column(column)
    for key in keys:
        data = key.public()
        table.add_row(
            key.id,
            key.tenant,
            escape(key.name),
            ", ".join(key.scopes),
            data["created_at"][:19],
            (data["last_used_at"] or "-")[:19],
            (data["revoked_at"] or "-")[:19],
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., metavar="KEY_ID")) -> None:
    """Revoke a key (the service refuses it within its auth cache time, 2 s by default)."""
    from imagegen.serve.auth import revoke_key

    with _store() as store:
        record = revoke_key(store, key_id)
    console.print(f"revoked {record.id} ({escape(record.name)})")


@provenance_app.command("check")
def provenance_check(
    image: Path = typer.Argument(..., metavar="IMAGE", exists=True, dir_okay=False, readable=True),
    tenant: str = typer.Option(
        "default", help="Whose audit trail to look the image up in: only that tenant's renders are shown."
    ),
    audit: bool = typer.Option(True, help="Look the image up in the audit trail of this IMAGEGEN_HOME."),
) -> None:
    """Validate an image's C2PA manifest, read its metadata and watermark, find the request that made it.

    Prints a JSON report on stdout (layers that survived, signer, watermark tag, the tenant's
    audit record) and a short summary on stderr.
    """
    from PIL import UnidentifiedImageError

    from imagegen.errors import InvalidRequestError
    from imagegen.ids import validate_tenant_id
    from imagegen.provenance import check_image

    validate_tenant_id(tenant)
    store = _store() if audit else None
    try:
        report = check_image(image, store, tenant=tenant if audit else None)
    except UnidentifiedImageError as exc:
        raise InvalidRequestError(f"{image} is not an image this tool can read (PNG, JPEG, WebP ...)") from exc
    finally:
        if store is not None:
            store.close()
    print(json.dumps(report, indent=2, default=str))
    summary = Console(stderr=True, width=200)
    survived = ", ".join(report["survived"]) or "none"
    summary.print(f"layers that survived: {survived}")
    if report["damaged"]:
        summary.print(f"damaged pixel stream, read what was left: {escape(report['damaged'])}")
    manifest = report["manifest"]
    if manifest.get("present"):
        failures = ", ".join(manifest.get("failures") or []) or "none"
        summary.print(
            f"C2PA manifest: {manifest.get('state')} (failures: {escape(failures)}); signer: {escape(report['signer'])}"
        )
    mark = report["watermark"]
    if mark.get("found"):
        summary.print(f"watermark: tag {mark['tag']} ({mark.get('scheme')}, crop {mark.get('crop', 1.0)})")
    if audit:
        request = report.get("request_id") or ("-" if not report.get("audit") else "several")
        reached = "found" if report["audit_reached"] else "none"
        summary.print(f"audit record of tenant {tenant}: {reached}; request {request}")


@provenance_app.command("keygen")
def provenance_keygen(
    out: Path = typer.Option(..., "--out", help="Empty directory to write the pair into (created if missing)."),
    organisation: str = typer.Option("imagegen", help="Organisation name in both subjects."),
    days: int = typer.Option(825, min=1, max=3650, help="Validity of the signing certificate, in days."),
) -> None:
    """Make a DEVELOPMENT C2PA signer: a development CA and a signing certificate it issued.

    C2PA validators refuse self-signed signing certificates, hence the CA. Both subjects say
    DEVELOPMENT; production deployments use a certificate from a CA validators trust.
    """
    from imagegen.provenance.keys import CA_FILE, CA_KEY_FILE, CHAIN_FILE, KEY_FILE, make_development_pair
    from imagegen.terminal import ensure_writable_dir

    ensure_writable_dir(out)
    written = make_development_pair(out, organisation=organisation, days=days)
    console.print("[bold yellow]DEVELOPMENT signer[/bold yellow] (not trusted by any public validator):")
    for name in (CHAIN_FILE, KEY_FILE, CA_FILE, CA_KEY_FILE):
        console.print(f"  {escape(str(written[name]))}")
    console.print("sign with it:  IMAGEGEN_C2PA_CERT=" + escape(str(written[CHAIN_FILE])))
    console.print("               IMAGEGEN_C2PA_KEY=" + escape(str(written[KEY_FILE])))
    console.print("check with it: IMAGEGEN_C2PA_TRUST=" + escape(str(written[CA_FILE])))
    console.print(f"keep {CA_KEY_FILE} offline: it issues signers")


def _check_database() -> None:
    """Before Ray starts: the home's database is created at head or refused in one line (old schema)."""
    from imagegen.identity.registry import Registry
    from imagegen.serve.store import ServeStore

    with ServeStore.open(), Registry.open():
        pass


def _check_signer() -> None:
    """Before Ray starts: a half-configured or unreadable C2PA signer, or a key that does not sign for its
    certificate, is refused in one line."""
    from imagegen.provenance import load_signer, verify_signer

    signer = load_signer()
    verify_signer(signer)
    if signer.development:
        console.print(f"C2PA: [bold yellow]development signer[/bold yellow] ({escape(str(signer.chain_path.parent))})")


def serve_command(
    config: Path = typer.Option(None, help="Serve config (default: configs/serve.yaml)."),
    host: str = typer.Option(None, help="Listen address (overrides http_options.host)."),
    port: int = typer.Option(None, help="Port (overrides http_options.port)."),
    preset: list[str] = typer.Option(None, "--preset", help="Serve only these presets (repeatable)."),
    address: str = typer.Option(None, help="Join this Ray cluster instead of starting a local one."),
    num_cpus: int = typer.Option(None, help="CPUs of the local Ray (default: all)."),
    profile: str = typer.Option(None, "--profile", help=PROFILE_HELP + " Applies to every renderer deployment."),
) -> None:
    """Start the HTTP service (Ray Serve, configs/serve.yaml) and run until Ctrl-C."""
    from imagegen.serve.launcher import start_service

    _check_database()
    _check_signer()
    stop = {"now": False}

    def _stop(*_: object) -> None:
        stop["now"] = True

    def _on_sigterm() -> None:
        signal.signal(signal.SIGTERM, _stop)

    _on_sigterm()  # a SIGTERM while Ray starts stops the service as soon as it is up
    service = start_service(
        config,
        address=address,
        num_cpus=num_cpus,
        host=host,
        port=port,
        presets=preset or None,
        profile=profile,
        on_ray_started=_on_sigterm,  # again after ray.init, which installs its own (aborting) handler
    )
    console.print(f"imagegen serving on {service.url}  (docs: {service.url}/docs, health: {service.url}/healthz)")
    try:
        while not stop["now"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("shutting down")
        service.stop()
        console.print("stopped")
