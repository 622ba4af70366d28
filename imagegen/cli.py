"""The ``imagegen`` command: one sub-command group per area.

Errors a user can fix (``ImagegenError``) are printed as one line on stderr with exit code 2;
no traceback. Long work shows a progress bar.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from imagegen.errors import ImagegenError, InvalidRequestError
from imagegen.eval.cli import eval_app
from imagegen.identity.cli import characters_app, protect_app
from imagegen.identity.design.cli import add_design_commands
from imagegen.migrations.cli import db_app
from imagegen.serve.cli import keys_app, provenance_app, serve_command
from imagegen.serve.studio_cli import studio_command
from imagegen.terminal import (
    PROFILE_HELP,
    check_profile_choice,
    console,
    ensure_writable_dir,
    err_console,
    progress_bar,
)

app = typer.Typer(
    name="imagegen",
    help="Render the same fictional character again and again with a recognisably identical face.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Model presets (configs/models.yaml).", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(characters_app, name="characters")
add_design_commands(characters_app)  # design, turnaround, curate, register, design-delete
app.add_typer(protect_app, name="protect")
app.add_typer(keys_app, name="keys")
app.add_typer(provenance_app, name="provenance")
app.command("serve")(serve_command)
app.command("studio")(studio_command)
app.add_typer(eval_app, name="eval")
app.add_typer(db_app, name="db")


def build_request(**fields):
    """A ``RenderRequest`` from CLI options, with pydantic's complaints turned into one clear line."""
    from imagegen.pipelines.types import RenderRequest

    try:
        return RenderRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first["loc"]) or "request"
        raise InvalidRequestError(f"{name}: {first['msg']}", field=name) from exc


@models_app.command("list")
def models_list() -> None:
    """Show every preset, its identity methods, and whether its weights are available locally."""
    from imagegen.pipelines.presets import all_presets, is_available_locally

    table = Table(title="model presets")
    for column in ("name", "family", "repo", "dtype", "defaults", "methods", "local", "licence"):
        table.add_column(column)
    for preset in all_presets().values():
        d = preset.defaults
        local = "yes" if is_available_locally(preset) else ("built on first use" if preset.is_tiny else "no")
        cells = (
            preset.name,
            preset.family,
            preset.repo,
            preset.dtype,
            f"{d.width}x{d.height}, {d.steps} steps, guidance {d.guidance}",
            ", ".join(preset.methods) or "-",
            local,
            preset.licence,
        )
        table.add_row(*(escape(cell) for cell in cells))
    console.print(table)


@models_app.command("show")
def models_show(preset: str = typer.Argument(..., help="Preset name (see `imagegen models list`).")) -> None:
    """A preset's identity methods and the state of every asset they need (present / missing / converted ...)."""
    from imagegen.pipelines.assets import asset_states, store_for
    from imagegen.pipelines.presets import get_preset, is_available_locally

    chosen = get_preset(preset)
    store = store_for(chosen)
    base = "yes" if is_available_locally(chosen) else ("built on first use" if chosen.is_tiny else "missing")
    console.print(f"[bold]{escape(chosen.name)}[/bold]: {escape(chosen.repo)} ({chosen.family}), base model: {base}")
    origin = "hub / URLs" if store.remote else "stand-ins written by imagegen"
    console.print(f"assets from: {escape(str(store.root))} ({origin})")
    table = Table(title=f"identity assets of {chosen.name}")
    for column in ("method", "role", "asset", "state", "source", "licence"):
        table.add_column(column)
    for method, rows in asset_states(chosen).items():
        for role, asset, state in rows:
            licence = asset.licence + (" [non-commercial]" if asset.non_commercial else "")
            shown = "built on first use" if state == "missing" and not store.remote else state
            table.add_row(*(escape(c) for c in (method, role, asset.id, shown, asset.source_text, licence)))
    console.print(table)


