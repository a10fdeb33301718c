"""Use cases: load state, ask domain.py, write state. Every change to a stock counter is a
conditional UPDATE checked by its row count, so replicas can never over-allocate; nothing
here reads a counter into Python, changes it and writes it back. Nothing here commits:
the consumer loop (handlers) or the route (operator use cases) owns the transaction.

Lock order: an order row, then its waiting lines, then stock rows sorted by (warehouse, sku).
A receipt or a count changes its stock rows before it serves the queue, and a consumer
batch applies many orders in one transaction, so PostgreSQL can still detect a deadlock
now and then: the consumer retries the batch, the routes retry the use case.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, cast

from fulfil.events import (
    AllocatedLine,
    CustomerTier,
    LineQuantity,
    OrderAllocated,
    OrderCancelled,
    OrderEvent,
    OrderReceived,
    OrderShipped,
)
from fulfil.problems import Conflict, NotFound
from sqlalchemy import ColumnElement, Table, bindparam, case, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult, RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel.ext.asyncio.session import AsyncSession

from inventory import domain
from inventory.models import (
    MAX_UNITS_PER_STOCK_ROW,
    BackorderOut,
    InboundIn,
    InboundOut,
    InventoryTable,
    StockIn,
    StockOut,
    WarehouseIn,
    WarehouseOut,
    WarehouseRow,
    as_utc,
)

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

STOCK: Table = InventoryTable.metadata.tables["stock"]
BACKORDERS: Table = InventoryTable.metadata.tables["backorders"]
BACKORDER_SKUS: Table = InventoryTable.metadata.tables["backorder_skus"]
ORDERS: Table = InventoryTable.metadata.tables["orders"]
INBOUND: Table = InventoryTable.metadata.tables["inbound"]
WAREHOUSES: Table = InventoryTable.metadata.tables["warehouses"]
RESERVATIONS: Table = InventoryTable.metadata.tables["reservations"]
ALLOCATION_ROUNDS = 5
"""Re-plans after losing a reservation race before the rest is backordered (and the queue served)."""
SERVE_ROUNDS = 3
"""Passes over the queue while a release loses a race to another replica."""
_WAREHOUSES_CACHE = "inventory.warehouses"
_CONNECTION = "inventory.connection"


class InventoryInconsistent(RuntimeError):
    """A counter refused a change the reservations say must fit (a bug, not a race)."""


async def _connection(session: AsyncSession) -> AsyncConnection:
    """The connection of the session's transaction (fetched once per transaction).

    Inventory's own tables are written with Core statements only, so nothing pending in the
    session concerns them: no flush here (pending outbox rows go in one batch at commit)."""
    cached: tuple[object, AsyncConnection] | None = session.info.get(_CONNECTION)
    transaction = session.sync_session.get_transaction()
    if cached is not None and transaction is not None and cached[0] is transaction:
        return cached[1]
    connection = await session.connection()
    session.info[_CONNECTION] = (session.sync_session.get_transaction(), connection)
    return connection


async def _run(session: AsyncSession, statement: Any) -> int:
    result = cast(CursorResult[Any], await (await _connection(session)).execute(statement))
    return result.rowcount


async def _run_scalar(session: AsyncSession, statement: Any) -> int:
    value = (await (await _connection(session)).execute(statement)).scalar_one()
    return int(value)


def _insert(connection: AsyncConnection) -> Callable[[Table], Any]:
    return postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert  # type: ignore[return-value]


# -- reading -------------------------------------------------------------------------


def _level(row: RowMapping) -> domain.StockLevel:
    return domain.StockLevel(
        row["warehouse_id"],
        row["sku"],
        row["on_hand"],
        row["reserved"],
        row["protected_for_core"],
        row["reserved_for_core"],
    )


async def load_stock(session: AsyncSession, skus: Iterable[str] | None = None) -> list[domain.StockLevel]:
    query = select(STOCK)
    if skus is not None:
        query = query.where(STOCK.c.sku.in_(sorted(set(skus))))
    rows = (await (await _connection(session)).execute(query)).mappings()
    return [_level(r) for r in rows]


def _waited_for_by(tier: CustomerTier) -> Any:
    waiting = select(BACKORDER_SKUS.c.sku).where(BACKORDER_SKUS.c.sku == STOCK.c.sku, BACKORDER_SKUS.c.tier == tier)
    return waiting.exists().label(f"waited_for_by_{tier.value}")


_STOCK_OF_SKUS = select(STOCK, _waited_for_by(CustomerTier.CORE), _waited_for_by(CustomerTier.STANDARD)).where(
    STOCK.c.sku.in_(bindparam("skus", expanding=True))
)


async def load_stock_and_waiters(
    session: AsyncSession, skus: Iterable[str]
) -> tuple[list[domain.StockLevel], set[tuple[str, CustomerTier]]]:
    """Stock of these SKUs, and which of them waiting lines of which tier may take (one query)."""
    rows = (await (await _connection(session)).execute(_STOCK_OF_SKUS, {"skus": sorted(set(skus))})).mappings()
    levels: list[domain.StockLevel] = []
    waited_for: set[tuple[str, CustomerTier]] = set()
    for row in rows:
        levels.append(_level(row))
        for tier in CustomerTier:
            if row[f"waited_for_by_{tier.value}"]:
                waited_for.add((row["sku"], tier))
    return levels, waited_for


async def load_warehouses(session: AsyncSession) -> list[domain.Warehouse]:
    """Warehouses and their priorities, read once per session (one consumer batch, one request)."""
    cached: list[domain.Warehouse] | None = session.info.get(_WAREHOUSES_CACHE)
    if cached is None:
        columns = select(WAREHOUSES.c.warehouse_id, WAREHOUSES.c.priority, WAREHOUSES.c.handling_hours)
        rows = await (await _connection(session)).execute(columns)
        cached = [domain.Warehouse(warehouse_id, priority, hours) for warehouse_id, priority, hours in rows]
        session.info[_WAREHOUSES_CACHE] = cached
    return cached


async def load_inbound(session: AsyncSession, skus: Iterable[str]) -> list[domain.Inbound]:
    query = select(INBOUND).where(INBOUND.c.sku.in_(sorted(set(skus))), INBOUND.c.qty > 0)
    rows = (await (await _connection(session)).execute(query)).mappings()
    return [domain.Inbound(r["warehouse_id"], r["sku"], r["qty"], r["eta"]) for r in rows]


# -- the counters: conditional updates only --------------------------------------------


def _is_core(tier: CustomerTier) -> bool:
    return tier is CustomerTier.CORE


_LEFT_AFTER = STOCK.c.on_hand - STOCK.c.reserved - bindparam("qty")
_THIS_ROW = (STOCK.c.warehouse_id == bindparam("warehouse"), STOCK.c.sku == bindparam("item"))
_RESERVE_FOR_CORE = (
    update(STOCK)
    .where(*_THIS_ROW, _LEFT_AFTER >= 0)
    .values(
        reserved=STOCK.c.reserved + bindparam("qty"), reserved_for_core=STOCK.c.reserved_for_core + bindparam("qty")
    )
)
# A standard order leaves the part of the core reserve core orders have not taken yet.
_RESERVE_FOR_STANDARD = (
    update(STOCK)
    .where(*_THIS_ROW, _LEFT_AFTER >= 0, STOCK.c.protected_for_core - STOCK.c.reserved_for_core <= _LEFT_AFTER)
    .values(reserved=STOCK.c.reserved + bindparam("qty"))
)


async def reserve(session: AsyncSession, allocation: AllocatedLine, tier: CustomerTier) -> bool:
    """Reserve units if they are free for this customer at this instant; False if not."""
    statement = _RESERVE_FOR_CORE if _is_core(tier) else _RESERVE_FOR_STANDARD
    params = {"warehouse": allocation.warehouse_id, "item": allocation.sku, "qty": allocation.qty}
    result = cast(CursorResult[Any], await (await _connection(session)).execute(statement, params))
    return result.rowcount == 1


def _release_values(qty: int, tier: CustomerTier) -> tuple[list[ColumnElement[bool]], dict[str, Any]]:
    conditions: list[ColumnElement[bool]] = [STOCK.c.reserved >= qty]
    values: dict[str, Any] = {"reserved": STOCK.c.reserved - qty}
    if _is_core(tier):
        conditions.append(STOCK.c.reserved_for_core >= qty)
        values["reserved_for_core"] = STOCK.c.reserved_for_core - qty
    return conditions, values


async def unreserve(session: AsyncSession, warehouse_id: str, sku: str, qty: int, tier: CustomerTier) -> None:
    conditions, values = _release_values(qty, tier)
    statement = (
        update(STOCK).where(STOCK.c.warehouse_id == warehouse_id, STOCK.c.sku == sku, *conditions).values(**values)
    )
    if await _run(session, statement) != 1:
        raise InventoryInconsistent(f"cannot release {qty} of {sku} at {warehouse_id}: fewer reserved")


async def ship_reserved(session: AsyncSession, warehouse_id: str, sku: str, qty: int, tier: CustomerTier) -> None:
    """Reserved units leave the building: on_hand and reserved both drop."""
    conditions, values = _release_values(qty, tier)
    statement = (
        update(STOCK)
        .where(STOCK.c.warehouse_id == warehouse_id, STOCK.c.sku == sku, *conditions)
        .values(on_hand=STOCK.c.on_hand - qty, **values)
    )
    if await _run(session, statement) != 1:
        raise InventoryInconsistent(f"cannot ship {qty} of {sku} at {warehouse_id}: fewer reserved")


async def add_on_hand(session: AsyncSession, warehouse_id: str, sku: str, qty: int) -> bool:
    """A restock: insert the stock row or add to it, atomically; False (and nothing
    changed) when on_hand would pass MAX_UNITS_PER_STOCK_ROW."""
    if qty > MAX_UNITS_PER_STOCK_ROW:
        return False
    connection = await _connection(session)
    statement = _insert(connection)(STOCK).values(
        warehouse_id=warehouse_id, sku=sku, on_hand=qty, reserved=0, protected_for_core=0, reserved_for_core=0
    )
    upsert = statement.on_conflict_do_update(
        index_elements=[STOCK.c.warehouse_id, STOCK.c.sku],
        set_={"on_hand": STOCK.c.on_hand + qty},
        where=STOCK.c.on_hand + qty <= MAX_UNITS_PER_STOCK_ROW,
    )
    return await _run(session, upsert) == 1


async def _reserve_all(session: AsyncSession, allocations: Iterable[AllocatedLine], tier: CustomerTier) -> list[bool]:
    # One lock order for every transaction, so two replicas do not deadlock on the same rows.
    ordered = sorted(allocations, key=lambda a: (a.warehouse_id, a.sku))
    return [await reserve(session, a, tier) for a in ordered]


async def _record_reservations(session: AsyncSession, order_id: str, allocations: Iterable[AllocatedLine]) -> None:
    rows = [
        {
            "order_id": order_id,
            "line_no": a.line_no,
            "sku": a.sku,
            "warehouse_id": a.warehouse_id,
            "qty": a.qty,
            "substitute_for": a.substitute_for,
        }
        for a in allocations
    ]
    if rows:
        await (await _connection(session)).execute(insert(RESERVATIONS), rows)


# -- order.received ----------------------------------------------------------------


_NEW_ORDER = {
    name: dialect_insert(ORDERS)
    .values(
        order_id=bindparam("order_id"),
        tier=bindparam("tier"),
        allow_partial=bindparam("allow_partial"),
        placed_at=bindparam("placed_at"),
        received_at=bindparam("received_at"),
        cancelled=bindparam("cancelled"),
    )
    .on_conflict_do_nothing(index_elements=[ORDERS.c.order_id])
    for name, dialect_insert in (("postgresql", postgresql.insert), ("sqlite", sqlite.insert))
}
"""Insert the order unless it is known, per dialect, built once."""


async def _insert_order(
    session: AsyncSession,
    order_id: str,
    *,
    tier: CustomerTier,
    allow_partial: bool,
    placed_at: datetime,
    received_at: datetime,
    cancelled: bool,
) -> bool:
    """Insert the order row unless the order is known; False when it was."""
    connection = await _connection(session)
    params = {
        "order_id": order_id,
        "tier": tier,
        "allow_partial": allow_partial,
        "placed_at": placed_at,
        "received_at": received_at,
        "cancelled": cancelled,
    }
    result = cast(CursorResult[Any], await connection.execute(_NEW_ORDER[connection.dialect.name], params))
    return result.rowcount == 1


async def _record_order(session: AsyncSession, order: OrderReceived) -> bool:
    """Remember the order; False when it is already known (re-emitted under a new ce_id,
    or cancelled before it reached us)."""
    return await _insert_order(
        session,
        order.order_id,
        tier=order.customer.tier,
        allow_partial=order.allow_partial,
        placed_at=order.placed_at,
        received_at=order.occurred_at,
        cancelled=False,
    )


async def allocate_order(session: AsyncSession, order: OrderReceived, *, at: datetime) -> list[OrderEvent]:
    """Reserve what the rules allow, backorder the rest, and say so. The order takes its
    place in the queue: waiting orders ahead of it (core first, then older) are served
    before it takes anything, so a new order never takes units an earlier one waits for."""
    if not await _record_order(session, order):
        return []
    tier = order.customer.tier
    demands = domain.demands_of(order)
    skus = order.skus()
    warehouses = await load_warehouses(session)
    stock, waited_for = await load_stock_and_waiters(session, skus)
    events: list[OrderEvent] = []
    # Waiting core orders are ahead of every new order; waiting standard ones only of standard orders.
    ahead_tiers = [CustomerTier.CORE] if tier is CustomerTier.CORE else list(CustomerTier)
    contested = {
        level.sku
        for level in stock
        for waiting_tier in ahead_tiers
        if (level.sku, waiting_tier) in waited_for and level.available_to(waiting_tier) > 0
    }
    if contested:
        # Free units that a waiting line may take: the orders ahead of this one get them first.
        ahead = await serve_backorders(session, contested, at=at, ahead_of=domain.queue_place(tier, order.placed_at))
        if ahead.orders:
            events.extend(ahead.events)
            stock = await load_stock(session, skus)
    reserved: list[AllocatedLine] = []
    wanted = demands
    lost_a_race = False
    for round_no in range(ALLOCATION_ROUNDS):
        if round_no:
            stock = await load_stock(session, skus)
        plan = domain.plan_allocation(wanted, tier, stock, warehouses)
        if not plan.allocations:
            break
        ordered = sorted(plan.allocations, key=lambda a: (a.warehouse_id, a.sku))
        won = await _reserve_all(session, ordered, tier)
        reserved.extend(a for a, ok in zip(ordered, won, strict=True) if ok)
        if all(won):
            break
        # Another replica took the units first: plan again what is still wanted, from fresh counts.
        lost_a_race = True
        wanted = domain.still_wanted(demands, reserved)
    final = domain.plan_of(demands, reserved)
    await _record_reservations(session, order.order_id, final.allocations)
    if not final.shortfalls:
        return [*events, *domain.events_on_receipt(order, final, [], at=at, warehouses=warehouses)]
    await _record_backorders(session, order, final.shortfalls)
    short_skus = {s.sku for s in final.shortfalls}
    inbound = await load_inbound(session, short_skus)
    waiting_ahead = await _units_waiting_ahead(session, order, short_skus)
    events.extend(domain.events_on_receipt(order, final, inbound, at=at, ahead=waiting_ahead, warehouses=warehouses))
    if lost_a_race:
        # Units may have come free while we raced (a cancellation on another replica could not see
        # this order waiting yet): serve the queue now rather than at the next restock.
        events.extend((await serve_backorders(session, skus, at=at)).events)
    return events


async def _record_backorders(session: AsyncSession, order: OrderReceived, shortfalls: Iterable[LineQuantity]) -> None:
    by_line = {line.line_no: line for line in order.lines}
    lines: list[dict[str, Any]] = []
    options: list[dict[str, Any]] = []
    for short in shortfalls:
        substitutes = list(by_line[short.line_no].substitutes)
        lines.append(
            {
                "order_id": order.order_id,
                "line_no": short.line_no,
                "sku": short.sku,
                "substitutes": substitutes,
                "qty": short.qty,
                "tier": order.customer.tier,
                "allow_partial": order.allow_partial,
                "placed_at": order.placed_at,
            }
        )
        options.extend(
            {"order_id": order.order_id, "line_no": short.line_no, "sku": sku, "tier": order.customer.tier}
            for sku in dict.fromkeys([short.sku, *substitutes])
        )
    connection = await _connection(session)
    await connection.execute(insert(BACKORDERS), lines)
    await connection.execute(insert(BACKORDER_SKUS), options)


async def _units_waiting_ahead(session: AsyncSession, order: OrderReceived, skus: set[str]) -> dict[str, int]:
    """Units of these SKUs that orders served before this one are already waiting for."""
    query = select(BACKORDERS.c.sku, BACKORDERS.c.qty, BACKORDERS.c.tier, BACKORDERS.c.placed_at).where(
        BACKORDERS.c.sku.in_(sorted(skus)), BACKORDERS.c.order_id != order.order_id
    )
    rows = await (await _connection(session)).execute(query)
    mine = domain.queue_place(order.customer.tier, order.placed_at)
    ahead: dict[str, int] = defaultdict(int)
    for sku, qty, tier, placed_at in rows:
        if domain.queue_place(CustomerTier(tier), as_utc(placed_at)) <= mine:
            ahead[sku] += qty
    return dict(ahead)


# -- the backorder queue -----------------------------------------------------------


@dataclass
class Served:
    """What serving the queue did: the events to publish and the orders that got units."""

    events: list[OrderEvent] = field(default_factory=list)
    orders: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class WaitingLine:
    """A backorder row: a line (or the rest of one) waiting for stock."""

    id: int
    order_id: str
    line_no: int
    sku: str
    substitutes: tuple[str, ...]
    qty: int
    tier: CustomerTier
    allow_partial: bool
    placed_at: datetime


async def _waiting_orders(session: AsyncSession, skus: set[str] | None) -> dict[str, list[WaitingLine]]:
    """Waiting orders with a line that one of these SKUs may fill (all of them for None),
    each with all its waiting lines."""
    query = select(BACKORDERS).order_by(BACKORDERS.c.id)
    if skus is not None:
        touching = select(BACKORDER_SKUS.c.order_id).where(BACKORDER_SKUS.c.sku.in_(sorted(skus)))
        query = query.where(BACKORDERS.c.order_id.in_(touching))
    rows = (await (await _connection(session)).execute(query)).mappings()
    by_order: dict[str, list[WaitingLine]] = defaultdict(list)
    for row in rows:
        by_order[row["order_id"]].append(
            WaitingLine(
                id=row["id"],
                order_id=row["order_id"],
                line_no=row["line_no"],
                sku=row["sku"],
                substitutes=tuple(row["substitutes"]),
                qty=row["qty"],
                tier=CustomerTier(row["tier"]),
                allow_partial=row["allow_partial"],
                placed_at=as_utc(row["placed_at"]),
            )
        )
    return dict(by_order)


def _as_waiting(order_id: str, lines: list[WaitingLine]) -> domain.WaitingOrder:
    first = lines[0]
    return domain.WaitingOrder(
        order_id=order_id,
        tier=first.tier,
        allow_partial=first.allow_partial,
        placed_at=first.placed_at,
        demands=tuple(domain.Demand(line.line_no, line.sku, line.qty, line.substitutes) for line in lines),
        sequence=min(line.id for line in lines),
    )


class _LostRace(Exception):
    pass


async def _claim_open_order(session: AsyncSession, order_id: str) -> datetime | None:
    """Lock the order row while it is still open and return when it was received: a
    concurrent cancellation waits for us, or we see that it won (None)."""
    query = (
        select(ORDERS.c.received_at)
        .where(ORDERS.c.order_id == order_id, ORDERS.c.cancelled.is_(False))
        .with_for_update()
    )
    received_at = (await (await _connection(session)).execute(query)).scalar_one_or_none()
    return None if received_at is None else as_utc(received_at)


async def _take_from_backorder(session: AsyncSession, backorder_id: int, qty: int) -> bool:
    """Count units off a waiting line unless someone else already did."""
    statement = (
        update(BACKORDERS)
        .where(BACKORDERS.c.id == backorder_id, BACKORDERS.c.qty >= qty)
        .values(qty=BACKORDERS.c.qty - qty)
    )
    return await _run(session, statement) == 1


async def serve_backorders(
    session: AsyncSession, skus: set[str] | None, *, at: datetime, ahead_of: domain.QueuePlace | None = None
) -> Served:
    """Give free stock to waiting orders strictly in queue order, core customers first, then
    the oldest (only those ahead of ``ahead_of`` when given). An allow-partial order is told
    each time (order.allocated, first_pass=false); a ship-complete order holds its units and
    is told once, when complete. A release that loses a race is planned again."""
    served = Served()
    warehouses = await load_warehouses(session)
    for _ in range(SERVE_ROUNDS):
        waiting = await _waiting_orders(session, skus)
        queue = [_as_waiting(order_id, lines) for order_id, lines in waiting.items()]
        if ahead_of is not None:
            queue = [w for w in queue if domain.queue_place(w.tier, w.placed_at) <= ahead_of]
        if not queue:
            break
        every_sku = {d.sku for w in queue for d in w.demands} | {
            s for w in queue for d in w.demands for s in d.substitutes
        }
        releases = domain.plan_releases(queue, await load_stock(session, every_sku), warehouses)
        by_id = {w.order_id: w for w in queue}
        lost = False
        for release in releases:
            try:
                event = await _release(session, by_id[release.order_id], waiting[release.order_id], release.plan, at)
            except _LostRace:
                lost = True  # another replica served or cancelled it first, or took the units
                continue
            if release.order_id not in served.orders:
                served.orders.append(release.order_id)
            if event is not None:
                served.events.append(event)
        if not lost:
            break
    return served


async def _release(
    session: AsyncSession, order: domain.WaitingOrder, lines: list[WaitingLine], plan: domain.Plan, at: datetime
) -> OrderAllocated | None:
    """Reserve a release for one waiting order, all or nothing; the event to publish, if any."""
    covered: dict[int, int] = defaultdict(int)
    for a in plan.allocations:
        covered[a.line_no] += a.qty
    # Order, then its waiting lines, then stock: one lock order, all or nothing per order.
    # The SAVEPOINT is the connection's own: the session's begin_nested() emits one only when
    # the session itself next asks for a connection, which the cached connection never does,
    # so a lost race would have kept the units it had already counted off the waiting line.
    connection = await _connection(session)
    async with connection.begin_nested():
        received_at = await _claim_open_order(session, order.order_id)
        if received_at is None:
            raise _LostRace
        for line in lines:
            qty = covered.get(line.line_no, 0)
            if qty and not await _take_from_backorder(session, line.id, qty):
                raise _LostRace
        if not all(await _reserve_all(session, plan.allocations, order.tier)):
            raise _LostRace
    done = (
        await connection.execute(
            delete(BACKORDERS)
            .where(BACKORDERS.c.order_id == order.order_id, BACKORDERS.c.qty <= 0)
            .returning(BACKORDERS.c.line_no)
        )
    ).scalars()
    done_lines = list(done)
    if done_lines:
        await _run(
            session,
            delete(BACKORDER_SKUS).where(
                BACKORDER_SKUS.c.order_id == order.order_id, BACKORDER_SKUS.c.line_no.in_(done_lines)
            ),
        )
    left = await _run_scalar(session, select(func.count()).where(BACKORDERS.c.order_id == order.order_id))
    await _record_reservations(session, order.order_id, plan.allocations)
    # Never before the order was received, even for a receipt dated earlier.
    occurred_at = max(at, received_at)
    if order.allow_partial:
        allocations = plan.allocations
    elif left:
        return None  # ship-complete: held, announced once everything is there
    else:
        allocations = domain.merge_allocations(await _reservations_as_allocations(session, order.order_id))
    return OrderAllocated(
        order_id=order.order_id,
        occurred_at=occurred_at,
        allocations=allocations,
        complete=left == 0,
        first_pass=False,
        handling_hours=domain.handling_of(allocations, await load_warehouses(session)),
    )


async def _reservations_as_allocations(session: AsyncSession, order_id: str) -> list[AllocatedLine]:
    query = select(RESERVATIONS).where(RESERVATIONS.c.order_id == order_id).order_by(RESERVATIONS.c.id)
    rows = (await (await _connection(session)).execute(query)).mappings()
    return [
        AllocatedLine(
            line_no=r["line_no"],
            sku=r["sku"],
            qty=r["qty"],
            warehouse_id=r["warehouse_id"],
            substitute_for=r["substitute_for"],
        )
        for r in rows
        if r["qty"] > 0
    ]


# -- order.cancelled / order.shipped -------------------------------------------------


async def cancel_order(session: AsyncSession, event: OrderCancelled, *, at: datetime) -> list[OrderEvent]:
    """Release the order's reservations, drop its backorders, and let the queue have the units."""
    # Close the order first: a replica serving it from the queue holds this row until it commits.
    closed = (
        await (await _connection(session)).execute(
            update(ORDERS)
            .where(ORDERS.c.order_id == event.order_id, ORDERS.c.cancelled.is_(False))
            .values(cancelled=True)
            .returning(ORDERS.c.tier)
        )
    ).first()
    if closed is None:
        # Unknown or already cancelled. Cancelled before we saw it: remember, so a late
        # order.received allocates nothing, even one later in this same transaction.
        await _insert_order(
            session,
            event.order_id,
            tier=CustomerTier.STANDARD,
            allow_partial=False,
            placed_at=event.occurred_at,
            received_at=event.occurred_at,
            cancelled=True,
        )
        return []
    tier = CustomerTier(closed.tier)
    query = select(RESERVATIONS.c.warehouse_id, RESERVATIONS.c.sku, RESERVATIONS.c.qty).where(
        RESERVATIONS.c.order_id == event.order_id
    )
    released = Counter[tuple[str, str]]()
    for warehouse_id, sku, qty in await (await _connection(session)).execute(query):
        released[(warehouse_id, sku)] += qty
    for (warehouse_id, sku), qty in sorted(released.items()):
        if qty > 0:
            await unreserve(session, warehouse_id, sku, qty, tier)
    await _run(session, delete(RESERVATIONS).where(RESERVATIONS.c.order_id == event.order_id))
    await _run(session, delete(BACKORDERS).where(BACKORDERS.c.order_id == event.order_id))
    await _run(session, delete(BACKORDER_SKUS).where(BACKORDER_SKUS.c.order_id == event.order_id))
    freed = {sku for (_, sku), qty in released.items() if qty > 0}
    if not freed:
        return []
    return (await serve_backorders(session, freed, at=at)).events


