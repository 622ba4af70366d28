"""Alembic's environment script: runs the revisions on the connection ``imagegen.migrations.upgrade`` passes.

There is no ``alembic.ini`` and no offline (``--sql``) mode: ``imagegen db upgrade`` opens the
database of the home's settings, takes the schema lock and hands its connection over here, so the
revisions run inside that one transaction.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError(
        "imagegen's migrations run through `imagegen db upgrade` (imagegen.migrations.upgrade), "
        "which passes them an open connection"
    )
context.configure(
    connection=connection,
    target_metadata=context.config.attributes.get("target_metadata"),
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
