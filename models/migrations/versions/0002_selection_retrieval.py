"""selections, selected series, retrieval state per series

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "selections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("protocol", sa.Text(), nullable=False),
        sa.Column("date_from", sa.Date(), nullable=False),
        sa.Column("date_to", sa.Date(), nullable=False),
        sa.Column("pacs", sa.Text(), nullable=False),
        sa.Column("protocols_file", sa.Text(), nullable=False),
        sa.Column("protocols_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("studies", sa.Integer(), nullable=False),
        sa.Column("series", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_selections")),
    )
    op.create_index(op.f("ix_selections_protocol"), "selections", ["protocol"])
    op.create_table(
        "selected_series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("selection_id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.Text(), nullable=False),
        sa.Column("series_instance_uid", sa.Text(), nullable=False),
        sa.Column("accession_number", sa.Text(), nullable=True),
        sa.Column("study_date", sa.Date(), nullable=True),
        sa.Column("rule", sa.Text(), nullable=False),
        sa.Column("expected_instances", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["selection_id"],
            ["selections.id"],
            name=op.f("fk_selected_series_selection_id_selections"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_selected_series")),
        sa.UniqueConstraint(
            "selection_id",
            "series_instance_uid",
            name=op.f("uq_selected_series_selection_id"),
        ),
    )
    op.create_index(
        op.f("ix_selected_series_study_instance_uid"), "selected_series", ["study_instance_uid"]
    )
    op.create_table(
        "retrievals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.Text(), nullable=False),
        sa.Column("study_instance_uid", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("expected", sa.Integer(), nullable=True),
        sa.Column("archived", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=20), nullable=True),
        sa.Column("reason_code", sa.String(length=40), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrievals")),
        sa.UniqueConstraint("series_instance_uid", name=op.f("uq_retrievals_series_instance_uid")),
    )
    op.create_index(op.f("ix_retrievals_status"), "retrievals", ["status"])
    op.create_index(op.f("ix_retrievals_study_instance_uid"), "retrievals", ["study_instance_uid"])


def downgrade() -> None:
    op.drop_table("retrievals")
    op.drop_table("selected_series")
    op.drop_table("selections")