async def record_shipment(session: AsyncSession, event: OrderShipped) -> None:
    """Shipped units were reserved for this order at this warehouse; they leave stock now."""
    connection = await _connection(session)
    known = (await connection.execute(select(ORDERS.c.tier).where(ORDERS.c.order_id == event.order_id))).first()
    tier = CustomerTier(known.tier) if known is not None else CustomerTier.STANDARD
    for line in event.lines:
        query = (
            select(RESERVATIONS.c.id, RESERVATIONS.c.qty)
            .where(
                RESERVATIONS.c.order_id == event.order_id,
                RESERVATIONS.c.line_no == line.line_no,
                RESERVATIONS.c.sku == line.sku,
                RESERVATIONS.c.warehouse_id == event.warehouse_id,
            )
            .order_by(RESERVATIONS.c.id)
        )
        left = line.qty
        for reservation_id, held in (await connection.execute(query)).all():
            qty = min(left, held)
            if qty == 0:
                continue
            await ship_reserved(session, event.warehouse_id, line.sku, qty, tier)
            left -= qty
            this = RESERVATIONS.c.id == reservation_id
            if qty == held:
                await _run(session, delete(RESERVATIONS).where(this))
            else:
                await _run(session, update(RESERVATIONS).where(this).values(qty=RESERVATIONS.c.qty - qty))
        if left:
            log.warning(
                "order %s line %d: %d of %s shipped from %s without a reservation",
                event.order_id,
                line.line_no,
                left,
                line.sku,
                event.warehouse_id,
            )


