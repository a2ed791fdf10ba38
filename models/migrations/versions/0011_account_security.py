"""account security: users.name_key (names unique without regard to case), failed_logins,
blocked_until, locked (throttling and lockout), session_epoch (sessions that end together)

Names that differ only by case become one account: the oldest keeps its name, the others are
disabled and keyed apart (``name#id``) until an admin sorts them out.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("name_key", sa.String(length=80), nullable=True))
        batch.add_column(sa.Column("failed_logins", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("blocked_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("locked", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("session_epoch", sa.Integer(), nullable=True))
    users = sa.table(
        "users",
        sa.column("id", sa.Integer),
        sa.column("username", sa.String),
        sa.column("name_key", sa.String),
        sa.column("active", sa.Boolean),
        sa.column("failed_logins", sa.Integer),
        sa.column("locked", sa.Boolean),
        sa.column("session_epoch", sa.Integer),
    )
    bind = op.get_bind()
    seen: set[str] = set()
    for row_id, username in bind.execute(
        sa.select(users.c.id, users.c.username).order_by(users.c.id)
    ):
        key = str(username).casefold()
        values: dict[str, object] = {"failed_logins": 0, "locked": False, "session_epoch": 0}
        if key in seen:
            values.update(name_key=f"{key}#{row_id}"[:80], active=False)
        else:
            seen.add(key)
            values["name_key"] = key
        bind.execute(sa.update(users).where(users.c.id == row_id).values(**values))
    with op.batch_alter_table("users") as batch:
        for name in ("name_key", "failed_logins", "locked", "session_epoch"):
            batch.alter_column(name, nullable=False)
        batch.create_unique_constraint(op.f("uq_users_name_key"), ["name_key"])


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_constraint(op.f("uq_users_name_key"), type_="unique")
        batch.drop_column("session_epoch")
        batch.drop_column("locked")
        batch.drop_column("blocked_until")
        batch.drop_column("failed_logins")
        batch.drop_column("name_key")
