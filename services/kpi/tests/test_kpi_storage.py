"""The KPI state in a real database (SQLite, and PostgreSQL when it answers), driven
directly (no broker): batches applied and folded into cohort buckets, windows read from
the buckets, compaction, settling, UTC storage and tolerance of retired names."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta, timezone

import pytest
from fulfil import db
from fulfil.events import OrderCancelled, OrderEvent
from kpi import domain, service
from kpi.cohorts import Level, Window
from kpi.domain import PARTS, Aggregate, Dimension, Kpi, Stage
from kpi.models import KpiTable
from kpi_scenario import NOW, backordered, delivered, h, received, scenario_events
from sqlalchemy import func, insert, select
from test_kpi_domain import scores

SETTLE_AFTER = 8 * 86400
LATER = NOW + timedelta(days=9)
"""Every scenario order was received more than the settle window before this."""


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[db.SessionFactory]:
    engine = db.create_engine(database_url)
    await db.create_tables(engine, [KpiTable.metadata])
    yield db.session_factory(engine)
    await engine.dispose()


async def apply(
    sessions: db.SessionFactory, events: Sequence[OrderEvent], *, now: datetime = NOW, batch: int = 7
) -> int:
    changed = 0
    for start in range(0, len(events), batch):
        async with sessions() as session, session.begin():
            changed += await service.apply_events_async(
                session, events[start : start + batch], now=now, settle_after=SETTLE_AFTER
            )
    async with sessions() as session, session.begin():
        while await service.fold_pending_async(session):
            pass
    return changed


async def totals(
    sessions: db.SessionFactory, window: Window, dimension: Dimension | None, now: datetime = NOW
) -> dict[str, Aggregate]:
    async with sessions() as session:
        return await service.load_totals(session, window, now, dimension, PARTS)


async def rows_by_level(sessions: db.SessionFactory) -> dict[str, int]:
    async with sessions() as session:
        connection = await session.connection()
        query = select(service.AGGREGATES.c.level, func.count()).group_by(service.AGGREGATES.c.level)
        return {level: int(n) for level, n in await connection.execute(query)}


def shuffled(seed: int) -> list[OrderEvent]:
    events = scenario_events()
    random.Random(seed).shuffle(events)
    return events


async def test_every_window_read_from_buckets_equals_the_cohort_of_its_orders(sessions: db.SessionFactory) -> None:
    await apply(sessions, shuffled(1))
    levels = await rows_by_level(sessions)
    # Only O13 is young enough at NOW for the fine levels: 5 scopes (overall, standard, erp,
    # unassigned warehouse and carrier) x 3 parts (counts, stockouts, transmission).
    assert (levels["1h"], levels["1m"]) == (15, 15)
    assert set(levels) == {"6h", "1h", "1m"}
    for window in Window:
        scored = scores(window)
        assert (await totals(sessions, window, None)) == {"": domain.aggregate(scored)}, window
        for dimension in Dimension:
            expected = {k: a for k, a in domain.aggregate_by(scored, dimension).items() if a.parts}
            assert await totals(sessions, window, dimension) == expected, (window, dimension)
    async with sessions() as session:
        assert await service.pending_count(session) == 0
        assert await service.fold_pending_async(session) == 0


async def test_applying_the_same_events_again_changes_nothing(sessions: db.SessionFactory) -> None:
    events = scenario_events()
    assert await apply(sessions, events, batch=len(events)) == 13
    before = await totals(sessions, Window.ALL, Dimension.WAREHOUSE)
    assert await apply(sessions, shuffled(2), batch=5) == 0
    async with sessions() as session:
        assert await service.pending_count(session) == 0
    assert await totals(sessions, Window.ALL, Dimension.WAREHOUSE) == before


async def test_compaction_folds_old_buckets_into_all_time_and_drops_fine_ones(sessions: db.SessionFactory) -> None:
    await apply(sessions, shuffled(3))
    everything = {d: await totals(sessions, Window.ALL, d) for d in (None, *Dimension)}
    async with sessions() as session, session.begin():
        assert await service.compact_async(session, NOW, settle_after=SETTLE_AFTER) == 0  # nothing old yet
        removed = await service.compact_async(session, LATER, settle_after=SETTLE_AFTER)
    levels = await rows_by_level(sessions)
    assert removed > 0
    assert set(levels) == {"all"}
    assert {d: await totals(sessions, Window.ALL, d, LATER) for d in (None, *Dimension)} == everything
    assert await totals(sessions, Window.WEEK, None, LATER) == {}
    # A late change of an old cohort goes straight to the all-time aggregate.
    await apply(sessions, [delivered("O12", "S12", [(1, "A", 1, 0)], at=25)], now=LATER)
    assert set(await rows_by_level(sessions)) == {"all"}
    overall = (await totals(sessions, Window.ALL, None, LATER))[""]
    assert (overall.orders_delivered, overall.orders_open) == (9, 3)


async def test_settling_drops_closed_orders_even_never_received_ones(sessions: db.SessionFactory) -> None:
    never_received = OrderCancelled(order_id="X1", occurred_at=h(0.5), reason="duplicate order")
    orphan = delivered("X2", "S-X2", [(1, "A", 1, 0)], at=3)
    await apply(sessions, [*scenario_events(), never_received, orphan])
    async with sessions() as session:
        assert (await service.open_orders(session, [Stage.UNRECEIVED], NOW, 10)).count == 1
        assert await service.load_facts(session, "X1") is not None
    async with sessions() as session, session.begin():
        settled = await service.settle(
            session, LATER, settle_after=timedelta(seconds=SETTLE_AFTER), retention=timedelta(days=30)
        )
    # Delivered O1-O7, O11, cancelled O8 and the never-received, cancelled X1; X2 is dropped as an orphan.
    assert settled == 10
    async with sessions() as session:
        assert await service.count_orders(session) == 4  # O9 O10 O12 O13, still open
        assert await service.load_facts(session, "X1") is None
        assert await service.load_facts(session, "X2") is None
        assert await service.settled_at(session, "X1") == LATER
        assert await service.settled_at(session, "X2") is None
    # The settled order's late events are ignored; its KPIs stay in the aggregates.
    before = await totals(sessions, Window.ALL, None, LATER)
    assert (
        await apply(sessions, [received("X1", [("A", 1)], at=0.4), delivered("O6", "S6", [(1, "B", 2, 2)], at=10)]) == 0
    )
    assert await totals(sessions, Window.ALL, None, LATER) == before


async def test_a_cancellation_replaces_the_counted_contribution(sessions: db.SessionFactory) -> None:
    """An order counted while backordered, then cancelled in a later batch: the stored
    aggregates keep it in the backorder rate and the stockouts, and drop it from the open orders."""
    await apply(sessions, [received("C1", [("F", 2)]), backordered("C1", [(1, "F", 2)])])
    counted = (await totals(sessions, Window.ALL, None))[""]
    assert (counted.orders_open, counted.tallies[Kpi.BACKORDER_RATE]) == (1, (1, 1))
    cancel = OrderCancelled(order_id="C1", occurred_at=h(1), reason="customer gave up waiting")
    assert await apply(sessions, [cancel]) == 1
    overall = (await totals(sessions, Window.ALL, None))[""]
    async with sessions() as session:
        facts = await service.load_facts(session, "C1")
    assert facts is not None
    assert overall == domain.aggregate([domain.score(facts)])
    assert (overall.orders_received, overall.orders_cancelled, overall.orders_open) == (1, 1, 0)
    assert overall.tallies[Kpi.BACKORDER_RATE] == (1, 1)
    assert overall.tallies[Kpi.PERFECT_ORDER_RATE] == (0, 0)
    assert overall.stockouts == {"F": (1, 1)}


async def test_times_come_back_from_the_database_in_utc(sessions: db.SessionFactory) -> None:
    """A delivery stamped +02:00 for an order not received yet: its stage_since (the first
    event seen) must come back as the same instant, whatever the backend stores."""
    plus_two = timezone(timedelta(hours=2))
    delivery = delivered("U1", "S-U1", [(1, "A", 1, 0)], at=10)
    await apply(sessions, [delivery.model_copy(update={"delivered_at": h(10).astimezone(plus_two)})])
    async with sessions() as session:
        backlog = await service.open_orders(session, [Stage.UNRECEIVED], NOW, 10)
    (order,) = backlog.orders
    assert order.stage_since == h(10)
    assert order.age_in_stage_seconds == (NOW - h(10)).total_seconds()


async def test_open_orders_by_stage_add_up_to_open_orders(sessions: db.SessionFactory) -> None:
    orphan = delivered("X2", "S-X2", [(1, "A", 1, 0)], at=3)  # not received: in no cohort, but in the backlog
    await apply(sessions, [*scenario_events(), orphan])
    async with sessions() as session:
        report = await service.kpi_report(session, Window.ALL, Dimension.CARRIER, NOW)
        backlog = await service.open_orders(session, domain.OPEN_STAGES, NOW, 100)
    for summary in (report.overall, *report.groups):
        assert summary.orders_open == sum(summary.open_by_stage.values()), summary
    assert report.overall.orders_open == 4
    assert backlog.count == 5
    assert backlog.count_by_stage["unreceived"] == 1
    # Oldest first: received orders by receipt (0.1 h, then by id), X2 by its first event (3 h).
    assert [o.order_id for o in backlog.orders] == ["O10", "O12", "O9", "X2", "O13"]


async def test_counters_of_retired_names_do_not_break_reports(sessions: db.SessionFactory) -> None:
    await apply(sessions, scenario_events())
    async with sessions() as session:
        before = await service.kpi_report(session, Window.ALL, Dimension.TIER, NOW)
        cycle_before = await service.cycle_time_report(session, Window.ALL, None, NOW)
    retired = {"num|retired_kpi": 1, "den|retired_kpi": 2, "fail|retired_criterion": 1, "open|retired_stage": 1}
    rows = [
        ("", "", "counts", retired),
        ("tier", "core", "counts", retired),
        ("", "", "retired_series", {"n": 1, "s": 10, "q": 100, "b3": 1, "h0": 1}),
    ]
    async with sessions() as session, session.begin():
        connection = await session.connection()
        await connection.execute(
            insert(service.AGGREGATES),
            [
                {
                    "key": service.aggregate_key(str(Level.SETTLED), 0, dimension, group, part),
                    "level": str(Level.SETTLED),
                    "start": 0,
                    "dimension": dimension,
                    "group": group,
                    "part": part,
                    "counters": json.dumps(counters),
                }
                for dimension, group, part, counters in rows
            ],
        )
    async with sessions() as session:
        after = await service.kpi_report(session, Window.ALL, Dimension.TIER, NOW)
        cycle_after = await service.cycle_time_report(session, Window.ALL, None, NOW)
    assert after == before
    assert cycle_after == cycle_before
