"""What the command-line modules share: the consoles, the progress bar, the output-directory check.

It sits below every ``cli`` module (``imagegen/cli.py`` and the sub-command groups in
``eval/``, ``identity/``, ``serve/``), so a sub-command never imports the top-level command.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from imagegen.errors import ImagegenError

# piped output (CI logs, tests) gets wide lines instead of rich's 80-column default
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove it is writable before any expensive work starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ImagegenError(f"cannot write to output directory {path}: {exc.strerror or exc}", field="out") from exc
    return path


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )


#: the ``--profile`` option's help, the same on every command that loads a renderer
PROFILE_HELP = (
    "Optimisation profile of the renderers (quality, fast, fastest, low-memory ...: `imagegen models profiles`). "
    "Default: IMAGEGEN_PROFILE, else each preset's own (configs/models.yaml)."
)


def check_profile_choice(profile: str | None, presets: Iterable[str], device: str | None = None) -> None:
    """Refuse, in one line and before anything loads, a profile that does not exist or that a preset (or, with
    ``device``, this device) cannot run. ``None`` checks what would be chosen instead (``IMAGEGEN_PROFILE`` or the
    preset's own)."""
    from imagegen.pipelines.presets import get_preset
    from imagegen.pipelines.profiles import ProfileError, check_profile, profile_for

    try:
        for name in presets:
            preset = get_preset(name)
            resolved = profile_for(preset, profile)
            if device is not None:
                import torch

                check_profile(resolved, preset.family, torch.device(device))
    except ProfileError as exc:
        exc.field = exc.field or "profile"
        raise
