"""Two consumers apply the same stream at the same time, against one database: what happens
for a while when a group member is expelled mid-batch (a long pause, a lost heartbeat) and
the partition's new owner re-reads from the last committed offset. Each event must still
take effect exactly once, and the ledger must balance, with restocks racing the stream.

On PostgreSQL this is where replicas really race: deadlocks retried, releases that lose
their race rolled back to their savepoint."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from fulfil import db
from fulfil.consumer import AppliedEvent, EventConsumer, is_transient
from fulfil.testing import consumed_records
from inventory import service
from inventory.handlers import HANDLERS
from inventory.models import InventoryTable
from inventory_builders import T0, inventory_settings
from inventory_ledger import RECEIPTS, check_ledger, seed_stock, tiers_of, workload
from sqlalchemy import func
from sqlmodel import select

CONSUMERS = 2


@pytest.fixture
async def engines(database_url: str) -> AsyncIterator[list[db.SessionFactory]]:
    """One engine (a pool of its own) per consumer, as in separate processes, and one for restocks."""
    created = [db.create_engine(database_url) for _ in range(CONSUMERS + 1)]
    await db.create_tables(created[0], [InventoryTable.metadata])
    try:
        yield [db.session_factory(engine) for engine in created]
    finally:
        for engine in created:
            await engine.dispose()


async def restock_mid_stream(sessions: db.SessionFactory) -> None:
    """The receipts, posted while the stream is applied; a deadlock is retried, as the route does."""
    for warehouse_id, sku, qty in RECEIPTS:
        await asyncio.sleep(0.05)
        for _ in range(20):
            try:
                async with sessions() as session, session.begin():
                    await service.receive_stock(session, warehouse_id, [(sku, qty)], at=T0)
                break
            except Exception as exc:
                if not is_transient(exc):
                    raise
                await asyncio.sleep(0.01)
        else:
            pytest.fail(f"the receipt of {qty} {sku} at {warehouse_id} kept deadlocking")


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_two_members_applying_the_same_batches_at_once_keep_the_ledger(
    engines: list[db.SessionFactory], database_url: str, seed: int
) -> None:
    settings = inventory_settings("127.0.0.1:9", database_url, "order-events")
    await seed_stock(engines[0])
    events, asked, cancelled = workload(seed=seed)
    records = consumed_records(events)
    consumers = [EventConsumer(settings, engines[i], HANDLERS, retry_base_seconds=0.001) for i in range(CONSUMERS)]
    rng = random.Random(seed)
    # Each member cuts the stream into its own batches, as two fetches from different offsets would.
    cuts = [[rng.randint(1, 20) for _ in range(len(records))] for _ in consumers]

    async def consume(member: int) -> None:
        start = 0
        for size in cuts[member]:
            if start >= len(records):
                return
            await consumers[member]._apply_retrying_transient(records[start : start + size])
            start += size

    await asyncio.gather(*(consume(i) for i in range(CONSUMERS)), restock_mid_stream(engines[CONSUMERS]))

    applied = sum(c.stats.applied for c in consumers)
    duplicates = sum(c.stats.duplicates for c in consumers)
    assert (applied, duplicates) == (len(events), len(events)), "each event takes effect once, the copy is skipped"
    async with engines[0]() as session:
        claimed = (await session.exec(select(func.count()).select_from(AppliedEvent))).one()
    assert claimed == len(events)
    await check_ledger(engines[0], asked, cancelled, tiers_of(events))
