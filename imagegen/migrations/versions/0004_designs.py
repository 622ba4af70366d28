"""Designs (issue 14): a character designed from a description, stored like a job until it expires.

Revision ID: 0004_designs
Revises: 0003_library

- ``designs``: one row per design, owned by a tenant (and the key that started it): the card,
  preset, stage and status, its current job, the pick, the turnaround grid, the last reference
  report, the random key of its draft identity, and ``expires_at`` (indexed: the expiry sweep);
- ``design_images``: its candidates, uploads and turnaround slots: pixel digest, the digest of the
  stored PNG (under ``<home>/designs/<design id>/``), origin (rendered / upload), recipe, face
  check, slot, kept / analysable / similarity / outlier.

Both tables are new: nothing written before changes. Downgrade drops them (the designs' folders
stay on disk until deleted by hand).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_designs"
down_revision = "0003_library"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "designs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("character_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("card", sa.JSON(), nullable=False),
        sa.Column("preset", sa.String(64), nullable=False),
        sa.Column("method", sa.String(64), nullable=True),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("draft_key", sa.String(64), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("grid", sa.JSON(), nullable=True),
        sa.Column("pick", sa.JSON(), nullable=True),
        sa.Column("report", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("draft_key"),
    )
    op.create_index("ix_designs_tenant", "designs", ["tenant"])
    op.create_index("ix_designs_expires_at", "designs", ["expires_at"])
    op.create_table(
        "design_images",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("design_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("blob", sa.String(64), nullable=False),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("recipe", sa.JSON(), nullable=True),
        sa.Column("face", sa.JSON(), nullable=True),
        sa.Column("slot", sa.JSON(), nullable=True),
        sa.Column("kept", sa.Boolean(), nullable=False),
        sa.Column("analysable", sa.Boolean(), nullable=False),
        sa.Column("similarity", sa.Float(), nullable=True),
        sa.Column("outlier", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["design_id"], ["designs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_design_images_design_id", "design_images", ["design_id"])


def downgrade() -> None:
    op.drop_index("ix_design_images_design_id", table_name="design_images")
    op.drop_table("design_images")
    op.drop_index("ix_designs_expires_at", table_name="designs")
    op.drop_index("ix_designs_tenant", table_name="designs")
    op.drop_table("designs")
