"""Tenancy: every character, key, job and audit row has an owning tenant; deletes leave tombstones.

Revision ID: 0002_tenancy
Revises: 0001_baseline

- ``characters.tenant`` (indexed), ``api_keys.tenant``, ``serve_jobs.tenant``,
  ``render_audit.tenant``: not null; rows written before get the default tenant (``'default'``,
  kept as the server default, so SQLite adds the columns without rebuilding any table);
- ``characters.report_passed``: whether the character's last reference report passed (unknown,
  NULL, for rows written before);
- ``character_tombstones``: the last version of a deleted character id, so a re-used id never
  starts its versions again (caches keyed by id and version must not serve the deleted face);
- ``serve_jobs.character`` (indexed): the character a job renders, so a delete finds its jobs;
  filled here from the stored request body where it names one;
- ``render_audit.redacted_at``, and ``render_audit.request_id`` widened to 128 characters
  (offline evaluation ids are longer) — SQLite rebuilds ``render_audit`` for the type change;
- the legacy ``schema_version`` table is dropped: ``alembic_version`` replaces it.

Downgrade drops what this revision added (tenants, tombstones and redaction times are lost);
a request id longer than 64 characters makes it fail on PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_tenancy"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None

DEFAULT_TENANT = "default"  # frozen here: imagegen.ids.DEFAULT_TENANT at the time of this revision


def _tenant() -> sa.Column:
    return sa.Column("tenant", sa.String(64), nullable=False, server_default=DEFAULT_TENANT)


def upgrade() -> None:
    op.add_column("characters", _tenant())
    op.add_column("characters", sa.Column("report_passed", sa.Boolean(), nullable=True))
    op.create_index("ix_characters_tenant", "characters", ["tenant"])
    op.create_table(
        "character_tombstones",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.add_column("api_keys", _tenant())
    op.add_column("serve_jobs", _tenant())
    op.add_column("serve_jobs", sa.Column("character", sa.String(64), nullable=True))
    op.create_index("ix_serve_jobs_character", "serve_jobs", ["character"])
    _fill_job_characters()
    with op.batch_alter_table("render_audit") as batch:
        batch.add_column(_tenant())
        batch.add_column(sa.Column("redacted_at", sa.DateTime(timezone=True), nullable=True))
        batch.alter_column("request_id", existing_type=sa.String(64), type_=sa.String(128), existing_nullable=False)
    op.drop_table("schema_version")


def _fill_job_characters() -> None:
    """``serve_jobs.character`` from each job's stored request (``{"body": {"character": ...}}``)."""
    bind = op.get_bind()
    jobs = sa.table("serve_jobs", sa.column("id", sa.String), sa.column("request", sa.JSON), sa.column("character"))
    for job_id, request in bind.execute(sa.select(jobs.c.id, jobs.c.request)).all():
        body = request.get("body") if isinstance(request, dict) else None
        character = body.get("character") if isinstance(body, dict) else None
        if isinstance(character, str) and 0 < len(character) <= 64:
            bind.execute(sa.update(jobs).where(jobs.c.id == job_id).values(character=character))


def downgrade() -> None:
    op.create_table(
        "schema_version",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    op.execute(sa.text("INSERT INTO schema_version (version, applied_at) VALUES (1, CURRENT_TIMESTAMP)"))
    with op.batch_alter_table("render_audit") as batch:
        batch.alter_column("request_id", existing_type=sa.String(128), type_=sa.String(64), existing_nullable=False)
        batch.drop_column("redacted_at")
        batch.drop_column("tenant")
    with op.batch_alter_table("serve_jobs") as batch:
        batch.drop_index("ix_serve_jobs_character")
        batch.drop_column("character")
        batch.drop_column("tenant")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("tenant")
    op.drop_table("character_tombstones")
    with op.batch_alter_table("characters") as batch:
        batch.drop_index("ix_characters_tenant")
        batch.drop_column("report_passed")
        batch.drop_column("tenant")
