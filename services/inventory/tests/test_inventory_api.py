"""The /v1 API's refusals and queue views (SQLite; the scenario test covers PostgreSQL)."""

from __future__ import annotations

from fulfil.events import CustomerTier
from fulfil.outbox import OutboxRow
from fulfil.service import Runtime
from fulfil.testing import create_topics, running_app
from inventory import service
from inventory.main import create_app
from inventory_builders import T0, inventory_settings, line, order
from sqlmodel import select


async def test_refusals_queue_view_and_a_count_that_serves_the_queue(
    kafka_bootstrap: str, sqlite_url: str, topic_name: str
) -> None:
    settings = inventory_settings(kafka_bootstrap, sqlite_url, topic_name)
    await create_topics(settings)
    app = create_app(settings, clock=lambda: T0)
    async with running_app(app) as client:
        bad = await client.put("/v1/warehouses/W1", json={"name": "W1", "country": "France", "handling_hours": 24})
        assert bad.status_code == 422
        assert {e["pointer"] for e in bad.json()["errors"]} == {"/country", "/priority"}
        body = {"name": "W1", "country": "FR", "regions": ["FR-IDF"], "handling_hours": 24, "priority": 1}
        assert (await client.put("/v1/warehouses/W1", json=body)).json()["regions"] == ["FR-IDF"]
        unknown = {"receipt_id": "r1", "warehouse_id": "W9", "lines": [{"sku": "A", "qty": 1}]}
        assert (await client.post("/v1/receipts", json=unknown)).status_code == 404
        assert (await client.put("/v1/inbound/W9/A", json={"qty": 1, "eta": "2026-03-09"})).status_code == 404
        empty = {"receipt_id": "r1", "warehouse_id": "W1", "lines": []}
        assert (await client.post("/v1/receipts", json=empty)).status_code == 422

        assert (await client.put("/v1/inbound/W1/A", json={"qty": 1, "eta": "2026-03-09"})).status_code == 200
        runtime: Runtime = app.state.runtime
        async with runtime.sessions() as session, session.begin():
            await service.allocate_order(session, order("std", line(1, "A", 2), line(2, "B", 1)), at=T0)
            core = order("core", line(1, "A", 1), tier=CustomerTier.CORE, minutes=5)
            await service.allocate_order(session, core, at=T0)
        queue = (await client.get("/v1/backorders")).json()
        assert [(b["position"], b["order_id"], b["sku"], b["qty"], b["expected_restock_date"]) for b in queue] == [
            (1, "core", "A", 1, "2026-03-09"),  # the one inbound unit goes to the core customer
            (2, "std", "A", 2, None),
            (3, "std", "B", 1, None),
        ]
        only_b = (await client.get("/v1/backorders", params={"sku": "B"})).json()
        assert [(b["order_id"], b["customer_tier"]) for b in only_b] == [("std", "standard")]

        # A count that finds 2 A (1 held for core): the core order, first in the queue, takes 1 and
        # so uses up the reserve; the other unit goes to the standard order, whose A line still waits for 1.
        counted = await client.put("/v1/stock/W1/A", json={"on_hand": 2, "protected_for_core": 1})
        assert counted.json() == {
            "warehouse_id": "W1",
            "sku": "A",
            "on_hand": 2,
            "reserved": 2,
            "available": 0,
            "available_to_standard": 0,
            "protected_for_core": 1,
            "reserved_for_core": 1,
        }
        queue = (await client.get("/v1/backorders")).json()
        assert [(b["order_id"], b["sku"], b["qty"]) for b in queue] == [("std", "A", 1), ("std", "B", 1)]
        async with runtime.sessions() as session:
            staged = (await session.exec(select(OutboxRow))).all()
        assert [row.key for row in staged].count(b"core") == 1
        assert [row.key for row in staged].count(b"std") == 1

        # An arrival whose ETA has passed without the goods is overdue: it promises no date.
        overdue = await client.put("/v1/inbound/W1/B", json={"qty": 5, "eta": "2026-03-01"})
        assert overdue.status_code == 200
        queue = (await client.get("/v1/backorders", params={"sku": "B"})).json()
        assert [(b["order_id"], b["expected_restock_date"]) for b in queue] == [("std", None)]
        assert (await client.put("/v1/inbound/W1/B", json={"qty": 5, "eta": "2026-03-02"})).status_code == 200
        queue = (await client.get("/v1/backorders", params={"sku": "B"})).json()
        assert [(b["order_id"], b["expected_restock_date"]) for b in queue] == [("std", "2026-03-02")]
