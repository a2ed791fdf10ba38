"""Alembic environment: migrations run on the connection cohortflow hands over.

``models.database.migrate`` calls ``alembic.command.upgrade`` with the connection in
``config.attributes["connection"]``; there is no alembic.ini and no URL in any file.
"""

from __future__ import annotations

from alembic import context

from cohortflow.models.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with models.database.migrate(), which passes a connection")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
