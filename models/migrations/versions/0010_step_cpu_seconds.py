"""study_steps.cpu_seconds: the processor time a step took (its process's, threads included),
beside its wall time

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("study_steps") as batch:
        batch.add_column(sa.Column("cpu_seconds", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("study_steps") as batch:
        batch.drop_column("cpu_seconds")
