"""A shipping database made before next_check_at, the split columns and the unique tracking
index is brought up to date at start-up, and its in-flight shipments get delay checks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from fulfil import db
from shipping.models import ShipmentRow
from shipping.schema import upgrade
from shipping_support import postgres_database
from sqlalchemy import Column, Index, MetaData, Table, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

pytestmark = pytest.mark.asyncio(loop_scope="module")

ADDED = {"next_check_at", "parent_shipment_id", "remainder_shipment_id"}
SHIP_BY = datetime(2026, 3, 3, 9, 0, tzinfo=UTC)


def old_shipments_table() -> Table:
    """The shipments table as the previous version created it."""
    current: Table = ShipmentRow.__table__  # type: ignore[attr-defined]
    columns = [Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable) for c in current.columns]
    old = Table("shipments", MetaData(), *[c for c in columns if c.name not in ADDED])
    Index("ix_shipments_carrier_tracking", old.c.carrier, old.c.tracking_number)
    return old


@pytest_asyncio.fixture(loop_scope="module", params=["sqlite", "postgresql"])
async def old_database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path}/old.db")
        try:
            yield await _fill(engine)
        finally:
            await engine.dispose()
        return
    async with postgres_database() as url:
        if url is None:
            pytest.skip("PostgreSQL does not answer")
        engine = db.create_engine(url)
        try:
            yield await _fill(engine)
        finally:
            await engine.dispose()


async def _fill(engine: AsyncEngine) -> AsyncEngine:
    table = old_shipments_table()
    async with engine.begin() as connection:
        await connection.run_sync(table.metadata.create_all)
        for n, status in enumerate(("pending", "shipped", "delivered")):
            await connection.execute(
                table.insert().values(
                    id=f"shp_{n}",
                    order_id="o-1",
                    warehouse_id="wh",
                    status=status,
                    lines=[],
                    allocated_at=SHIP_BY - timedelta(days=1),
                    ship_by=SHIP_BY,
                    original_promised_delivery_at=SHIP_BY + timedelta(days=3),
                    promised_delivery_at=SHIP_BY + timedelta(days=3),
                    promise_reason="service_level_transit",
                    service_level="standard",
                    customer_tier="standard",
                    carrier="acme" if status != "pending" else None,
                    tracking_number=f"T{n}" if status != "pending" else None,
                    late_dispatch=False,
                    late_delivery=False,
                )
            )
    return engine


async def test_an_old_database_is_upgraded_in_place_and_idempotently(old_database: AsyncEngine) -> None:
    for _ in range(2):
        async with old_database.begin() as connection:
            await connection.run_sync(upgrade)
    async with old_database.connect() as connection:
        columns = await connection.run_sync(lambda c: {col["name"] for col in inspect(c).get_columns("shipments")})
        indexes = await connection.run_sync(lambda c: {i["name"]: i for i in inspect(c).get_indexes("shipments")})
        rows = (await connection.execute(text("SELECT id, next_check_at FROM shipments ORDER BY id"))).all()
    assert columns >= ADDED
    assert "ix_shipments_carrier_tracking" not in indexes
    assert indexes["ux_shipments_carrier_tracking"]["unique"]
    assert "ix_shipments_next_check_at" in indexes
    checks = {row[0]: row[1] for row in rows}
    assert checks["shp_2"] is None  # delivered: nothing left to check
    assert checks["shp_0"] is not None
    assert checks["shp_1"] is not None
    with pytest.raises(IntegrityError):
        async with old_database.begin() as connection:
            await connection.execute(
                text("UPDATE shipments SET carrier = 'acme', tracking_number = 'T1' WHERE id = 'shp_2'")
            )
