"""What the command-line modules share: the consoles, the progress bar, the output-directory check.

It sits below every ``cli`` module (``imagegen/cli.py`` and the sub-command groups in
``eval/``, ``identity/``, ``serve/``), so a sub-command never imports the top-level command.
"""

from __future__ import annotations

import sys
import tempfile
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
