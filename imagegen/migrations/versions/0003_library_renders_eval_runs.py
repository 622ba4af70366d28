"""Library routes (issue 14): a character's recent renders with their scores, and API evaluation runs.

Revision ID: 0003_library
Revises: 0002_tenancy

- ``character_renders``: one row per served image of a character (prompt, method, identity weight,
  seed, size, similarity, the gate's threshold, passed, scoring backend), listed by
  ``GET /v1/characters/{id}/renders``; kept as long as jobs are and deleted with the character;
- ``eval_runs``: evaluation runs submitted through ``POST /v1/eval/runs``, owned by a tenant
  (status, the validated suite, progress, summary and verdict; ``files`` names the digests of its
  report and metrics in the service's results store).

Both tables are new: nothing written before changes. Downgrade drops them (their files stay in the
results store until it is cleaned).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_library"
down_revision = "0002_tenancy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "character_renders",
        sa.Column("image_id", sa.String(32), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("character", sa.String(64), nullable=False),
        sa.Column("character_version", sa.Integer(), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=True),
        sa.Column("image_index", sa.Integer(), nullable=False),
        sa.Column("preset", sa.String(64), nullable=False),
        sa.Column("method", sa.String(64), nullable=True),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("identity_weight", sa.Float(), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("similarity", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("passed", sa.Boolean(), nullable=True),
        sa.Column("backend", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("image_id"),
    )
    op.create_index("ix_character_renders_character", "character_renders", ["character"])
    op.create_index("ix_character_renders_created_at", "character_renders", ["created_at"])
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("suite", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("characters", sa.JSON(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("owner", sa.String(64), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_eval_runs_tenant", "eval_runs", ["tenant"])
    op.create_index("ix_eval_runs_created_at", "eval_runs", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_eval_runs_created_at", table_name="eval_runs")
    op.drop_index("ix_eval_runs_tenant", table_name="eval_runs")
    op.drop_table("eval_runs")
    op.drop_index("ix_character_renders_created_at", table_name="character_renders")
    op.drop_index("ix_character_renders_character", table_name="character_renders")
    op.drop_table("character_renders")