# -- operator use cases (routes; the route commits) -------------------------------------


async def put_warehouse(session: AsyncSession, warehouse_id: str, body: WarehouseIn) -> WarehouseOut:
    """Create or replace a warehouse: one upsert, so two first PUTs at once both succeed."""
    connection = await _connection(session)
    values = body.model_dump()
    statement = _insert(connection)(WAREHOUSES).values(warehouse_id=warehouse_id, **values)
    await _run(session, statement.on_conflict_do_update(index_elements=[WAREHOUSES.c.warehouse_id], set_=values))
    session.info.pop(_WAREHOUSES_CACHE, None)
    return WarehouseOut(warehouse_id=warehouse_id, **values)


async def require_warehouse(session: AsyncSession, warehouse_id: str) -> None:
    if await session.get(WarehouseRow, warehouse_id) is None:
        raise NotFound(f"warehouse {warehouse_id!r} is not known; PUT /v1/warehouses/{warehouse_id} first")


async def set_stock(
    session: AsyncSession, warehouse_id: str, sku: str, body: StockIn, *, at: datetime
) -> tuple[StockOut, list[OrderEvent]]:
    """A stock count: set on_hand and the core reserve (one upsert); never below what is reserved."""
    await require_warehouse(session, warehouse_id)
    connection = await _connection(session)
    statement = _insert(connection)(STOCK).values(
        warehouse_id=warehouse_id,
        sku=sku,
        on_hand=body.on_hand,
        protected_for_core=body.protected_for_core,
        reserved=0,
        reserved_for_core=0,
    )
    changed = await _run(
        session,
        statement.on_conflict_do_update(
            index_elements=[STOCK.c.warehouse_id, STOCK.c.sku],
            set_={"on_hand": body.on_hand, "protected_for_core": body.protected_for_core},
            where=STOCK.c.reserved <= body.on_hand,
        ),
    )
    if changed == 0:
        level = await stock_level(session, warehouse_id, sku)
        reserved = level.reserved if level is not None else 0
        raise Conflict(
            f"{reserved} units of {sku} are reserved at {warehouse_id}; on_hand cannot go below that",
            reserved=reserved,
        )
    served = await serve_backorders(session, {sku}, at=at)
    level = await stock_level(session, warehouse_id, sku)
    assert level is not None
    return stock_out(level), served.events


