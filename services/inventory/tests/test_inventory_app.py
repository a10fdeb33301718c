"""The inventory app on a real broker and database (SQLite and PostgreSQL): orders arrive
through the real consumer, restocks and counts through the API; the events it publishes
and the stock it reports are checked against hand-computed values."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import httpx
from fulfil.codec import Envelope
from fulfil.events import (
    CustomerTier,
    LineQuantity,
    OrderAllocated,
    OrderBackordered,
    OrderCancelled,
    OrderShipped,
)
from fulfil.testing import create_topics, eventually, read_topic, running_app
from inventory.main import create_app
from inventory_builders import T0, inventory_settings, line, order, publish

NOW = T0 + timedelta(hours=1)


async def stock_of(client: httpx.AsyncClient, warehouse_id: str, sku: str) -> dict[str, Any]:
    rows = (await client.get("/v1/stock", params={"sku": sku, "warehouse_id": warehouse_id})).json()
    assert len(rows) == 1
    row: dict[str, Any] = rows[0]
    return row


class Topic:
    """What inventory has published, read from the real topic."""

    def __init__(self, bootstrap: str, name: str) -> None:
        self.bootstrap, self.name = bootstrap, name
        self.seen: set[str] = set()

    async def new(self, expect: int) -> list[tuple[str, str, Any]]:
        """The next ``expect`` events inventory published (summarised, sorted), and no more."""

        async def enough() -> list[Envelope] | None:
            records = await read_topic(self.bootstrap, self.name, expect=10_000, timeout=0.5)
            mine = [r for r in records if r.source == "/fulfil/inventory" and r.id not in self.seen]
            return mine if len(mine) >= expect else None

        fresh: list[Envelope] = await eventually(enough, timeout=30)
        self.seen.update(r.id for r in fresh)
        assert len(fresh) == expect, [summary(r) for r in fresh]
        return sorted(summary(r) for r in fresh)


def summary(envelope: Envelope) -> tuple[str, str, Any]:
    event = envelope.data
    if isinstance(event, OrderAllocated):
        units = sorted((a.line_no, a.sku, a.qty, a.warehouse_id, a.substitute_for) for a in event.allocations)
        return (event.type, event.order_id, (units, event.complete, event.first_pass))
    assert isinstance(event, OrderBackordered)
    lines = sorted((ln.line_no, ln.sku, ln.qty) for ln in event.lines)
    return (event.type, event.order_id, (lines, event.expected_restock_date))


async def test_allocation_backorders_restock_cancel_and_ship(
    kafka_bootstrap: str, database_url: str, topic_name: str
) -> None:
    settings = inventory_settings(kafka_bootstrap, database_url, topic_name)
    await create_topics(settings)
    topic = Topic(kafka_bootstrap, topic_name)
    async with running_app(create_app(settings, clock=lambda: NOW)) as client:
        for warehouse_id, priority in (("PAR", 1), ("LYS", 2)):
            body = {"name": warehouse_id, "country": "FR", "handling_hours": 24, "priority": priority}
            assert (await client.put(f"/v1/warehouses/{warehouse_id}", json=body)).status_code == 200
        assert (await client.put("/v1/stock/PAR/A", json={"on_hand": 5, "protected_for_core": 2})).status_code == 200
        assert (await client.put("/v1/stock/LYS/B", json={"on_hand": 4})).status_code == 200
        assert (await client.put("/v1/stock/PAR/B", json={"on_hand": 1})).status_code == 200
        inbound = {"qty": 10, "eta": "2026-03-12"}
        assert (await client.put("/v1/inbound/LYS/A", json=inbound)).json()["eta"] == "2026-03-12"
        assert (await client.put("/v1/stock/NOPE/A", json={"on_hand": 1})).status_code == 404

        # standard, partial: 3 of A free to standard customers (5 on hand, 2 protected)
        await publish(settings, [order("o1", line(1, "A", 3), minutes=1)])
        assert await topic.new(1) == [("order.allocated", "o1", ([(1, "A", 3, "PAR", None)], True, True))]
        await publish(
            settings,
            [
                # standard, partial: nothing left for standard customers; 10 inbound by the 12th
                order("o2", line(1, "A", 4), minutes=2),
                # core, ship-complete: takes the 2 protected, waits for 1, announces no allocation yet
                order("o3", line(1, "A", 3), tier=CustomerTier.CORE, allow_partial=False, minutes=3),
                # C is short everywhere and the customer consented to B: LYS covers both lines alone
                # (PAR, preferred, has only 1 B).
                order("o4", line(1, "B", 3), line(2, "C", 1, "B"), minutes=4),
            ],
        )
        assert await topic.new(3) == [
            ("order.allocated", "o4", ([(1, "B", 3, "LYS", None), (2, "B", 1, "LYS", "C")], True, True)),
            ("order.backordered", "o2", ([(1, "A", 4)], date(2026, 3, 12))),
            ("order.backordered", "o3", ([(1, "A", 1)], date(2026, 3, 12))),
        ]
        assert await stock_of(client, "PAR", "A") == {
            "warehouse_id": "PAR",
            "sku": "A",
            "on_hand": 5,
            "reserved": 5,
            "available": 0,
            "available_to_standard": 0,
            "protected_for_core": 2,
            "reserved_for_core": 2,
        }
        queue = (await client.get("/v1/backorders")).json()
        assert [(b["position"], b["order_id"], b["qty"]) for b in queue] == [(1, "o3", 1), (2, "o2", 4)]

        # A restock of 4: core first (o3 needs 1, then announced complete with all 3), then o2.
        receipt = {"receipt_id": "r-1", "warehouse_id": "PAR", "lines": [{"sku": "A", "qty": 4}]}
        created = await client.post("/v1/receipts", json=receipt)
        assert created.status_code == 201, created.text
        assert created.json()["orders_served"] == ["o3", "o2"]
        again = await client.post("/v1/receipts", json=receipt)
        assert (again.status_code, again.json()["orders_served"]) == (200, ["o3", "o2"])
        changed = {**receipt, "lines": [{"sku": "A", "qty": 5}]}
        assert (await client.post("/v1/receipts", json=changed)).status_code == 409
        assert await topic.new(2) == [
            # 9 on hand, 6 reserved; core orders hold 3, so the reserve of 2 is used up:
            # 3 free for o2 (partial), 1 still waiting.
            ("order.allocated", "o2", ([(1, "A", 3, "PAR", None)], False, False)),
            ("order.allocated", "o3", ([(1, "A", 3, "PAR", None)], True, False)),
        ]
        stock = await stock_of(client, "PAR", "A")
        assert (stock["on_hand"], stock["reserved"], stock["reserved_for_core"]) == (9, 9, 3)
        assert (await client.get("/v1/stock", params={"sku": "A", "warehouse_id": "LYS"})).json() == []

        # o1 cancelled: its 3 units go to the queue; o2 takes its last unit.
        cancelled = OrderCancelled(order_id="o1", occurred_at=NOW, reason="changed mind")
        await publish(settings, [cancelled])
        assert await topic.new(1) == [("order.allocated", "o2", ([(1, "A", 1, "PAR", None)], True, False))]
        stock = await stock_of(client, "PAR", "A")
        assert (stock["on_hand"], stock["reserved"], stock["available"]) == (9, 7, 2)
        assert (await client.get("/v1/backorders")).json() == []

        # o3 ships 3 from PAR: on hand and reserved both drop.
        shipped = OrderShipped(
            order_id="o3",
            occurred_at=NOW,
            shipment_id="s-1",
            warehouse_id="PAR",
            carrier="DHL",
            tracking_number="T1",
            lines=(LineQuantity(line_no=1, sku="A", qty=3),),
            ship_by=NOW,
            promised_delivery_at=NOW + timedelta(days=2),
        )
        await publish(settings, [shipped])

        async def shipped_out() -> bool:
            level = await stock_of(client, "PAR", "A")
            return (level["on_hand"], level["reserved"], level["reserved_for_core"]) == (6, 4, 0)

        await eventually(shipped_out)
        # Counting below what is reserved is refused; above releases nothing (queue is empty).
        refused = await client.put("/v1/stock/PAR/A", json={"on_hand": 1})
        assert refused.status_code == 409
        assert refused.headers["content-type"] == "application/problem+json"
        assert (await client.put("/v1/stock/PAR/A", json={"on_hand": 3, "protected_for_core": 4})).status_code == 422
