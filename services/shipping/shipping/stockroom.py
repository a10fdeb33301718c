"""The demo's stockroom: warehouses and stock for the order generator's catalogue, seeded
through inventory's HTTP API, and restocked periodically (``POST /v1/receipts``) so that
backorders are released and the stream of orders never dries up.

Two warehouses stock different SKU families (kettles only in Shenzhen, gift boxes only in
Shanghai), so an order for both is a split shipment (分批运送); bulk lines run stock short
and become backorders (延期交货) until the next receipt. Core customers (核心客户) have a
protected reserve. Every decision is made from inventory's current levels, so a restarted
demo, or a receipt whose response was lost, simply corrects itself on the next round.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from shipping.orders import CATALOGUE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoWarehouse:
    warehouse_id: str
    name: str
    country: str
    priority: int
    families: tuple[str, ...]
    """SKU families (the part before the dash) this warehouse stocks."""


WAREHOUSES = (
    DemoWarehouse("wh-shanghai", "Shanghai distribution centre", "CN", 10, ("TEA", "CUP", "GIFTBOX")),
    DemoWarehouse("wh-shenzhen", "Shenzhen distribution centre", "CN", 20, ("TEA", "CUP", "KETTLE")),
)
INITIAL_ON_HAND = 60
PROTECTED_FOR_CORE = 6
REORDER_POINT = 20
"""A receipt tops a SKU up when fewer units than this are available."""
TARGET_AVAILABLE = 60
HANDLING_HOURS = 24


def family(sku: str) -> str:
    return sku.split("-")[0]


def stocking_plan(catalogue: Iterable[str] = CATALOGUE) -> list[tuple[str, str]]:
    """(warehouse, sku) pairs the demo stocks."""
    return [(w.warehouse_id, sku) for sku in catalogue for w in WAREHOUSES if family(sku) in w.families]


def home_warehouse(sku: str) -> str | None:
    """Where a SKU's backorders are restocked: the preferred warehouse that stocks it."""
    stocking = [w for w in WAREHOUSES if family(sku) in w.families]
    return min(stocking, key=lambda w: w.priority).warehouse_id if stocking else None


def restock_plan(levels: Iterable[dict[str, Any]], backorders: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Receipts to post, {warehouse: {sku: qty}}: top up what runs low, and bring in what the
    backorder queue waits for at each SKU's home warehouse."""
    available = {(level["warehouse_id"], level["sku"]): int(level["available"]) for level in levels}
    waiting: dict[str, int] = {}
    for line in backorders:
        waiting[line["sku"]] = waiting.get(line["sku"], 0) + int(line["qty"])
    plan: dict[str, dict[str, int]] = {}
    for warehouse_id, sku in stocking_plan():
        now_available = available.get((warehouse_id, sku), 0)
        qty = TARGET_AVAILABLE - now_available if now_available < REORDER_POINT else 0
        if home_warehouse(sku) == warehouse_id:
            qty += waiting.pop(sku, 0)
        if qty > 0:
            plan.setdefault(warehouse_id, {})[sku] = qty
    for sku, qty in waiting.items():
        # A backordered SKU the demo does not stock (an order from another client).
        if (home := home_warehouse(sku)) is not None:
            plan.setdefault(home, {})[sku] = plan.get(home, {}).get(sku, 0) + qty
    return plan


@dataclass
class RestockReport:
    receipts: int = 0
    units: int = 0


class Stockroom:
    """Seeds and restocks inventory for the demo through its HTTP API."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def seed(self) -> int:
        """Describe the warehouses and count in stock for every SKU not stocked yet (a
        restarted demo leaves existing levels alone). Returns the SKU levels created."""
        created = 0
        for warehouse in WAREHOUSES:
            body = {
                "name": warehouse.name,
                "country": warehouse.country,
                "handling_hours": HANDLING_HOURS,
                "priority": warehouse.priority,
            }
            response = await self.client.put(f"/v1/warehouses/{warehouse.warehouse_id}", json=body)
            response.raise_for_status()
        stocked = {(level["warehouse_id"], level["sku"]) for level in await self._get("/v1/stock")}
        for warehouse_id, sku in stocking_plan():
            if (warehouse_id, sku) in stocked:
                continue
            response = await self.client.put(
                f"/v1/stock/{warehouse_id}/{sku}",
                json={"on_hand": INITIAL_ON_HAND, "protected_for_core": PROTECTED_FOR_CORE},
            )
            response.raise_for_status()
            created += 1
        return created

    async def restock(self) -> RestockReport:
        """One round of receipts from the current levels and backorder queue."""
        report = RestockReport()
        plan = restock_plan(await self._get("/v1/stock"), await self._get("/v1/backorders"))
        for warehouse_id, skus in plan.items():
            body = {
                "receipt_id": f"demo-{uuid.uuid4().hex[:20]}",
                "warehouse_id": warehouse_id,
                "lines": [{"sku": sku, "qty": qty} for sku, qty in sorted(skus.items())],
            }
            response = await self.client.post("/v1/receipts", json=body)
            response.raise_for_status()
            report.receipts += 1
            report.units += sum(skus.values())
        return report

    async def run(self, restock_every: float) -> None:
        """Seed (retrying until inventory answers), then restock every ``restock_every`` seconds."""
        while True:
            try:
                created = await self.seed()
                log.info("stockroom seeded: %d new stock levels in %d warehouses", created, len(WAREHOUSES))
                break
            except httpx.HTTPError as exc:
                log.warning("inventory not ready for seeding, retrying: %s", exc)
                await asyncio.sleep(min(restock_every, 2.0))
        while True:
            await asyncio.sleep(restock_every)
            try:
                report = await self.restock()
                if report.receipts:
                    log.info("restocked: %d receipt(s), %d units", report.receipts, report.units)
            except httpx.HTTPError as exc:
                log.warning("restock failed, retrying next round: %s", exc)

    async def _get(self, path: str) -> list[dict[str, Any]]:
        response = await self.client.get(path)
        response.raise_for_status()
        items: list[dict[str, Any]] = response.json()
        return items
