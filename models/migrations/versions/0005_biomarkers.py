"""biomarkers: brain volumes per T1 series (volumetry)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "biomarkers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_uid", sa.Text(), nullable=False),
        sa.Column("study_uid", sa.Text(), nullable=False),
        sa.Column("protocol", sa.Text(), nullable=True),
        sa.Column("icv_ml", sa.Float(), nullable=False),
        sa.Column("gm_ml", sa.Float(), nullable=False),
        sa.Column("wm_ml", sa.Float(), nullable=False),
        sa.Column("csf_ml", sa.Float(), nullable=False),
        sa.Column("brain_ml", sa.Float(), nullable=False),
        sa.Column("bpf", sa.Float(), nullable=False),
        sa.Column("method", sa.String(length=60), nullable=False),
        sa.Column("method_version", sa.String(length=40), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("qc_status", sa.String(length=10), nullable=False),
        sa.Column("qc_reason", sa.String(length=80), nullable=True),
        sa.Column("confidence", sa.String(length=10), nullable=False),
        sa.Column("converter", sa.Text(), nullable=True),
        sa.Column("input_sha256", sa.String(length=64), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_biomarkers")),
        sa.UniqueConstraint("series_uid", name=op.f("uq_biomarkers_series_uid")),
    )
    op.create_index(op.f("ix_biomarkers_study_uid"), "biomarkers", ["study_uid"])
    op.create_index(op.f("ix_biomarkers_protocol"), "biomarkers", ["protocol"])
    op.create_index(op.f("ix_biomarkers_qc_status"), "biomarkers", ["qc_status"])


def downgrade() -> None:
    op.drop_table("biomarkers")
