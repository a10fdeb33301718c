"""Sample events of one order's life, for order-intake tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fulfil.events import (
    Address,
    AllocatedLine,
    Customer,
    DelayStage,
    DeliveredLine,
    LineQuantity,
    OrderAllocated,
    OrderBackordered,
    OrderCancelled,
    OrderDelayed,
    OrderDelivered,
    OrderedLine,
    OrderEvent,
    OrderReceived,
    OrderShipped,
)

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def received(order_id: str, minutes: int = 0) -> OrderReceived:
    return OrderReceived(
        order_id=order_id,
        occurred_at=at(minutes),
        client="erp",
        external_ref=f"ext-{order_id}",
        customer=Customer(id="c-1"),
        lines=(OrderedLine(line_no=1, sku="SKU-A", qty=5), OrderedLine(line_no=2, sku="SKU-B", qty=3)),
        ship_to=Address(name="A", line1="1 Road", city="Town", postal_code="1000", country="NL"),
        placed_at=at(minutes),
    )


def allocated(order_id: str, minutes: int, line_no: int, qty: int, *, complete: bool = False) -> OrderAllocated:
    sku = "SKU-A" if line_no == 1 else "SKU-B"
    return OrderAllocated(
        order_id=order_id,
        occurred_at=at(minutes),
        allocations=(AllocatedLine(line_no=line_no, sku=sku, qty=qty, warehouse_id="WH-1"),),
        complete=complete,
        first_pass=minutes < 10,
    )


def backordered(order_id: str, minutes: int) -> OrderBackordered:
    return OrderBackordered(
        order_id=order_id,
        occurred_at=at(minutes),
        lines=(LineQuantity(line_no=2, sku="SKU-B", qty=3),),
        reason="out of stock",
    )


def shipped(order_id: str, minutes: int, shipment_id: str, lines: dict[int, int]) -> OrderShipped:
    return OrderShipped(
        order_id=order_id,
        occurred_at=at(minutes),
        shipment_id=shipment_id,
        warehouse_id="WH-1",
        carrier="SF Express",
        tracking_number=f"TRK-{shipment_id}",
        lines=tuple(LineQuantity(line_no=n, sku="SKU-A" if n == 1 else "SKU-B", qty=q) for n, q in lines.items()),
        ship_by=at(minutes + 60),
        promised_delivery_at=at(minutes + 3000),
    )


def delivered(order_id: str, minutes: int, shipment_id: str) -> OrderDelivered:
    return OrderDelivered(
        order_id=order_id,
        occurred_at=at(minutes),
        shipment_id=shipment_id,
        lines=(DeliveredLine(line_no=1, sku="SKU-A", qty_delivered=5),),
        delivered_at=at(minutes),
    )


def delayed(order_id: str, minutes: int, reason: str) -> OrderDelayed:
    return OrderDelayed(
        order_id=order_id,
        occurred_at=at(minutes),
        stage=DelayStage.TRANSIT,
        reason=reason,
        new_estimate=at(minutes + 5000),
    )


def cancelled(order_id: str, minutes: int) -> OrderCancelled:
    return OrderCancelled(order_id=order_id, occurred_at=at(minutes), reason="changed mind")


def full_life(order_id: str) -> list[OrderEvent]:
    """Received, partly allocated and backordered, restocked, split shipment with a delay, delivered."""
    return [
        received(order_id, 0),
        allocated(order_id, 1, 1, 5),
        backordered(order_id, 1),
        allocated(order_id, 300, 2, 3, complete=True),
        shipped(order_id, 400, "S1", {1: 5}),
        delayed(order_id, 500, "port congestion"),
        delayed(order_id, 900, "typhoon"),
        shipped(order_id, 600, "S2", {2: 3}),
        delivered(order_id, 2000, "S1"),
        delivered(order_id, 2500, "S2"),
    ]