@models_app.command("profiles")
def models_profiles(
    preset: list[str] = typer.Argument(None, help="Preset name(s) (default: every preset)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document instead of tables."),
) -> None:
    """The optimisation profiles of configs/models.yaml as they resolve for each preset, and what applies here."""
    import json

    from imagegen.pipelines.loading import pick_device
    from imagegen.pipelines.presets import all_presets, get_preset
    from imagegen.pipelines.profiles import all_profiles, profile_for
    from imagegen.settings import get_settings

    settings = get_settings()
    device = pick_device(settings)
    chosen = [get_preset(p) for p in preset] if preset else list(all_presets().values())
    rows = []
    for entry in chosen:
        default = profile_for(entry, None, settings).name
        for name in all_profiles(settings):
            resolved = profile_for(entry, name, settings)
            here, methods = describe_profile_here(entry, resolved, device)
            rows.append(
                {
                    "preset": entry.name,
                    "family": entry.family,
                    "profile": name,
                    "default": name == default,
                    "description": resolved.description,
                    "options": profile_options(resolved),
                    "here": here,
                    "identity": methods,
                }
            )
    if as_json:
        print(json.dumps({"device": str(device), "imagegen_profile": settings.profile, "profiles": rows}, indent=2))
        return
    console.print(
        f"device here: {escape(str(device))}; IMAGEGEN_PROFILE: {escape(settings.profile or 'unset')} "
        "(choose with --profile on render / serve / eval run / demo, IMAGEGEN_PROFILE, or a preset's `profile:`)"
    )
    for entry in chosen:
        table = Table(title=f"profiles of {entry.name} ({entry.family})")
        for column in ("profile", "default", "options", f"on {device.type}", "identity methods"):
            table.add_column(column)
        for row in rows:
            if row["preset"] == entry.name:
                cells = (row["profile"], "yes" if row["default"] else "", row["options"], row["here"], row["identity"])
                table.add_row(*(escape(c) for c in cells))
        console.print(table)


def profile_options(profile) -> str:
    """A profile's options in one line (what differs from eager)."""
    parts = []
    if profile.compile is not None:
        c = profile.compile
        parts.append(f"compile (regional, fullgraph={c.fullgraph}" + (f", mode={c.mode}" if c.mode else "") + ")")
    if profile.quantize != "none":
        fallback = f", else {profile.quantize_fallback}" if profile.quantize_fallback else ""
        parts.append(f"quantize {profile.quantize}{fallback}")
    if profile.step_cache is not None:
        options = ", ".join(f"{k}={v}" for k, v in profile.step_cache.options.items())
        parts.append(f"step cache {profile.step_cache.kind}" + (f" ({options})" if options else ""))
    if profile.attention_backend:
        parts.append(f"attention {profile.attention_backend}")
    parts += [flag for flag in ("channels_last", "fuse_qkv", "vae_tiling", "vae_slicing") if getattr(profile, flag)]
    if profile.offload != "none":
        parts.append(f"offload {profile.offload}")
    return "; ".join(parts) or "eager (the reference numerics)"


def describe_profile_here(preset, profile, device) -> tuple[str, str]:
    """What ``profile`` does on ``device`` (or why it is refused), and which identity methods of ``preset``
    refuse it; nothing is loaded."""
    from imagegen.pipelines.profiles import ProfileError, check_profile

    try:
        quantize = check_profile(profile, preset.family, device)
    except ProfileError as exc:
        return f"refused: {exc}", "-"
    notes = []
    if quantize != profile.quantize:
        notes.append(f"quantize {quantize} ({profile.quantize} needs fp8 hardware)")
    if profile.offload != "none" and device.type == "cpu":
        notes.append("offload: nothing to do (the model lives in CPU memory)")
    if profile.compile is not None and profile.compile.cuda_graphs and device.type != "cuda":
        notes.append("CUDA graphs skipped (they need a CUDA device): the compiled blocks run without them")
    here = "; ".join(notes) or "as configured"
    refusing = []
    for method, cls in identity_method_classes(preset).items():
        stub = object.__new__(cls)  # check_profile reads class attributes only: nothing is loaded
        try:
            stub.check_profile(profile)
        except ProfileError:
            refusing.append(method)
    if not preset.methods:
        return here, "-"
    if not refusing:
        return here, "all"
    cache = profile.step_cache.kind if profile.step_cache else "it"
    return here, f"refused by {', '.join(refusing)} (the {cache} cache)"


def identity_method_classes(preset) -> dict:
    """The implementation class of each identity method of ``preset`` (imported, not instantiated)."""
    from imagegen.identity.conditioning import IdentityMethod
    from imagegen.identity.ipadapter import method as ipadapter
    from imagegen.identity.pulid import method as pulid

    classes = {
        cls.name: cls
        for module in (pulid, ipadapter)
        for cls in vars(module).values()
        if isinstance(cls, type) and issubclass(cls, IdentityMethod) and isinstance(getattr(cls, "name", None), str)
    }
    return {m: classes[m] for m in preset.methods if m in classes}