async def stock_level(session: AsyncSession, warehouse_id: str, sku: str) -> domain.StockLevel | None:
    query = select(STOCK).where(STOCK.c.warehouse_id == warehouse_id, STOCK.c.sku == sku)
    row = (await (await _connection(session)).execute(query)).mappings().first()
    return None if row is None else _level(row)


def stock_out(level: domain.StockLevel) -> StockOut:
    return StockOut(
        warehouse_id=level.warehouse_id,
        sku=level.sku,
        on_hand=level.on_hand,
        reserved=level.reserved,
        available=level.available,
        available_to_standard=level.available_to(CustomerTier.STANDARD),
        protected_for_core=level.protected_for_core,
        reserved_for_core=level.reserved_for_core,
    )


async def list_stock(session: AsyncSession, sku: str | None, warehouse_id: str | None) -> list[StockOut]:
    query = select(STOCK).order_by(STOCK.c.sku, STOCK.c.warehouse_id)
    if sku is not None:
        query = query.where(STOCK.c.sku == sku)
    if warehouse_id is not None:
        query = query.where(STOCK.c.warehouse_id == warehouse_id)
    rows = (await (await _connection(session)).execute(query)).mappings()
    return [stock_out(_level(r)) for r in rows]


async def receive_stock(
    session: AsyncSession, warehouse_id: str, lines: Iterable[tuple[str, int]], *, at: datetime
) -> Served:
    """Units arrived: add them, count them off the expected inbound, serve the queue."""
    await require_warehouse(session, warehouse_id)
    units = Counter[str]()
    for sku, qty in lines:
        units[sku] += qty
    for sku, qty in sorted(units.items()):
        if not await add_on_hand(session, warehouse_id, sku, qty):
            raise Conflict(
                f"on_hand of {sku} at {warehouse_id} would exceed {MAX_UNITS_PER_STOCK_ROW:,} units; "
                "check the quantities of this receipt",
                limit=MAX_UNITS_PER_STOCK_ROW,
            )
        await _run(
            session,
            update(INBOUND)
            .where(INBOUND.c.warehouse_id == warehouse_id, INBOUND.c.sku == sku, INBOUND.c.qty > 0)
            .values(qty=case((INBOUND.c.qty > qty, INBOUND.c.qty - qty), else_=0)),
        )
    return await serve_backorders(session, set(units), at=at)


