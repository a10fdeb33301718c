"""The queue and reserve rules through the real use cases on a real database (SQLite and
PostgreSQL): waiting orders before new ones, no starvation of ship-complete orders, lost
races re-served, the core reserve used up by core orders, event times never before the order."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

import pytest
from fulfil import db
from fulfil.events import (
    AllocatedLine,
    CustomerTier,
    LineQuantity,
    OrderAllocated,
    OrderBackordered,
    OrderCancelled,
    OrderEvent,
    OrderShipped,
)
from inventory import service
from inventory.models import InventoryTable, StockIn, WarehouseIn
from inventory_builders import T0, line, order
from sqlalchemy import update
from sqlmodel.ext.asyncio.session import AsyncSession

T = TypeVar("T")
CORE = CustomerTier.CORE
STANDARD = CustomerTier.STANDARD


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[db.SessionFactory]:
    engine = db.create_engine(database_url)
    await db.create_tables(engine, [InventoryTable.metadata])
    factory = db.session_factory(engine)
    async with factory() as session, session.begin():
        body = WarehouseIn(name="Paris", country="FR", handling_hours=24, priority=1)
        await service.put_warehouse(session, "PAR", body)
    try:
        yield factory
    finally:
        await engine.dispose()


async def run(sessions: db.SessionFactory, use_case: Callable[[AsyncSession], Awaitable[T]]) -> T:
    async with sessions() as session, session.begin():
        return await use_case(session)


def summary(events: list[OrderEvent]) -> list[tuple[str, str, object]]:
    out: list[tuple[str, str, object]] = []
    for event in events:
        if isinstance(event, OrderAllocated):
            units = sorted((a.line_no, a.sku, a.qty) for a in event.allocations)
            out.append((event.type, event.order_id, (units, event.complete, event.first_pass)))
        else:
            assert isinstance(event, OrderBackordered)
            out.append((event.type, event.order_id, sorted((ln.line_no, ln.sku, ln.qty) for ln in event.lines)))
    return out


async def level(sessions: db.SessionFactory, sku: str = "A") -> tuple[int, int, int, int]:
    found = await run(sessions, lambda s: service.stock_level(s, "PAR", sku))
    assert found is not None
    return (found.on_hand, found.reserved, found.protected_for_core, found.reserved_for_core)


async def test_a_ship_complete_order_is_not_starved_by_newer_orders(sessions: db.SessionFactory) -> None:
    waiting = order("S", line(1, "A", 5), allow_partial=False, minutes=0)
    assert summary(await run(sessions, lambda s: service.allocate_order(s, waiting, at=T0))) == [
        ("order.backordered", "S", [(1, "A", 5)])
    ]
    # 3 arrive: the order first in the queue takes and holds them, unannounced.
    served = await run(sessions, lambda s: service.receive_stock(s, "PAR", [("A", 3)], at=T0))
    assert (served.orders, served.events) == (["S"], [])
    # A newer order finds nothing free: the units are spoken for.
    newer = order("N", line(1, "A", 1), minutes=10)
    assert summary(await run(sessions, lambda s: service.allocate_order(s, newer, at=T0))) == [
        ("order.backordered", "N", [(1, "A", 1)])
    ]
    # 2 more: the ship-complete order is complete first and announced once with everything.
    served = await run(sessions, lambda s: service.receive_stock(s, "PAR", [("A", 2)], at=T0))
    assert summary(served.events) == [("order.allocated", "S", ([(1, "A", 5)], True, False))]
    queue = await run(sessions, lambda s: service.backorder_queue(s, None, today=T0.date()))
    assert [(b.order_id, b.qty) for b in queue] == [("N", 1)]


async def test_free_units_go_to_waiting_orders_ahead_before_a_new_order_takes_them(
    sessions: db.SessionFactory,
) -> None:
    first = order("W", line(1, "A", 2), minutes=0)
    await run(sessions, lambda s: service.allocate_order(s, first, at=T0))

    async def units_freed_unseen(session: AsyncSession) -> None:
        # Units that came free without the queue being served (e.g. a replica that lost a race).
        stock = service.STOCK
        await (await session.connection()).execute(
            update(stock).where(stock.c.sku == "A").values(on_hand=stock.c.on_hand + 2)
        )

    await run(sessions, lambda s: service.set_stock(s, "PAR", "A", StockIn(on_hand=0), at=T0))
    await run(sessions, units_freed_unseen)
    newer = order("N", line(1, "A", 2), minutes=10)
    events = await run(sessions, lambda s: service.allocate_order(s, newer, at=T0 + timedelta(hours=1)))
    assert summary(events) == [
        ("order.allocated", "W", ([(1, "A", 2)], True, False)),
        ("order.backordered", "N", [(1, "A", 2)]),
    ]
    # A new core order stands ahead of waiting standard orders: it takes what comes free first.
    await run(sessions, units_freed_unseen)
    core = order("C", line(1, "A", 2), tier=CORE, minutes=20)
    events = await run(sessions, lambda s: service.allocate_order(s, core, at=T0 + timedelta(hours=1)))
    assert summary(events) == [("order.allocated", "C", ([(1, "A", 2)], True, True))]


async def test_an_order_that_lost_every_race_is_served_from_the_queue(
    sessions: db.SessionFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    await run(sessions, lambda s: service.receive_stock(s, "PAR", [("A", 5)], at=T0))
    real_reserve = service.reserve
    lost = []

    async def another_replica_is_faster(session: AsyncSession, allocation: AllocatedLine, tier: CustomerTier) -> bool:
        if len(lost) < service.ALLOCATION_ROUNDS:
            lost.append(allocation)
            return False
        return await real_reserve(session, allocation, tier)

    monkeypatch.setattr(service, "reserve", another_replica_is_faster)
    unlucky = order("U", line(1, "A", 2))
    events = await run(sessions, lambda s: service.allocate_order(s, unlucky, at=T0))
    assert len(lost) == service.ALLOCATION_ROUNDS
    # Backordered after the lost races, then served at once from the free stock.
    assert summary(events) == [
        ("order.backordered", "U", [(1, "A", 2)]),
        ("order.allocated", "U", ([(1, "A", 2)], True, False)),
    ]
    assert await level(sessions) == (5, 2, 0, 0)
    assert await run(sessions, lambda s: service.backorder_queue(s, None, today=T0.date())) == []


async def test_a_release_that_loses_its_race_leaves_the_waiting_order_whole(
    sessions: db.SessionFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    waiting = order("W", line(1, "A", 2), line(2, "B", 2), allow_partial=False)
    await run(sessions, lambda s: service.allocate_order(s, waiting, at=T0))
    real_reserve = service.reserve
    refused: list[AllocatedLine] = []

    async def another_replica_took_the_b_units(
        session: AsyncSession, allocation: AllocatedLine, tier: CustomerTier
    ) -> bool:
        if allocation.sku == "B":
            refused.append(allocation)
            return False
        return await real_reserve(session, allocation, tier)

    monkeypatch.setattr(service, "reserve", another_replica_took_the_b_units)
    # Both SKUs arrive; every release of W counts units off its lines and reserves A, then loses B.
    served = await run(sessions, lambda s: service.receive_stock(s, "PAR", [("A", 2), ("B", 2)], at=T0))
    assert len(refused) == service.SERVE_ROUNDS
    assert (served.orders, served.events) == ([], [])
    # All or nothing: nothing reserved, and W still waits for every unit it ordered.
    assert await level(sessions, "A") == (2, 0, 0, 0)
    assert await level(sessions, "B") == (2, 0, 0, 0)
    queue = await run(sessions, lambda s: service.backorder_queue(s, None, today=T0.date()))
    assert [(b.order_id, b.line_no, b.qty) for b in queue] == [("W", 1, 2), ("W", 2, 2)]
    # Once the race is not lost, W gets it all and is announced once, complete.
    monkeypatch.setattr(service, "reserve", real_reserve)
    served = await run(sessions, lambda s: service.receive_stock(s, "PAR", [("B", 1)], at=T0))
    assert summary(served.events) == [("order.allocated", "W", ([(1, "A", 2), (2, "B", 2)], True, False))]
    assert await level(sessions, "A") == (2, 2, 0, 0)
    assert await level(sessions, "B") == (3, 2, 0, 0)


async def test_an_allocation_names_the_handling_time_of_each_warehouse_it_takes_from(
    sessions: db.SessionFactory,
) -> None:
    lyon = WarehouseIn(name="Lyon", country="FR", handling_hours=48, priority=2)
    await run(sessions, lambda s: service.put_warehouse(s, "LYO", lyon))
    await run(sessions, lambda s: service.receive_stock(s, "PAR", [("A", 2)], at=T0))
    await run(sessions, lambda s: service.receive_stock(s, "LYO", [("A", 1)], at=T0))
    split = order("S", line(1, "A", 3), line(2, "B", 1))
    allocated, _ = await run(sessions, lambda s: service.allocate_order(s, split, at=T0))
    assert isinstance(allocated, OrderAllocated)
    assert allocated.handling_hours == {"PAR": 24, "LYO": 48}

    # The warehouse's handling time changes; the release of the waiting line carries the new one.
    faster = WarehouseIn(name="Paris", country="FR", handling_hours=6, priority=1)
    await run(sessions, lambda s: service.put_warehouse(s, "PAR", faster))
    served = await run(sessions, lambda s: service.receive_stock(s, "PAR", [("B", 1)], at=T0))
    (released,) = served.events
    assert isinstance(released, OrderAllocated)
    assert (released.allocations[0].warehouse_id, released.handling_hours) == ("PAR", {"PAR": 6})


async def test_a_cancellation_applied_before_its_order_in_one_batch_leaves_nothing_allocated(
    sessions: db.SessionFactory,
) -> None:
    await run(sessions, lambda s: service.receive_stock(s, "PAR", [("A", 5)], at=T0))
    late = order("L", line(1, "A", 2))
    cancel = OrderCancelled(order_id="L", occurred_at=T0, reason="changed their mind")

    async def one_batch(session: AsyncSession) -> list[OrderEvent]:
        # A redriven order.received behind its cancellation, in the same consumer transaction.
        return [
            *await service.cancel_order(session, cancel, at=T0),
            *await service.allocate_order(session, late, at=T0),
            *await service.cancel_order(session, cancel, at=T0),
        ]

    assert await run(sessions, one_batch) == []
    assert await level(sessions) == (5, 0, 0, 0)
    assert await run(sessions, lambda s: service.backorder_queue(s, None, today=T0.date())) == []


async def test_units_core_orders_took_from_the_reserve_are_no_longer_protected(sessions: db.SessionFactory) -> None:
    await run(sessions, lambda s: service.set_stock(s, "PAR", "A", StockIn(on_hand=10, protected_for_core=2), at=T0))
    core = order("C", line(1, "A", 2), tier=CORE)
    await run(sessions, lambda s: service.allocate_order(s, core, at=T0))
    assert await level(sessions) == (10, 2, 2, 2)
    # The reserve is used up by the core order: standard customers may take the other 8.
    standard = order("S", line(1, "A", 8), minutes=1)
    events = await run(sessions, lambda s: service.allocate_order(s, standard, at=T0))
    assert summary(events) == [("order.allocated", "S", ([(1, "A", 8)], True, True))]
    # The core order is cancelled: its 2 units are protected again, for core customers only.
    cancelled = OrderCancelled(order_id="C", occurred_at=T0, reason="test")
    await run(sessions, lambda s: service.cancel_order(s, cancelled, at=T0))
    assert await level(sessions) == (10, 8, 2, 0)
    late = order("L", line(1, "A", 1), minutes=2)
    assert summary(await run(sessions, lambda s: service.allocate_order(s, late, at=T0))) == [
        ("order.backordered", "L", [(1, "A", 1)])
    ]
    # A core order takes one of them; it ships: on hand and both counters drop.
    core2 = order("C2", line(1, "A", 1), tier=CORE, minutes=3)
    await run(sessions, lambda s: service.allocate_order(s, core2, at=T0))
    shipped = OrderShipped(
        order_id="C2",
        occurred_at=T0,
        shipment_id="s1",
        warehouse_id="PAR",
        carrier="DHL",
        tracking_number="T1",
        lines=(LineQuantity(line_no=1, sku="A", qty=1),),
        ship_by=T0,
        promised_delivery_at=T0,
    )
    await run(sessions, lambda s: service.record_shipment(s, shipped))
    assert await level(sessions) == (9, 8, 2, 0)


async def test_the_conditional_update_itself_keeps_the_reserve(sessions: db.SessionFactory) -> None:
    await run(sessions, lambda s: service.set_stock(s, "PAR", "A", StockIn(on_hand=10, protected_for_core=2), at=T0))

    def take(qty: int, tier: CustomerTier) -> Callable[[AsyncSession], Awaitable[bool]]:
        allocation = AllocatedLine(line_no=1, sku="A", qty=qty, warehouse_id="PAR")
        return lambda s: service.reserve(s, allocation, tier)

    assert not await run(sessions, take(9, STANDARD))
    assert await run(sessions, take(2, CORE))
    assert await run(sessions, take(8, STANDARD))  # the core order used up the reserve
    assert not await run(sessions, take(1, CORE))
    assert await level(sessions) == (10, 10, 2, 2)


async def test_an_allocation_never_happens_before_the_order_was_received(sessions: db.SessionFactory) -> None:
    received = order("O", line(1, "A", 2), minutes=60)
    await run(sessions, lambda s: service.allocate_order(s, received, at=received.occurred_at))
    # A receipt dated an hour before the order reached us.
    served = await run(sessions, lambda s: service.receive_stock(s, "PAR", [("A", 2)], at=T0))
    (event,) = served.events
    assert event.occurred_at == received.occurred_at