@models_app.command("pull")
def models_pull(
    preset: str = typer.Argument(..., help="Preset name (see `imagegen models list`)."),
    method: list[str] = typer.Option(
        None, "--method", help="Identity method(s) to fetch (default: all of the preset's)."
    ),
    accept_licence: bool = typer.Option(
        False, "--accept-licence", help="Accept the licences of non-commercial or gated assets (read them first)."
    ),
) -> None:
    """Fetch, convert and check everything a preset needs: base model and identity assets. Idempotent, resumable."""
    from imagegen.pipelines.assets import pull
    from imagegen.pipelines.presets import get_preset

    chosen = get_preset(preset)
    with progress_bar() as bar:
        task = bar.add_task(f"pulling {preset}", total=None)

        def step(name: str) -> None:
            bar.update(task, description=f"{preset}: {name}")

        states = pull(chosen, method or None, accept_licence=accept_licence, progress=step)
        bar.update(task, total=1, completed=1, description=f"{preset}: done")
    for asset_id, state in states.items():
        console.print(f"{escape(asset_id)}: {state}")


@models_app.command("warm-up")
def models_warm_up(
    preset: str = typer.Argument(..., help="Preset name (see `imagegen models list`)."),
    profile: str | None = typer.Option(None, "--profile", help=PROFILE_HELP),
    size: list[str] = typer.Option(
        None, "--size", help="WIDTHxHEIGHT to warm up (repeatable; default: the preset's size). As warmup_sizes."
    ),
    batch: list[int] = typer.Option(
        None, "--batch", help="Batch sizes warmed at every size (repeatable; default 1). As warmup_batch_sizes."
    ),
    max_batch: int = typer.Option(1, "--max-batch", help="The replicas' max_batch_size (sizes identity buffers)."),
    steps: int = typer.Option(2, "--steps", help="Denoising steps of each warm-up render. As warmup_steps."),
    identity: bool = typer.Option(
        True, "--identity/--no-identity", help="Also load and render with every identity method of the preset."
    ),
    as_json: bool = typer.Option(False, "--json", help="The warm-up report as JSON."),
) -> None:
    """Warm a preset up as a serving replica does, and store its compiled code for every replica that starts after.

    Under a compiling profile the compiled artifacts go to the object store (IMAGEGEN_STORAGE_URL, else
    IMAGEGEN_HOME) and the local compile cache (IMAGEGEN_COMPILE_CACHE_DIR): run it once per deployment (e.g. in a
    release job on the serving GPU type, with the sizes of configs/serve.yaml) and replicas start without compiling.
    """
    import json

    from imagegen.pipelines.assets import preflight
    from imagegen.pipelines.loading import pick_device
    from imagegen.pipelines.presets import get_preset
    from imagegen.pipelines.warmup import warm_up
    from imagegen.settings import get_settings

    chosen = get_preset(preset)
    sizes = [parse_size(text) for text in size or []]
    if any(b < 1 for b in batch or []) or max_batch < 1:
        raise InvalidRequestError("--batch and --max-batch must be at least 1", field="batch")
    if not 1 <= steps <= 8:
        raise InvalidRequestError(f"--steps must be between 1 and 8, got {steps}", field="steps")
    settings = get_settings()
    if profile is not None:
        settings = settings.model_copy(update={"profile": profile})
    check_profile_choice(profile, [chosen.name], device=str(pick_device(settings)))
    preflight(chosen, list(chosen.methods) if identity else [])

    from imagegen.identity.provider import identity_renderer

    with progress_bar() as bar:
        task = bar.add_task(f"warming {preset} up", total=None)
        renderer = identity_renderer(chosen, settings=settings)
        report = warm_up(renderer, sizes or None, batch or [1], steps=steps, identity=identity, largest_batch=max_batch)
        bar.update(task, total=1, completed=1, description=f"{preset}: warm")
    summary = report.summary()
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    console.print(f"{escape(preset)} (profile {escape(str(report.profile))}) warm in {report.seconds:.1f} s")
    for entry in report.renders:
        console.print(f"  {entry['size'][0]}x{entry['size'][1]}, batch {entry['batch']}: {entry['seconds']} s")
    for entry in report.identity:
        console.print(f"  {escape(entry['method'])}: loaded in {entry['load_s']} s")
    cache = report.compile_cache
    if cache is None:
        console.print("compile cache: not used (the profile does not compile)")
    else:
        counts = cache["counters"]
        console.print(
            f"compile cache: stored artifacts {escape(cache['load'])}; {escape(str(cache['save']))} "
            f"({escape(cache['artifact'])}); graphs from cache {counts['fx_graph_hits']}, "
            f"compiled {counts['fx_graph_misses']}; local directory {escape(cache['local_dir'])}"
        )


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` -> (1024, 768); anything else is one line naming the option."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) < 1 or int(height) < 1:
        raise InvalidRequestError(f"--size must be WIDTHxHEIGHT in pixels (e.g. 1024x1024), got {text!r}", field="size")
    return int(width), int(height)


@models_app.command("compile-cache")
def models_compile_cache(
    clear: bool = typer.Option(False, "--clear", help="Delete every stored artifact (the next warm-up compiles)."),
    clear_stale: bool = typer.Option(
        False, "--clear-stale", help="Delete the artifacts other torch / Triton / CUDA / Python versions made."
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON document instead of a table."),
) -> None:
    """The compiled artifacts in the object store: one per preset, profile, torch version and device.

    The local compile directory (IMAGEGEN_COMPILE_CACHE_DIR) is a cache too: delete it whenever no renderer runs on
    this machine; the next warm-up loads the stored artifact into it."""
    import json

    from imagegen.pipelines.compile_cache import clear_artifacts, stored_artifacts
    from imagegen.settings import get_settings

    settings = get_settings()
    if clear or clear_stale:
        console.print(f"deleted {clear_artifacts(settings, stale_only=not clear)} compile artifact(s)")
        return
    rows = stored_artifacts(settings)
    local = settings.compile_cache
    local_bytes = sum(p.stat().st_size for p in local.rglob("*") if p.is_file()) if local.is_dir() else 0
    if as_json:
        print(json.dumps({"local_dir": str(local), "local_dir_bytes": local_bytes, "artifacts": rows}, indent=2))
        return
    table = Table(title=f"compile artifacts (local directory {local}: {local_bytes / 1e6:.1f} MB)")
    for column in ("artifact", "preset", "profile", "torch", "device", "MB", "written by", "usable here"):
        table.add_column(column)
    for row in rows:
        found = row.get("fingerprint") or {}
        cells = (
            row["key"],
            found.get("preset", "-"),
            (found.get("profile") or {}).get("name", "-"),
            found.get("torch", "-"),
            found.get("device", row.get("unusable", "-")),
            f"{row['bytes'] / 1e6:.1f}",
            row.get("host") or "-",
            "no (stale: --clear-stale)" if row["stale"] else "yes",
        )
        table.add_row(*(escape(str(c)) for c in cells))
    console.print(table)


@app.command()
def render(
    prompt: str = typer.Option(..., "--prompt", "-p", help="What to render."),
    preset: str = typer.Option("tiny-flux", help="Model preset (see `imagegen models list`)."),
    negative_prompt: str = typer.Option("", help="What to avoid (SDXL CFG; FLUX with --true-cfg > 1)."),
    seed: int | None = typer.Option(None, help="Seed of the first image; image i uses seed + i. Random if unset."),
    num: int = typer.Option(1, help="Number of images."),
    width: int | None = typer.Option(None, help="Width in pixels (preset default if unset)."),
    height: int | None = typer.Option(None, help="Height in pixels (preset default if unset)."),
    steps: int | None = typer.Option(None, help="Denoising steps (preset default if unset)."),
    guidance: float | None = typer.Option(None, help="Guidance scale (preset default if unset)."),
    true_cfg: float = typer.Option(1.0, "--true-cfg", help="FLUX true CFG scale (> 1 uses the negative prompt)."),
    batch_size: int = typer.Option(4, help="Images per pipeline call."),
    out: Path = typer.Option(Path("out"), help="Output directory."),
    character: str | None = typer.Option(None, help="Registered character whose face to render."),
    identity_weight: float = typer.Option(1.0, help="Identity strength (0 = none)."),
    identity_start_step: int = typer.Option(0, help="Apply identity from this denoising step on."),
    method: str | None = typer.Option(None, help="Identity method (default: the preset's, see models.yaml)."),
    allow_draft: bool = typer.Option(
        False, help="Preview a draft character whose reference report passed (never one that failed)."
    ),
    profile: str | None = typer.Option(None, "--profile", help=PROFILE_HELP),
) -> None:
    """Render images and write them as PNGs carrying prompt, seed, preset, character and versions."""
    from imagegen.pipelines.presets import get_preset
    from imagegen.pipelines.types import MAX_SEED

    if num < 1:
        raise InvalidRequestError(f"--num must be at least 1, got {num}", field="num")
    if batch_size < 1:
        raise InvalidRequestError(f"--batch-size must be at least 1, got {batch_size}", field="batch_size")
    if seed is not None and not 0 <= seed <= MAX_SEED - num:
        raise InvalidRequestError(f"--seed must be between 0 and {MAX_SEED - num}", field="seed")
    chosen = get_preset(preset)
    first = build_request(
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        true_cfg_scale=true_cfg,
        character=character,
        identity_weight=identity_weight,
        identity_start_step=identity_start_step,
        method=method,
    )
    first.check_against(chosen)
    from imagegen.pipelines.assets import preflight
    from imagegen.pipelines.loading import pick_device
    from imagegen.settings import get_settings

    settings = get_settings()
    if profile is not None:
        settings = settings.model_copy(update={"profile": profile})
    # an unknown profile, or one this device cannot run (fp8 without a fallback ...), before anything loads
    check_profile_choice(profile, [chosen.name], device=str(pick_device(settings)))

    if character is not None:
        from imagegen.identity.methods import resolve_method

        method = resolve_method(chosen, method)
    # every file the render needs is checked here, before anything is downloaded or loaded
    preflight(chosen, [method] if character is not None else [])
    if character is not None:
        from imagegen.identity.registry import Registry

        with Registry.open() as registry:
            registry.characters.get(character)  # an unknown character fails here, before any model loads
    out = ensure_writable_dir(out)
    first = first.resolved(chosen)
    requests = [first.model_copy(update={"seed": first.seed + i}) for i in range(num)]

    from imagegen.identity.provider import identity_renderer
    from imagegen.images import save_png  # heavy imports only once the arguments are known to be good

    renderer = identity_renderer(chosen, allow_draft=allow_draft, settings=settings)
    written, failed = [], []
    with progress_bar() as bar:
        task = bar.add_task(f"rendering {preset}", total=num)
        for start in range(0, num, batch_size):
            for result in renderer.render(requests[start : start + batch_size]):
                if result.ok:
                    stem = f"{preset}-{character}" if character else preset
                    path = out / f"{stem}-seed{result.seed}.png"
                    written.append(save_png(result.image, path, result.metadata()))
                else:
                    failed.append(result)
                bar.advance(task)
    for path in written:
        console.print(str(path))
    if failed:
        raise ImagegenError(
            f"{len(failed)} image(s) came out unusable ("
            + ", ".join(f"seed {r.seed}: {r.problem}" for r in failed)
            + "); nothing was written for them"
        )


@app.command()
def demo(
    out: Path = typer.Option(Path("out"), help="Output directory."),
    service: bool = typer.Option(True, "--service/--no-service", help="Also start the HTTP service and drive it."),
    evaluation: bool = typer.Option(True, "--eval/--no-eval", help="Also run the smoke evaluation suite."),
    profile: str | None = typer.Option(None, "--profile", help=PROFILE_HELP + " For every part of the demo."),
) -> None:
    """Run the main job end to end on the embedded defaults (tiny models, local files)."""
    from imagegen.demo import run_demo

    if profile is not None:
        from imagegen.demo.local import DEMO_PRESETS

        check_profile_choice(profile, DEMO_PRESETS)  # before anything is written
    out = ensure_writable_dir(out)
    summary = run_demo(
        out,
        progress_factory=progress_bar,
        service=service,
        evaluation=evaluation,
        log=console.print,
        profile=profile,
    )
    console.print(f"[bold green]demo finished[/] -> {out.resolve()}")
    for label, path in summary.items():
        console.print(f"  {label}: {path}")


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    logging.basicConfig(level=os.environ.get("IMAGEGEN_LOG_LEVEL", "WARNING").upper())
    try:
        app()
    except ImagegenError as exc:
        where = f" ({exc.field})" if exc.field else ""
        err_console.print(f"[bold red]error{escape(where)}:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
