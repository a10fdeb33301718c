"""The stream the concurrency tests replay and the ledger it must leave: many orders for a
few SKUs across two warehouses, some cancelled, restocks mid-stream; afterwards every unit is
either reserved or waiting, exactly as ordered, and no stock row is over-reserved."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

from fulfil import db
from fulfil.events import CustomerTier, OrderCancelled, OrderEvent, OrderReceived
from fulfil.outbox import OutboxRow
from inventory import service
from inventory.models import Backorder, Reservation, StockIn, WarehouseIn
from inventory_builders import T0, line, order
from sqlalchemy import func
from sqlmodel import col, select

SKUS = ["A", "B", "C"]
WAREHOUSES = {"W1": 1, "W2": 2}
SEEDED = 30
ORDERS = 180
RECEIPTS = [("W1", "A", 7), ("W2", "B", 9), ("W1", "C", 5), ("W2", "A", 6)]


def workload(seed: int) -> tuple[list[OrderEvent], dict[str, dict[int, int]], set[str]]:
    rng = random.Random(seed)
    events: list[OrderEvent] = []
    asked: dict[str, dict[int, int]] = {}
    cancelled: set[str] = set()
    for i in range(ORDERS):
        order_id = f"o{i:04d}"
        lines = [
            line(n, sku, rng.randint(1, 4), *([rng.choice(SKUS)] if rng.random() < 0.3 else []))
            for n, sku in enumerate(rng.sample(SKUS, rng.randint(1, 2)), start=1)
        ]
        received: OrderReceived = order(
            order_id,
            *lines,
            tier=CustomerTier.CORE if rng.random() < 0.25 else CustomerTier.STANDARD,
            allow_partial=rng.random() < 0.6,
            minutes=i,
        )
        events.append(received)
        asked[order_id] = {ln.line_no: ln.qty for ln in lines}
        if rng.random() < 0.2:
            cancelled.add(order_id)
            events.append(OrderCancelled(order_id=order_id, occurred_at=received.occurred_at, reason="test"))
    return events, asked, cancelled


async def seed_stock(sessions: db.SessionFactory) -> None:
    """Both warehouses, SEEDED units of every SKU, 5 of them kept for core customers."""
    for warehouse_id, priority in WAREHOUSES.items():
        async with sessions() as session, session.begin():
            body = WarehouseIn(name=warehouse_id, country="FR", handling_hours=24, priority=priority)
            await service.put_warehouse(session, warehouse_id, body)
        for sku in SKUS:
            async with sessions() as session, session.begin():
                count = StockIn(on_hand=SEEDED, protected_for_core=5)
                await service.set_stock(session, warehouse_id, sku, count, at=T0)


def tiers_of(events: list[OrderEvent]) -> dict[str, CustomerTier]:
    return {e.order_id: e.customer.tier for e in events if isinstance(e, OrderReceived)}


class Tally(NamedTuple):
    """Units reserved per stock row (all, and for core customers), held and waiting per line."""

    reserved_by_key: Counter[tuple[str, str]]
    core_by_key: Counter[tuple[str, str]]
    held_by_line: Counter[tuple[str, int]]
    waiting_by_line: Counter[tuple[str, int]]


def tally(
    reservations: Iterable[Reservation], backorders: Iterable[Backorder], tiers: dict[str, CustomerTier]
) -> Tally:
    counted = Tally(Counter(), Counter(), Counter(), Counter())
    for r in reservations:
        counted.reserved_by_key[(r.warehouse_id, r.sku)] += r.qty
        if tiers[r.order_id] is CustomerTier.CORE:
            counted.core_by_key[(r.warehouse_id, r.sku)] += r.qty
        counted.held_by_line[(r.order_id, r.line_no)] += r.qty
    for b in backorders:
        counted.waiting_by_line[(b.order_id, b.line_no)] += b.qty
    return counted


async def check_ledger(
    sessions: db.SessionFactory,
    asked: dict[str, dict[int, int]],
    cancelled: set[str],
    tiers: dict[str, CustomerTier],
) -> None:
    received = Counter[tuple[str, str]]({(w, s): SEEDED for w in WAREHOUSES for s in SKUS})
    for warehouse_id, sku, qty in RECEIPTS:
        received[(warehouse_id, sku)] += qty
    async with sessions() as session:
        stock = await service.load_stock(session)
        reservations = (await session.exec(select(Reservation))).all()
        backorders = (await session.exec(select(Backorder))).all()
        dead = (
            await session.exec(select(func.count()).select_from(OutboxRow).where(col(OutboxRow.topic).like("%.dlq")))
        ).one()
    assert dead == 0
    reserved_by_key, core_by_key, held_by_line, waiting_by_line = tally(reservations, backorders, tiers)
    assert {level.key for level in stock} == set(received)
    for level in stock:
        assert level.on_hand == received[level.key]
        assert 0 <= level.reserved <= level.on_hand, level
        assert level.reserved == reserved_by_key[level.key], level
        assert level.reserved_for_core == core_by_key[level.key], level
    for order_id, lines in asked.items():
        for line_no, qty in lines.items():
            held, waiting = held_by_line[(order_id, line_no)], waiting_by_line[(order_id, line_no)]
            if order_id in cancelled:
                assert (held, waiting) == (0, 0), order_id
            else:
                assert held + waiting == qty, (order_id, line_no, held, waiting, qty)
    # The stream asks for far more than there is: the contention was real.
    assert sum(waiting_by_line.values()) > 0
    assert sum(level.reserved for level in stock) > 0
