"""cohort discovery: cohort_series, cohort_protocols, cohort_state, cohorts, cohort_members;
selections.listed_from

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("selections") as batch:
        batch.add_column(sa.Column("listed_from", sa.Text(), nullable=True))
    op.create_table(
        "cohort_series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_pk", sa.Integer(), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=True),
        sa.Column("patient_pk", sa.Integer(), nullable=True),
        sa.Column("pseudonym", sa.String(length=32), nullable=True),
        sa.Column("pseudo_study_uid", sa.Text(), nullable=False),
        sa.Column("pseudo_series_uid", sa.Text(), nullable=False),
        sa.Column("study_date", sa.Date(), nullable=True),
        sa.Column("study_year", sa.Integer(), nullable=True),
        sa.Column("shifted_date", sa.Date(), nullable=True),
        sa.Column("shifted_year", sa.Integer(), nullable=True),
        sa.Column("age", sa.Integer(), nullable=True),
        sa.Column("sex", sa.String(length=1), nullable=True),
        sa.Column("modality", sa.Text(), nullable=True),
        sa.Column("body_part", sa.Text(), nullable=True),
        sa.Column("manufacturer", sa.Text(), nullable=True),
        sa.Column("model", sa.Text(), nullable=True),
        sa.Column("scanner", sa.Text(), nullable=True),
        sa.Column("field_strength", sa.Float(), nullable=True),
        sa.Column("slice_thickness", sa.Float(), nullable=True),
        sa.Column("acquisition", sa.String(length=2), nullable=True),
        sa.Column("protocol_name", sa.Text(), nullable=True),
        sa.Column("series_description", sa.Text(), nullable=True),
        sa.Column("study_description", sa.Text(), nullable=True),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("qc_verdict", sa.String(length=10), nullable=True),
        sa.Column("biomarkers", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_pk"], ["series.id"], name=op.f("fk_cohort_series_series_pk_series")
        ),
        sa.ForeignKeyConstraint(
            ["study_pk"], ["studies.id"], name=op.f("fk_cohort_series_study_pk_studies")
        ),
        sa.ForeignKeyConstraint(
            ["patient_pk"], ["patients.id"], name=op.f("fk_cohort_series_patient_pk_patients")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cohort_series")),
        sa.UniqueConstraint("series_pk", name=op.f("uq_cohort_series_series_pk")),
        sa.UniqueConstraint("pseudo_series_uid", name=op.f("uq_cohort_series_pseudo_series_uid")),
    )
    for column in (
        "study_pk",
        "patient_pk",
        "pseudonym",
        "study_date",
        "shifted_date",
        "age",
        "body_part",
        "manufacturer",
        "model",
        "protocol_name",
        "series_description",
        "study_description",
        "qc_verdict",
    ):
        op.create_index(op.f(f"ix_cohort_series_{column}"), "cohort_series", [column])
    op.create_index(
        "ix_cohort_series_scan", "cohort_series", ["modality", "field_strength", "sex", "age"]
    )
    op.create_index("ix_cohort_series_scanner", "cohort_series", ["scanner", "shifted_year"])
    op.create_table(
        "cohort_protocols",
        sa.Column("series_pk", sa.Integer(), nullable=False),
        sa.Column("protocol", sa.String(length=80), nullable=False),
        sa.Column("role", sa.String(length=80), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_pk"],
            ["series.id"],
            name=op.f("fk_cohort_protocols_series_pk_series"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("series_pk", "protocol", name=op.f("pk_cohort_protocols")),
    )
    op.create_index(
        "ix_cohort_protocols_protocol", "cohort_protocols", ["protocol", "role", "series_pk"]
    )
    op.create_table(
        "cohort_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_mark", sa.Integer(), nullable=False),
        sa.Column("instance_mark", sa.Integer(), nullable=False),
        sa.Column("history_mark", sa.Integer(), nullable=False),
        sa.Column("review_mark", sa.Integer(), nullable=False),
        sa.Column("protocols_sha256", sa.String(length=64), nullable=False),
        sa.Column("key_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("refreshed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cohort_state")),
    )
    op.create_table(
        "cohorts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=80), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("filters", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("patients", sa.Integer(), nullable=False),
        sa.Column("studies", sa.Integer(), nullable=False),
        sa.Column("series", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cohorts")),
        sa.UniqueConstraint("name", name=op.f("uq_cohorts_name")),
    )
    op.create_table(
        "cohort_members",
        sa.Column("cohort_id", sa.Integer(), nullable=False),
        sa.Column("series_pk", sa.Integer(), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["cohort_id"],
            ["cohorts.id"],
            name=op.f("fk_cohort_members_cohort_id_cohorts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["series_pk"], ["series.id"], name=op.f("fk_cohort_members_series_pk_series")
        ),
        sa.ForeignKeyConstraint(
            ["study_pk"], ["studies.id"], name=op.f("fk_cohort_members_study_pk_studies")
        ),
        sa.PrimaryKeyConstraint("cohort_id", "series_pk", name=op.f("pk_cohort_members")),
    )
    op.create_index(op.f("ix_cohort_members_study_pk"), "cohort_members", ["study_pk"])


def downgrade() -> None:
    op.drop_table("cohort_members")
    op.drop_table("cohorts")
    op.drop_table("cohort_state")
    op.drop_table("cohort_protocols")
    op.drop_table("cohort_series")
    with op.batch_alter_table("selections") as batch:
        batch.drop_column("listed_from")
