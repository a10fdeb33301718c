"""For any sequence of receipts, orders, cancellations and shipments run through the real
use cases on a real (SQLite) database: stock is conserved, no order is given more than it
asked for, the core counters match the core orders' reservations, and no order waits for
a SKU while units of it sit free to it."""

from __future__ import annotations

import asyncio
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fulfil import db
from fulfil.events import CustomerTier, LineQuantity, OrderAllocated, OrderCancelled, OrderEvent, OrderShipped
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inventory import service
from inventory.models import Backorder, InventoryTable, Reservation, WarehouseIn
from inventory_builders import line, order
from inventory_ledger import tally
from sqlmodel import select

AT = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
SKUS = ["A", "B", "C"]
WAREHOUSES = {"W1": 1, "W2": 2}


@dataclass(frozen=True)
class Receive:
    warehouse_id: str
    sku: str
    qty: int


@dataclass(frozen=True)
class Place:
    lines: tuple[tuple[str, int, tuple[str, ...]], ...]
    tier: CustomerTier
    allow_partial: bool


@dataclass(frozen=True)
class Cancel:
    index: int


@dataclass(frozen=True)
class Ship:
    index: int


receives = st.builds(Receive, st.sampled_from(list(WAREHOUSES)), st.sampled_from(SKUS), st.integers(1, 6))
places = st.builds(
    Place,
    st.lists(
        st.tuples(st.sampled_from(SKUS), st.integers(1, 5), st.lists(st.sampled_from(SKUS), max_size=1).map(tuple)),
        min_size=1,
        max_size=3,
    ).map(tuple),
    st.sampled_from(list(CustomerTier)),
    st.booleans(),
)
steps = st.lists(
    st.one_of(receives, places, st.builds(Cancel, st.integers(0, 9)), st.builds(Ship, st.integers(0, 9))),
    min_size=1,
    max_size=14,
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_stock_is_conserved_and_no_order_gets_more_than_it_asked(script: list[object]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(_run(f"sqlite+aiosqlite:///{Path(directory)}/ledger.db", script))


async def _run(url: str, script: list[object]) -> None:
    engine = db.create_engine(url)
    try:
        await db.create_tables(engine, [InventoryTable.metadata])
        sessions = db.session_factory(engine)
        for warehouse_id, priority in WAREHOUSES.items():
            async with sessions() as session, session.begin():
                body = WarehouseIn(name=warehouse_id, country="FR", handling_hours=24, priority=priority)
                await service.put_warehouse(session, warehouse_id, body)
        received: Counter[tuple[str, str]] = Counter()
        shipped: Counter[tuple[str, str]] = Counter()
        shipped_lines: Counter[tuple[str, int]] = Counter()
        asked: dict[str, dict[int, int]] = {}
        announced: Counter[str] = Counter()
        complete_announcements: dict[str, int] = {}
        cancelled: set[str] = set()
        orders: list[str] = []
        tiers: dict[str, CustomerTier] = {}
        for step in script:
            events: list[OrderEvent] = []
            async with sessions() as session, session.begin():
                if isinstance(step, Receive):
                    served = await service.receive_stock(session, step.warehouse_id, [(step.sku, step.qty)], at=AT)
                    events = served.events
                    received[(step.warehouse_id, step.sku)] += step.qty
                elif isinstance(step, Place):
                    order_id = f"o{len(orders)}"
                    orders.append(order_id)
                    lines = [line(n, sku, qty, *subs) for n, (sku, qty, subs) in enumerate(step.lines, start=1)]
                    asked[order_id] = {ln.line_no: ln.qty for ln in lines}
                    tiers[order_id] = step.tier
                    received_event = order(
                        order_id, *lines, tier=step.tier, allow_partial=step.allow_partial, minutes=len(orders)
                    )
                    events = await service.allocate_order(session, received_event, at=AT)
                elif isinstance(step, Cancel) and orders:
                    order_id = orders[step.index % len(orders)]
                    cancelled.add(order_id)
                    events = await service.cancel_order(
                        session, OrderCancelled(order_id=order_id, occurred_at=AT, reason="test"), at=AT
                    )
                elif isinstance(step, Ship) and orders:
                    order_id = orders[step.index % len(orders)]
                    for shipment in await _shipments_of(session, order_id):
                        await service.record_shipment(session, shipment)
                        for ln in shipment.lines:
                            shipped[(shipment.warehouse_id, ln.sku)] += ln.qty
                            shipped_lines[(order_id, ln.line_no)] += ln.qty
            for event in events:
                if isinstance(event, OrderAllocated):
                    assert event.order_id not in cancelled
                    if event.complete:
                        complete_announcements[event.order_id] = complete_announcements.get(event.order_id, 0) + 1
                    announced[event.order_id] += sum(a.qty for a in event.allocations)
            await _check(sessions, received, shipped, shipped_lines, asked, cancelled, tiers)
        # Ship-complete orders are announced once with everything; partial ones add up to at most the order.
        for order_id, units in announced.items():
            assert units <= sum(asked[order_id].values())
            assert complete_announcements.get(order_id, 0) <= 1
    finally:
        await engine.dispose()


async def _shipments_of(session: object, order_id: str) -> list[OrderShipped]:
    from sqlmodel.ext.asyncio.session import AsyncSession

    assert isinstance(session, AsyncSession)
    rows = (await session.exec(select(Reservation).where(Reservation.order_id == order_id))).all()
    by_warehouse: dict[str, list[LineQuantity]] = {}
    for r in rows:
        by_warehouse.setdefault(r.warehouse_id, []).append(LineQuantity(line_no=r.line_no, sku=r.sku, qty=r.qty))
    return [
        OrderShipped(
            order_id=order_id,
            occurred_at=AT,
            shipment_id=f"s-{order_id}-{warehouse_id}",
            warehouse_id=warehouse_id,
            carrier="DHL",
            tracking_number="T",
            lines=tuple(lines),
            ship_by=AT,
            promised_delivery_at=AT,
        )
        for warehouse_id, lines in by_warehouse.items()
    ]


async def _check(
    sessions: db.SessionFactory,
    received: Counter[tuple[str, str]],
    shipped: Counter[tuple[str, str]],
    shipped_lines: Counter[tuple[str, int]],
    asked: dict[str, dict[int, int]],
    cancelled: set[str],
    tiers: dict[str, CustomerTier],
) -> None:
    async with sessions() as session:
        stock = {level.key: level for level in await service.load_stock(session)}
        reservations = (await session.exec(select(Reservation))).all()
        backorders = (await session.exec(select(Backorder))).all()
    reserved_by_key, core_by_key, held_by_line, waiting_by_line = tally(reservations, backorders, tiers)
    for key in set(stock) | set(received):
        level = stock[key]
        # Every unit that came in is on hand or has left in a shipment.
        assert level.on_hand == received[key] - shipped[key]
        assert 0 <= level.reserved <= level.on_hand
        assert level.reserved == reserved_by_key[key]
        assert level.reserved_for_core == core_by_key[key]
    for b in backorders:
        # Served before anyone else could take them: nothing it may take sits free while it waits.
        free = [level.available_to(tiers[b.order_id]) for level in stock.values() if level.sku == b.sku]
        assert sum(free) == 0, (b, [level for level in stock.values() if level.sku == b.sku])
    for order_id, lines in asked.items():
        for line_no, qty in lines.items():
            held, waiting = held_by_line[(order_id, line_no)], waiting_by_line[(order_id, line_no)]
            if order_id in cancelled:
                assert (held, waiting) == (0, 0)
            else:
                # Every unit asked for is held, gone in a shipment, or waiting; never more.
                assert held + waiting + shipped_lines[(order_id, line_no)] == qty