async def put_inbound(session: AsyncSession, warehouse_id: str, sku: str, body: InboundIn) -> InboundOut:
    """Expected purchase arrival (one upsert)."""
    await require_warehouse(session, warehouse_id)
    connection = await _connection(session)
    statement = _insert(connection)(INBOUND).values(warehouse_id=warehouse_id, sku=sku, qty=body.qty, eta=body.eta)
    await _run(
        session,
        statement.on_conflict_do_update(
            index_elements=[INBOUND.c.warehouse_id, INBOUND.c.sku], set_={"qty": body.qty, "eta": body.eta}
        ),
    )
    return InboundOut(warehouse_id=warehouse_id, sku=sku, qty=body.qty, eta=body.eta)


async def backorder_queue(session: AsyncSession, sku: str | None, *, today: date) -> list[BackorderOut]:
    """The queue in the order it will be served, each line with the date known inbound reaches it."""
    waiting = await _waiting_orders(session, None)
    queue = sorted((_as_waiting(order_id, lines) for order_id, lines in waiting.items()), key=domain.serving_key)
    in_order = [(order, line) for order in queue for line in waiting[order.order_id]]
    inbound = await load_inbound(session, {line.sku for _, line in in_order})
    dates = domain.queue_restock_dates(
        [LineQuantity(line_no=line.line_no, sku=line.sku, qty=line.qty) for _, line in in_order], inbound, today=today
    )
    out: list[BackorderOut] = []
    for (order, line), expected in zip(in_order, dates, strict=True):
        if sku is None or line.sku == sku:
            out.append(
                BackorderOut(
                    position=len(out) + 1,
                    order_id=order.order_id,
                    line_no=line.line_no,
                    sku=line.sku,
                    qty=line.qty,
                    substitutes=list(line.substitutes),
                    customer_tier=order.tier,
                    allow_partial=order.allow_partial,
                    placed_at=order.placed_at,
                    expected_restock_date=expected,
                )
            )
    return out
