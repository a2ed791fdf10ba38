"""stage results per series (header QC, image QC, later stages)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stage_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_uid", sa.Text(), nullable=False),
        sa.Column("study_uid", sa.Text(), nullable=False),
        sa.Column("stage", sa.String(length=40), nullable=False),
        sa.Column("protocol", sa.Text(), nullable=True),
        sa.Column("role", sa.Text(), nullable=True),
        sa.Column("manufacturer", sa.Text(), nullable=True),
        sa.Column("model", sa.Text(), nullable=True),
        sa.Column("software_versions", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("reason_code", sa.String(length=80), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("findings", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("input_sha256", sa.String(length=64), nullable=True),
        sa.Column("method_version", sa.String(length=40), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stage_results")),
        sa.UniqueConstraint("series_uid", "stage", name=op.f("uq_stage_results_series_uid")),
    )
    op.create_index(op.f("ix_stage_results_study_uid"), "stage_results", ["study_uid"])
    op.create_index(op.f("ix_stage_results_status"), "stage_results", ["status"])
    op.create_index(op.f("ix_stage_results_reason_code"), "stage_results", ["reason_code"])
    op.create_index(
        "ix_stage_results_cohort", "stage_results", ["stage", "protocol", "manufacturer", "model"]
    )


def downgrade() -> None:
    op.drop_table("stage_results")
