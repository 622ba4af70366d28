"""Baseline: the registry's and the service store's tables as the code before migrations wrote them.

Revision ID: 0001_baseline
Revises: (none)

Frozen: never change this file to follow the models; write a new revision instead.

A database written before migrations has all or some of these tables and no ``alembic_version``:
``upgrade`` creates only the missing ones (a home where only ``imagegen keys create`` ran has the
service tables but not the registry's), which brings it to the baseline before the later
revisions run. ``tests/fixtures/pre_tenancy/registry.sql`` is such a database.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def _when() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _tables() -> list[tuple[str, list, list[tuple[str, list[str]]]]]:
    """(name, columns and constraints, indexes (name, columns)), parents before children."""
    return [
        (
            "schema_version",
            [
                sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
                sa.Column("applied_at", _when(), nullable=False),
                sa.PrimaryKeyConstraint("version"),
            ],
            [],
        ),
        (
            "characters",
            [
                sa.Column("id", sa.String(64), nullable=False),
                sa.Column("name", sa.String(200), nullable=False),
                sa.Column("card", sa.JSON(), nullable=False),
                sa.Column("provenance_kind", sa.String(16), nullable=False),
                sa.Column("provenance_creator", sa.String(256), nullable=False),
                sa.Column("provenance_date", sa.Date(), nullable=False),
                sa.Column("provenance_evidence", sa.Text(), nullable=False),
                sa.Column("status", sa.String(16), nullable=False),
                sa.Column("age_check", sa.String(16), nullable=False),
                sa.Column("version", sa.Integer(), nullable=False),
                sa.Column("created_at", _when(), nullable=False),
                sa.Column("updated_at", _when(), nullable=False),
                sa.PrimaryKeyConstraint("id"),
            ],
            [],
        ),
        (
            "reference_images",
            [
                sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
                sa.Column("character_id", sa.String(64), nullable=False),
                sa.Column("position", sa.Integer(), nullable=False),
                sa.Column("blob_digest", sa.String(64), nullable=False),
                sa.Column("mime_type", sa.String(64), nullable=False),
                sa.Column("width", sa.Integer(), nullable=False),
                sa.Column("height", sa.Integer(), nullable=False),
                sa.Column("size", sa.Integer(), nullable=False),
                sa.Column("filename", sa.String(255), nullable=False),
                sa.ForeignKeyConstraint(["character_id"], ["characters.id"], ondelete="CASCADE"),
                sa.PrimaryKeyConstraint("id"),
                sa.UniqueConstraint("character_id", "position"),
                sa.UniqueConstraint("character_id", "blob_digest"),
            ],
            [
                ("ix_reference_images_blob_digest", ["blob_digest"]),
                ("ix_reference_images_character_id", ["character_id"]),
            ],
        ),
        (
            "face_analyses",
            [
                sa.Column("reference_id", sa.Integer(), nullable=False),
                sa.Column("backend", sa.String(64), nullable=False),
                sa.Column("bbox", sa.JSON(), nullable=False),
                sa.Column("landmarks", sa.JSON(), nullable=False),
                sa.Column("det_score", sa.Float(), nullable=False),
                sa.Column("embedding", sa.JSON(), nullable=False),
                sa.Column("model_version", sa.String(128), nullable=False),
                sa.Column("quality", sa.JSON(), nullable=False),
                sa.ForeignKeyConstraint(["reference_id"], ["reference_images.id"], ondelete="CASCADE"),
                sa.PrimaryKeyConstraint("reference_id", "backend"),
            ],
            [],
        ),
        (
            "identity_centroids",
            [
                sa.Column("character_id", sa.String(64), nullable=False),
                sa.Column("backend", sa.String(64), nullable=False),
                sa.Column("embedding", sa.JSON(), nullable=False),
                sa.Column("updated_at", _when(), nullable=False),
                sa.ForeignKeyConstraint(["character_id"], ["characters.id"], ondelete="CASCADE"),
                sa.PrimaryKeyConstraint("character_id", "backend"),
            ],
            [],
        ),
        (
            "conditioning_cache",
            [
                sa.Column("character_id", sa.String(64), nullable=False),
                sa.Column("method", sa.String(64), nullable=False),
                sa.Column("method_version", sa.String(64), nullable=False),
                sa.Column("weights_hash", sa.String(128), nullable=False),
                sa.Column("blob_digest", sa.String(64), nullable=False),
                sa.Column("meta", sa.JSON(), nullable=False),
                sa.Column("character_version", sa.Integer(), nullable=False),
                sa.Column("created_at", _when(), nullable=False),
                sa.ForeignKeyConstraint(["character_id"], ["characters.id"], ondelete="CASCADE"),
                sa.PrimaryKeyConstraint("character_id", "method", "method_version", "weights_hash"),
            ],
            [("ix_conditioning_cache_blob_digest", ["blob_digest"])],
        ),
        (
            "protected_identities",
            [
                sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
                sa.Column("label", sa.String(200), nullable=False),
                sa.Column("backend", sa.String(64), nullable=False),
                sa.Column("embedding", sa.JSON(), nullable=False),
                sa.Column("note", sa.Text(), nullable=False),
                sa.Column("created_at", _when(), nullable=False),
                sa.PrimaryKeyConstraint("id"),
            ],
            [("ix_protected_identities_backend", ["backend"])],
        ),
        (
            "api_keys",
            [
                sa.Column("id", sa.String(32), nullable=False),
                sa.Column("name", sa.String(200), nullable=False),
                sa.Column("secret_sha256", sa.String(64), nullable=False),
                sa.Column("scopes", sa.JSON(), nullable=False),
                sa.Column("created_at", _when(), nullable=False),
                sa.Column("revoked_at", _when(), nullable=True),
                sa.Column("last_used_at", _when(), nullable=True),
                sa.PrimaryKeyConstraint("id"),
            ],
            [],
        ),
        (
            "serve_jobs",
            [
                sa.Column("id", sa.String(32), nullable=False),
                sa.Column("key_id", sa.String(32), nullable=False),
                sa.Column("preset", sa.String(64), nullable=False),
                sa.Column("status", sa.String(16), nullable=False),
                sa.Column("request", sa.JSON(), nullable=False),
                sa.Column("attempts", sa.Integer(), nullable=False),
                sa.Column("owner", sa.String(64), nullable=True),
                sa.Column("heartbeat_at", _when(), nullable=True),
                sa.Column("progress", sa.JSON(), nullable=False),
                sa.Column("result", sa.JSON(), nullable=True),
                sa.Column("error_code", sa.String(64), nullable=True),
                sa.Column("error_message", sa.Text(), nullable=True),
                sa.Column("created_at", _when(), nullable=False),
                sa.Column("started_at", _when(), nullable=True),
                sa.Column("finished_at", _when(), nullable=True),
                sa.PrimaryKeyConstraint("id"),
            ],
            [
                ("ix_serve_jobs_status", ["status"]),
                ("ix_serve_jobs_key_id", ["key_id"]),
                ("ix_serve_jobs_created_at", ["created_at"]),
            ],
        ),
        (
            "serve_job_events",
            [
                sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
                sa.Column("job_id", sa.String(32), nullable=False),
                sa.Column("type", sa.String(16), nullable=False),
                sa.Column("data", sa.JSON(), nullable=False),
                sa.Column("created_at", _when(), nullable=False),
                sa.ForeignKeyConstraint(["job_id"], ["serve_jobs.id"], ondelete="CASCADE"),
                sa.PrimaryKeyConstraint("id"),
            ],
            [("ix_serve_job_events_job_id", ["job_id"])],
        ),
        (
            "render_audit",
            [
                sa.Column("image_id", sa.String(32), nullable=False),
                sa.Column("request_id", sa.String(64), nullable=False),
                sa.Column("job_id", sa.String(32), nullable=True),
                sa.Column("key_id", sa.String(32), nullable=False),
                sa.Column("preset", sa.String(64), nullable=False),
                sa.Column("character", sa.String(64), nullable=True),
                sa.Column("character_version", sa.Integer(), nullable=True),
                sa.Column("method", sa.String(64), nullable=True),
                sa.Column("prompt_sha256", sa.String(64), nullable=False),
                sa.Column("seed", sa.BigInteger(), nullable=False),
                sa.Column("watermark_tag", sa.BigInteger(), nullable=True),
                sa.Column("created_at", _when(), nullable=False),
                sa.PrimaryKeyConstraint("image_id"),
            ],
            [
                ("ix_render_audit_watermark_tag", ["watermark_tag"]),
                ("ix_render_audit_request_id", ["request_id"]),
            ],
        ),
    ]


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    for name, columns, indexes in _tables():
        if name in existing:
            continue
        op.create_table(name, *columns)
        for index_name, index_columns in indexes:
            op.create_index(index_name, name, index_columns)


def downgrade() -> None:
    for name, _, _ in reversed(_tables()):
        op.drop_table(name)
