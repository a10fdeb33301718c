"""The hand-computed KPI scenario: thirteen orders and every event they produce.

Times are hours after T0. Every order is placed at 0 and received at 0.1 h, except
O13 (placed 99.4 h, received 99.5 h); the report clock stands at 100 h.

| order | what happens | tier / client | warehouses / carrier |
|---|---|---|---|
| O1 | A x2, shipped 2 (by 4), delivered 20 (promised 26): perfect | core / shop | WH-1 / DHL |
| O2 | A x1 + B x3 split: S2-1 shipped 3, delivered 24; S2-2 5, 28: perfect | standard / erp | WH-1+2 / DHL+UPS |
| O3 | A x2 + C x4, C backordered 0.2, released 48, shipped 50, delivered 70: perfect | standard / shop | WH-1 / DHL |
| O4 | D x2 filled with consented substitute E, delivered 22: perfect, not first-pass filled | core / erp | WH-2 / UPS |
| O5 | A x1, shipped 10, ship_by 4 (late dispatch), delivered 28 (promised 30): perfect | standard / shop | WH-1 / DHL |
| O6 | B x2, delivered 40, promised 26 (late delivery) | standard / erp | WH-2 / UPS |
| O7 | A x5, delivered 20 with 1 damaged | core / shop | WH-1 / DHL |
| O8 | A x3, allocated then cancelled at 1: in fill and backorder rates only | standard / shop | WH-1 / - |
| O9 | C x1 allocated, not shipped: open in warehouse | core / erp | WH-1 / - |
| O10 | F x2 backordered: open, backordered | standard / shop | - / - |
| O11 | B x4 shipped, 3 delivered (short: not in full, not accurate) | standard / erp | WH-2 / UPS |
| O12 | A x1 shipped 3, in transit | core / shop | WH-1 / DHL |
| O13 | G x1 received at 99.5: processing | standard / erp | - / - |
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fulfil.events import (
    Address,
    AllocatedLine,
    Customer,
    CustomerTier,
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

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=100)


def h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def received(
    order_id: str,
    lines: list[tuple[str, int]] | list[tuple[str, int, tuple[str, ...]]],
    *,
    tier: CustomerTier = CustomerTier.STANDARD,
    client: str = "shop",
    at: float = 0.1,
) -> OrderReceived:
    ordered = []
    for number, line in enumerate(lines, start=1):
        substitutes: tuple[str, ...] = line[2] if len(line) == 3 else ()  # type: ignore[misc]
        ordered.append(OrderedLine(line_no=number, sku=line[0], qty=line[1], substitutes=substitutes))
    return OrderReceived(
        order_id=order_id,
        occurred_at=h(at),
        client=client,
        external_ref=f"ext-{order_id}",
        customer=Customer(id=f"c-{order_id}", tier=tier),
        lines=tuple(ordered),
        ship_to=Address(name="A", line1="1 Road", city="Town", postal_code="1000", country="NL"),
        placed_at=h(at - 0.1),
    )


def allocated(
    order_id: str,
    lines: list[tuple[int, str, int, str]] | list[tuple[int, str, int, str, str]],
    *,
    at: float = 0.2,
    complete: bool = True,
    first_pass: bool = True,
) -> OrderAllocated:
    return OrderAllocated(
        order_id=order_id,
        occurred_at=h(at),
        allocations=tuple(
            AllocatedLine(
                line_no=line[0],
                sku=line[1],
                qty=line[2],
                warehouse_id=line[3],
                substitute_for=line[4] if len(line) == 5 else None,  # type: ignore[misc]
            )
            for line in lines
        ),
        complete=complete,
        first_pass=first_pass,
    )


def backordered(order_id: str, lines: list[tuple[int, str, int]], *, at: float = 0.2) -> OrderBackordered:
    return OrderBackordered(
        order_id=order_id,
        occurred_at=h(at),
        lines=tuple(LineQuantity(line_no=n, sku=s, qty=q) for n, s, q in lines),
        reason="out of stock",
    )


def shipped(
    order_id: str,
    shipment_id: str,
    lines: list[tuple[int, str, int]],
    *,
    at: float,
    ship_by: float,
    promised: float,
    warehouse: str,
    carrier: str,
) -> OrderShipped:
    return OrderShipped(
        order_id=order_id,
        occurred_at=h(at),
        shipment_id=shipment_id,
        warehouse_id=warehouse,
        carrier=carrier,
        tracking_number=f"trk-{shipment_id}",
        lines=tuple(LineQuantity(line_no=n, sku=s, qty=q) for n, s, q in lines),
        ship_by=h(ship_by),
        promised_delivery_at=h(promised),
    )


def delivered(order_id: str, shipment_id: str, lines: list[tuple[int, str, int, int]], *, at: float) -> OrderDelivered:
    return OrderDelivered(
        order_id=order_id,
        occurred_at=h(at),
        shipment_id=shipment_id,
        lines=tuple(DeliveredLine(line_no=n, sku=s, qty_delivered=d, qty_damaged=x) for n, s, d, x in lines),
        delivered_at=h(at),
    )


def scenario_events() -> list[OrderEvent]:
    core, std = CustomerTier.CORE, CustomerTier.STANDARD
    return [
        # O1 perfect
        received("O1", [("A", 2)], tier=core, client="shop"),
        allocated("O1", [(1, "A", 2, "WH-1")]),
        shipped("O1", "S1", [(1, "A", 2)], at=2, ship_by=4, promised=26, warehouse="WH-1", carrier="DHL"),
        delivered("O1", "S1", [(1, "A", 2, 0)], at=20),
        # O2 split shipment, perfect
        received("O2", [("A", 1), ("B", 3)], tier=std, client="erp"),
        allocated("O2", [(1, "A", 1, "WH-1"), (2, "B", 3, "WH-2")]),
        shipped("O2", "S2-1", [(1, "A", 1)], at=3, ship_by=4, promised=30, warehouse="WH-1", carrier="DHL"),
        shipped("O2", "S2-2", [(2, "B", 3)], at=5, ship_by=6, promised=30, warehouse="WH-2", carrier="UPS"),
        delivered("O2", "S2-1", [(1, "A", 1, 0)], at=24),
        delivered("O2", "S2-2", [(2, "B", 3, 0)], at=28),
        # O3 backorder released by a restock
        received("O3", [("A", 2), ("C", 4)], tier=std, client="shop"),
        allocated("O3", [(1, "A", 2, "WH-1")], complete=False),
        backordered("O3", [(2, "C", 4)]),
        allocated("O3", [(2, "C", 4, "WH-1")], at=48, first_pass=False),
        shipped(
            "O3", "S3", [(1, "A", 2), (2, "C", 4)], at=50, ship_by=52, promised=72, warehouse="WH-1", carrier="DHL"
        ),
        delivered("O3", "S3", [(1, "A", 2, 0), (2, "C", 4, 0)], at=70),
        # O4 consented substitute
        received("O4", [("D", 2, ("E",))], tier=core, client="erp"),
        allocated("O4", [(1, "E", 2, "WH-2", "D")]),
        shipped("O4", "S4", [(1, "E", 2)], at=2, ship_by=4, promised=26, warehouse="WH-2", carrier="UPS"),
        delivered("O4", "S4", [(1, "E", 2, 0)], at=22),
        # O5 late dispatch, on-time delivery
        received("O5", [("A", 1)], tier=std, client="shop"),
        allocated("O5", [(1, "A", 1, "WH-1")]),
        OrderDelayed(order_id="O5", occurred_at=h(4), stage=DelayStage.DISPATCH, reason="missed ship-by"),
        shipped("O5", "S5", [(1, "A", 1)], at=10, ship_by=4, promised=30, warehouse="WH-1", carrier="DHL"),
        delivered("O5", "S5", [(1, "A", 1, 0)], at=28),
        # O6 late delivery
        received("O6", [("B", 2)], tier=std, client="erp"),
        allocated("O6", [(1, "B", 2, "WH-2")]),
        shipped("O6", "S6", [(1, "B", 2)], at=2, ship_by=4, promised=26, warehouse="WH-2", carrier="UPS"),
        delivered("O6", "S6", [(1, "B", 2, 0)], at=40),
        # O7 damage
        received("O7", [("A", 5)], tier=core, client="shop"),
        allocated("O7", [(1, "A", 5, "WH-1")]),
        shipped("O7", "S7", [(1, "A", 5)], at=2, ship_by=4, promised=26, warehouse="WH-1", carrier="DHL"),
        delivered("O7", "S7", [(1, "A", 5, 1)], at=20),
        # O8 cancelled
        received("O8", [("A", 3)], tier=std, client="shop"),
        allocated("O8", [(1, "A", 3, "WH-1")]),
        OrderCancelled(order_id="O8", occurred_at=h(1), reason="customer changed their mind"),
        # O9 open in the warehouse
        received("O9", [("C", 1)], tier=core, client="erp"),
        allocated("O9", [(1, "C", 1, "WH-1")]),
        # O10 open, backordered
        received("O10", [("F", 2)], tier=std, client="shop"),
        backordered("O10", [(1, "F", 2)]),
        # O11 short delivery
        received("O11", [("B", 4)], tier=std, client="erp"),
        allocated("O11", [(1, "B", 4, "WH-2")]),
        shipped("O11", "S11", [(1, "B", 4)], at=2, ship_by=4, promised=26, warehouse="WH-2", carrier="UPS"),
        delivered("O11", "S11", [(1, "B", 3, 0)], at=20),
        # O12 in transit
        received("O12", [("A", 1)], tier=core, client="shop"),
        allocated("O12", [(1, "A", 1, "WH-1")]),
        shipped("O12", "S12", [(1, "A", 1)], at=3, ship_by=4, promised=27, warehouse="WH-1", carrier="DHL"),
        # O13 just received
        received("O13", [("G", 1)], tier=std, client="erp", at=99.5),
    ]
