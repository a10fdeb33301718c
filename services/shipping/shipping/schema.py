"""Bringing a shipping database made by an earlier version up to the current tables.

``create_all`` creates missing tables but never alters existing ones, so a database from
before a column or index was added (a developer's ``.fulfil/``, a deployed PostgreSQL)
gets it here, idempotently, at start-up. Columns are only ever added, nullable.
"""

from __future__ import annotations

import logging

from fulfil.service import Runtime
from sqlalchemy import Connection, inspect, text
from sqlalchemy.schema import CreateIndex

from shipping.domain import ShipmentStatus
from shipping.models import ShipmentRow

log = logging.getLogger(__name__)

RETIRED_INDEXES = {"shipments": ["ix_shipments_carrier_tracking"]}
"""Indexes an earlier version made that the current one replaces."""


async def upgrade_schema(runtime: Runtime) -> None:
    async with runtime.engine.begin() as connection:
        await connection.run_sync(upgrade)


def upgrade(connection: Connection) -> None:
    table = ShipmentRow.__table__  # type: ignore[attr-defined]
    inspector = inspect(connection)
    existing = {column["name"] for column in inspector.get_columns(table.name)}
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
    if "next_check_at" in added:
        # Due at once: the scanner's first look computes the real next check of each.
        connection.execute(
            text(
                f"UPDATE {quote(table.name)} SET next_check_at = CASE status "
                "WHEN :pending THEN ship_by ELSE original_promised_delivery_at END "
                "WHERE status IN (:pending, :shipped)"
            ),
            {"pending": ShipmentStatus.PENDING.value, "shipped": ShipmentStatus.SHIPPED.value},
        )
    present = {index["name"] for index in inspector.get_indexes(table.name)}
    for retired in RETIRED_INDEXES.get(table.name, []):
        if retired in present:
            connection.execute(text(f"DROP INDEX IF EXISTS {quote(retired)}"))
    for index in table.indexes:
        # A duplicate tracking number in old data makes this fail loudly, as it should.
        connection.execute(CreateIndex(index, if_not_exists=True))
    if added:
        log.info("shipping schema upgraded: added %s", ", ".join(added))
