"""Bringing an order-intake database made by an earlier version up to the current tables.

``create_all`` creates missing tables but never alters existing ones, so a database from
before a column or index was added (a developer's ``.fulfil/``, a deployed PostgreSQL)
gets it here, idempotently, at start-up. Columns are only ever added, nullable.
"""

from __future__ import annotations

import logging

from fulfil.service import Runtime
from sqlalchemy import Connection, Table, inspect, text
from sqlalchemy.schema import CreateIndex

from order_intake.models import IntakeTable

log = logging.getLogger(__name__)


async def upgrade_schema(runtime: Runtime) -> None:
    async with runtime.engine.begin() as connection:
        await connection.run_sync(upgrade)


def upgrade(connection: Connection) -> None:
    inspector = inspect(connection)
    for table in IntakeTable.metadata.sorted_tables:
        added = _add_missing_columns(connection, table, {c["name"] for c in inspector.get_columns(table.name)})
        for index in table.indexes:
            connection.execute(CreateIndex(index, if_not_exists=True))
        if added:
            log.info("table %s upgraded: added %s", table.name, ", ".join(added))


def _add_missing_columns(connection: Connection, table: Table, existing: set[str]) -> list[str]:
    quote = connection.dialect.identifier_preparer.quote
    # Replicas may start together: PostgreSQL can say IF NOT EXISTS; SQLite has one writer.
    if_not_exists = "IF NOT EXISTS " if connection.dialect.name == "postgresql" else ""
    added = []
    for column in table.columns:
        if column.name in existing:
            continue
        column_type = column.type.compile(dialect=connection.dialect)
        connection.execute(
            text(f"ALTER TABLE {quote(table.name)} ADD COLUMN {if_not_exists}{quote(column.name)} {column_type}")
        )
        added.append(column.name)
    return added
