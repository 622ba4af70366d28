"""``imagegen db ...``: the schema revision of the home's database, and upgrading it.

Registered on the main app by ``imagegen/cli.py``. Opening the registry or the service store
never migrates (an upgrade is an operator's decision, taken once, with a backup at hand); it
refuses an old schema with one line naming ``imagegen db upgrade``.
"""

from __future__ import annotations

import typer
from rich.markup import escape

from imagegen.terminal import console

db_app = typer.Typer(
    help="The schema of the home's database (registry, keys, jobs, audit): show it, upgrade it.",
    no_args_is_help=True,
)


@db_app.command("current")
def db_current() -> None:
    """Show the database's schema revision and whether this imagegen can use it."""
    from imagegen.migrations import head, state_of, where_of
    from imagegen.settings import get_settings

    url = get_settings().registry_url
    state = state_of(url)
    if state.fresh:
        verdict = f"created at {head()} on first use"
    elif state.at_head:
        verdict = "up to date"
    elif not state.known:
        verdict = "newer than this imagegen: upgrade imagegen"
    else:
        verdict = "run `imagegen db upgrade`"
    console.print(
        f"{escape(where_of(url))}: schema {escape(state.label)} (this imagegen: {head()}; {escape(verdict)})",
        highlight=False,
        soft_wrap=True,
    )


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to the schema this imagegen needs (back it up first; idempotent)."""
    from imagegen.migrations import upgrade, where_of
    from imagegen.settings import get_settings

    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    before, after = upgrade(settings.registry_url)
    where = escape(where_of(settings.registry_url))
    if before == after:
        console.print(f"{where}: already at schema {escape(after)}", highlight=False, soft_wrap=True)
    else:
        console.print(
            f"{where}: upgraded from schema {escape(before)} to {escape(after)}", highlight=False, soft_wrap=True
        )
