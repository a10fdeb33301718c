"""The inventory HTTP API (/v1): warehouses, stock, receipts, inbound purchases, backorders."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Path, Query, Response, status
from fulfil.consumer import RETRY_SQLSTATES
from fulfil.outbox import stage_events
from fulfil.problems import PROBLEM_BASE, Conflict, Problem
from fulfil.service import Runtime, RuntimeDep, SessionDep
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlmodel.ext.asyncio.session import AsyncSession

from inventory import service
from inventory.models import (
    BackorderOut,
    InboundIn,
    InboundOut,
    Receipt,
    ReceiptIn,
    ReceiptLine,
    ReceiptOut,
    StockIn,
    StockOut,
    WarehouseIn,
    WarehouseOut,
    as_utc,
)
from inventory.service import Clock

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["inventory"])

Identifier = Annotated[str, Path(min_length=1, max_length=64)]
T = TypeVar("T")

WRITE_ATTEMPTS = 5
"""A write the database aborted for a deadlock or a serialization failure is run again this often."""
RETRY_AFTER_SECONDS = 1
RECEIPT_CLOCK_SKEW = timedelta(minutes=5)
"""A receipt may be dated this far ahead of our clock (the sender's clock runs fast), no further."""

BUSY: dict[int | str, dict[str, Any]] = {
    503: {
        "description": "the database kept aborting the change (deadlock, serialization failure, lock timeout); "
        "retry after Retry-After seconds"
    }
}


class StockBusy(Problem):
    status = 503
    title = "Service Unavailable"
    type = PROBLEM_BASE + "busy"


def clock_of(runtime: RuntimeDep) -> Clock:
    clock: Clock = runtime.extras["clock"]
    return clock


def _asks_for_retry(error: DBAPIError) -> bool:
    # A deadlock or serialization failure, or a pooled connection the database dropped.
    return error.connection_invalidated or getattr(error.orig, "sqlstate", None) in RETRY_SQLSTATES


def _lock_timeout(error: DBAPIError) -> bool:
    # SQLite gave up waiting for the write lock (busy timeout): retrying at once would wait as long again.
    return isinstance(error, OperationalError) and "database is locked" in str(error.orig)


async def write(runtime: Runtime, use_case: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run a write use case in a transaction of its own and commit it. PostgreSQL aborts one
    transaction of a deadlock (40P01) or a serialization conflict (40001): the whole use case
    runs again from fresh reads, a few times, then the client is told to retry (503)."""
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        async with runtime.sessions() as session:
            try:
                result = await use_case(session)
                await session.commit()
                return result
            except DBAPIError as exc:
                await session.rollback()
                if _lock_timeout(exc):
                    break
                if not _asks_for_retry(exc):
                    raise
                log.warning("write aborted by the database (attempt %d of %d): %s", attempt, WRITE_ATTEMPTS, exc.orig)
        if attempt < WRITE_ATTEMPTS:
            await asyncio.sleep(random.uniform(0.01, 0.05 * 2**attempt))
    raise StockBusy(
        "the stock rows are busy (concurrent changes kept conflicting); nothing was changed, please retry",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


@router.put("/warehouses/{warehouse_id}", responses=BUSY)
async def put_warehouse(warehouse_id: Identifier, body: WarehouseIn, runtime: RuntimeDep) -> WarehouseOut:
    """Create or replace a warehouse."""
    return await write(runtime, lambda session: service.put_warehouse(session, warehouse_id, body))


@router.put("/stock/{warehouse_id}/{sku}", responses={409: {"description": "below what is reserved"}, **BUSY})
async def put_stock(warehouse_id: Identifier, sku: Identifier, body: StockIn, runtime: RuntimeDep) -> StockOut:
    """Set on_hand and the core-only reserve after a count; waiting backorders are served."""

    async def count(session: AsyncSession) -> StockOut:
        level, events = await service.set_stock(session, warehouse_id, sku, body, at=clock_of(runtime)())
        stage_events(session, runtime.settings, events)
        return level

    return await write(runtime, count)


@router.get("/stock")
async def get_stock(
    session: SessionDep, sku: Annotated[str | None, Query()] = None, warehouse_id: Annotated[str | None, Query()] = None
) -> list[StockOut]:
    """Stock levels: on_hand, reserved, available (on_hand - reserved), protected."""
    return await service.list_stock(session, sku, warehouse_id)


def _receipt_out(row: Receipt) -> ReceiptOut:
    return ReceiptOut(
        receipt_id=row.receipt_id,
        warehouse_id=row.warehouse_id,
        lines=[ReceiptLine.model_validate(line) for line in row.lines],
        received_at=as_utc(row.received_at),
        orders_served=row.orders_served,
    )


def _same_receipt(row: Receipt, body: ReceiptIn) -> bool:
    return row.warehouse_id == body.warehouse_id and row.lines == [line.model_dump() for line in body.lines]


@router.post(
    "/receipts",
    status_code=status.HTTP_201_CREATED,
    responses={
        409: {"description": "receipt id reused with other lines, or on_hand would pass its bound"},
        422: {"description": "invalid body, or received_at in the future"},
        **BUSY,
    },
)
async def post_receipt(body: ReceiptIn, runtime: RuntimeDep, response: Response) -> ReceiptOut:
    """Record a restock (idempotent by receipt id); released units serve the backorder queue."""
    now = clock_of(runtime)()
    if body.received_at is not None and body.received_at > now + RECEIPT_CLOCK_SKEW:
        raise Problem(
            f"received_at {body.received_at.isoformat()} is in the future; goods are received when they arrive",
            status=422,
            title="Validation failed",
            type=PROBLEM_BASE + "validation",
        )
    received_at = min(body.received_at, now) if body.received_at is not None else now

    async def record(session: AsyncSession) -> ReceiptOut | None:
        if await session.get(Receipt, body.receipt_id) is not None:
            return None
        served = await service.receive_stock(
            session, body.warehouse_id, [(line.sku, line.qty) for line in body.lines], at=received_at
        )
        row = Receipt(
            receipt_id=body.receipt_id,
            warehouse_id=body.warehouse_id,
            lines=[line.model_dump() for line in body.lines],
            received_at=received_at,
            orders_served=served.orders,
        )
        session.add(row)
        stage_events(session, runtime.settings, served.events)
        await session.flush()
        return _receipt_out(row)

    try:
        created = await write(runtime, record)
    except IntegrityError:
        created = None  # the same receipt was posted concurrently and won
    if created is not None:
        return created
    async with runtime.sessions() as session:
        existing = await session.get(Receipt, body.receipt_id)
    if existing is None:
        raise StockBusy("the receipt could not be recorded; please retry", headers={"Retry-After": "1"})
    if not _same_receipt(existing, body):
        raise Conflict(f"receipt {body.receipt_id!r} was already recorded with different lines or warehouse")
    response.status_code = status.HTTP_200_OK
    return _receipt_out(existing)


@router.put("/inbound/{warehouse_id}/{sku}", responses=BUSY)
async def put_inbound(warehouse_id: Identifier, sku: Identifier, body: InboundIn, runtime: RuntimeDep) -> InboundOut:
    """Expected purchase arrival (qty, eta): gives backorders their expected restock date."""
    return await write(runtime, lambda session: service.put_inbound(session, warehouse_id, sku, body))


@router.get("/backorders")
async def get_backorders(
    session: SessionDep, runtime: RuntimeDep, sku: Annotated[str | None, Query()] = None
) -> list[BackorderOut]:
    """The backorder queue in the order it will be served: core customers first, then oldest."""
    return await service.backorder_queue(session, sku, today=clock_of(runtime)().date())
