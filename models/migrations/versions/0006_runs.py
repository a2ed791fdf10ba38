"""runs and study_steps: protocol flow runs and where each study stands in them

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("flow_run_id", sa.String(length=40), nullable=True),
        sa.Column("protocol", sa.Text(), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    op.create_index(op.f("ix_runs_flow_run_id"), "runs", ["flow_run_id"])
    op.create_index(op.f("ix_runs_protocol"), "runs", ["protocol"])
    op.create_table(
        "study_steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("protocol", sa.Text(), nullable=False),
        sa.Column("study_uid", sa.Text(), nullable=False),
        sa.Column("step", sa.String(length=40), nullable=False),
        sa.Column("input_key", sa.String(length=64), nullable=False),
        sa.Column("method_version", sa.String(length=80), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("reason_code", sa.String(length=80), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("outputs", sa.JSON(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_study_steps_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_steps")),
        sa.UniqueConstraint("protocol", "study_uid", "step", name=op.f("uq_study_steps_protocol")),
    )
    op.create_index(op.f("ix_study_steps_study_uid"), "study_steps", ["study_uid"])
    op.create_index(op.f("ix_study_steps_status"), "study_steps", ["status"])
    op.create_index(op.f("ix_study_steps_run_id"), "study_steps", ["run_id"])


def downgrade() -> None:
    op.drop_table("study_steps")
    op.drop_table("runs")
