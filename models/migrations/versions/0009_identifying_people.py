"""the people, address and device a description may name: studies.institution_address,
studies.referring_physician_name, series.performing_physician_name, series.operators_name,
series.device_serial_number; cohort_series record keys (disclosure control);
cohort_state.cleaner_version; the audit chain (audit_log.seq, prev_mac, mac, key_id;
audit_head)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.add_column(sa.Column("seq", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("prev_mac", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("mac", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("key_id", sa.String(length=16), nullable=True))
        batch.create_unique_constraint(op.f("uq_audit_log_seq"), ["seq"])
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("mac", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_head")),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "mac": ""}])
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("institution_address", sa.Text(), nullable=True))
        batch.add_column(sa.Column("referring_physician_name", sa.Text(), nullable=True))
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("performing_physician_name", sa.Text(), nullable=True))
        batch.add_column(sa.Column("operators_name", sa.Text(), nullable=True))
        batch.add_column(sa.Column("device_serial_number", sa.Text(), nullable=True))
    with op.batch_alter_table("cohort_series") as batch:
        batch.add_column(sa.Column("patient_rkey", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("study_rkey", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("series_rkey", sa.Integer(), nullable=True))
    with op.batch_alter_table("cohort_state") as batch:
        # rows made before this revision were cleaned by cleaner 1 and have no record keys:
        # the next refresh rebuilds them
        batch.add_column(
            sa.Column("cleaner_version", sa.Text(), nullable=False, server_default="1")
        )


def downgrade() -> None:
    op.drop_table("audit_head")
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_constraint(op.f("uq_audit_log_seq"), type_="unique")
        batch.drop_column("key_id")
        batch.drop_column("mac")
        batch.drop_column("prev_mac")
        batch.drop_column("seq")
    with op.batch_alter_table("cohort_state") as batch:
        batch.drop_column("cleaner_version")
    with op.batch_alter_table("cohort_series") as batch:
        batch.drop_column("series_rkey")
        batch.drop_column("study_rkey")
        batch.drop_column("patient_rkey")
    with op.batch_alter_table("series") as batch:
        batch.drop_column("device_serial_number")
        batch.drop_column("operators_name")
        batch.drop_column("performing_physician_name")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("referring_physician_name")
        batch.drop_column("institution_address")
