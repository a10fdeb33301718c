"""The kpi handlers inside the platform's consumer (fed records directly, no broker): a
batch is applied in one go when its transaction commits, with one read of its orders;
a record that makes the commit fail is isolated and dead-lettered like any other."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fulfil import db
from fulfil.consumer import EventConsumer
from fulfil.events import OrderEvent
from fulfil.outbox import OutboxRow
from fulfil.settings import ServiceSettings
from fulfil.testing import consumed_records
from kpi import domain, service
from kpi.cohorts import Window
from kpi.handlers import BatchIngest
from kpi.models import KpiTable
from kpi_scenario import NOW, received, scenario_events
from sqlalchemy import event
from sqlmodel import select
from test_kpi_domain import EXPECTED_TALLIES


@pytest.fixture
async def sessions(tmp_path: Path) -> AsyncIterator[db.SessionFactory]:
    engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path}/kpi.db")
    await db.create_tables(engine, [KpiTable.metadata])
    yield db.session_factory(engine)
    await engine.dispose()


def consumer_for(sessions: db.SessionFactory, ingest: BatchIngest) -> EventConsumer:
    settings = ServiceSettings(service_name="kpi", consumer_max_attempts=2, consumer_batch_size=1000)
    return EventConsumer(settings, sessions, ingest.handlers(), retry_base_seconds=0.001)


async def orders_stored(sessions: db.SessionFactory) -> int:
    async with sessions() as session:
        return await service.count_orders(session)


async def test_a_batch_reads_its_orders_once_and_folds_at_commit(sessions: db.SessionFactory) -> None:
    clock = [0.0]
    ingest = BatchIngest(lambda: NOW, timedelta(days=8), monotonic=lambda: clock[0])
    consumer = consumer_for(sessions, ingest)
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    engine = sessions.kw["bind"]
    event.listen(engine.sync_engine, "before_cursor_execute", count)
    events = scenario_events()
    clock[0] = 10.0  # the fold is due: the batch's changes reach the aggregates in the same commit
    await consumer.apply(consumed_records(events))
    event.remove(engine.sync_engine, "before_cursor_execute", count)
    reads = [s for s in statements if s.lstrip().startswith("SELECT") and "FROM kpi_orders" in s]
    assert len(reads) == 1
    assert len([s for s in statements if s.lstrip().startswith("INSERT INTO kpi_orders")]) == 1
    async with sessions() as session:
        assert await service.pending_count(session) == 0
        overall = await service.load_overall(session, Window.ALL, NOW)
    assert overall.tallies == EXPECTED_TALLIES
    assert consumer.stats.applied == len(events)


async def test_a_record_failing_the_commit_is_isolated_and_dead_lettered(
    sessions: db.SessionFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest = BatchIngest(lambda: NOW, timedelta(days=8))
    consumer = consumer_for(sessions, ingest)
    real_apply = domain.apply

    def fussy(facts: domain.OrderFacts, order_event: OrderEvent) -> domain.OrderFacts:
        if order_event.order_id == "POISON":
            raise ValueError("cannot apply this one")
        return real_apply(facts, order_event)

    monkeypatch.setattr(domain, "apply", fussy)
    events = scenario_events()
    records = consumed_records([*events[:20], received("POISON", [("A", 1)]), *events[20:]])
    with pytest.raises(ValueError, match="cannot apply"):
        await consumer.apply(records)  # the commit hook fails: nothing of the batch is applied
    assert await orders_stored(sessions) == 0
    await consumer.apply(records)  # redelivered; now applied one by one, so the platform isolates it
    assert await orders_stored(sessions) == 13
    assert consumer.stats.dead_lettered == 1
    async with sessions() as session:
        dead = (await session.exec(select(OutboxRow).where(OutboxRow.topic == "order-events.dlq"))).all()
        while await service.fold_pending_async(session):
            pass
        overall = await service.load_overall(session, Window.ALL, NOW)
    assert [row.key for row in dead] == [b"POISON"]
    assert overall.tallies == EXPECTED_TALLIES
