"""The demo's stockroom seeds and restocks inventory through its HTTP API (a fake here)."""

from __future__ import annotations

import json
from typing import Any

import httpx
from shipping.orders import CATALOGUE
from shipping.stockroom import (
    INITIAL_ON_HAND,
    REORDER_POINT,
    TARGET_AVAILABLE,
    WAREHOUSES,
    Stockroom,
    restock_plan,
    stocking_plan,
)


class FakeInventory:
    """Just enough of inventory's /v1 API: warehouses, stock levels, receipts, backorders."""

    def __init__(self) -> None:
        self.warehouses: dict[str, dict[str, Any]] = {}
        self.on_hand: dict[tuple[str, str], int] = {}
        self.reserved: dict[tuple[str, str], int] = {}
        self.backorders: list[dict[str, Any]] = []
        self.receipts: list[dict[str, Any]] = []
        self.stock_puts: list[tuple[str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.strip("/").split("/")[1:]
        body = json.loads(request.content) if request.content else None
        if request.method == "PUT" and parts[0] == "warehouses":
            self.warehouses[parts[1]] = body
            return httpx.Response(200, json={"warehouse_id": parts[1], **body})
        if request.method == "PUT" and parts[0] == "stock":
            assert parts[1] in self.warehouses, "stock for an undescribed warehouse"
            self.on_hand[(parts[1], parts[2])] = body["on_hand"]
            self.stock_puts.append((parts[1], parts[2]))
            return httpx.Response(200, json={})
        if request.method == "GET" and parts == ["stock"]:
            return httpx.Response(200, json=[self._level(key) for key in sorted(self.on_hand)])
        if request.method == "GET" and parts == ["backorders"]:
            return httpx.Response(200, json=self.backorders)
        if request.method == "POST" and parts == ["receipts"]:
            self.receipts.append(body)
            for line in body["lines"]:
                key = (body["warehouse_id"], line["sku"])
                self.on_hand[key] = self.on_hand.get(key, 0) + line["qty"]
            return httpx.Response(201, json={})
        return httpx.Response(404)

    def _level(self, key: tuple[str, str]) -> dict[str, Any]:
        reserved = self.reserved.get(key, 0)
        return {
            "warehouse_id": key[0],
            "sku": key[1],
            "on_hand": self.on_hand[key],
            "available": self.on_hand[key] - reserved,
        }


def client(inventory: FakeInventory) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(inventory), base_url="http://inventory")


def test_every_generated_sku_is_stocked_and_some_only_in_one_warehouse() -> None:
    plan = stocking_plan()
    assert {sku for _, sku in plan} == set(CATALOGUE)
    by_sku: dict[str, set[str]] = {}
    for warehouse, sku in plan:
        by_sku.setdefault(sku, set()).add(warehouse)
    # Kettles and gift boxes live in different warehouses: an order for both is split.
    assert by_sku["KETTLE-01"].isdisjoint(by_sku["GIFTBOX-01"])
    assert len(by_sku["TEA-001"]) == len(WAREHOUSES)


def test_the_restock_plan_tops_up_low_stock_and_brings_in_what_backorders_wait_for() -> None:
    levels = [
        {"warehouse_id": "wh-shanghai", "sku": "TEA-001", "available": 3},
        {"warehouse_id": "wh-shenzhen", "sku": "TEA-001", "available": 50},
    ]
    levels += [
        {"warehouse_id": w, "sku": s, "available": TARGET_AVAILABLE} for w, s in stocking_plan() if s != "TEA-001"
    ]
    backorders = [{"sku": "KETTLE-02", "qty": 25}, {"sku": "KETTLE-02", "qty": 5}]
    plan = restock_plan(levels, backorders)
    assert plan == {"wh-shanghai": {"TEA-001": TARGET_AVAILABLE - 3}, "wh-shenzhen": {"KETTLE-02": 30}}
    assert REORDER_POINT > 3
    full = [{"warehouse_id": w, "sku": s, "available": TARGET_AVAILABLE} for w, s in stocking_plan()]
    assert restock_plan(full, []) == {}


async def test_seeding_describes_the_warehouses_and_leaves_existing_stock_alone() -> None:
    inventory = FakeInventory()
    inventory.warehouses["wh-shanghai"] = {}
    inventory.on_hand[("wh-shanghai", "TEA-001")] = 7  # counted by someone: not reset
    async with client(inventory) as http:
        created = await Stockroom(http).seed()
        assert created == len(stocking_plan()) - 1
        assert set(inventory.warehouses) == {w.warehouse_id for w in WAREHOUSES}
        assert inventory.on_hand[("wh-shanghai", "TEA-001")] == 7
        assert inventory.on_hand[("wh-shenzhen", "KETTLE-01")] == INITIAL_ON_HAND
        # A restarted demo seeds nothing twice.
        assert await Stockroom(http).seed() == 0


async def test_a_restock_round_posts_receipts_that_release_backorders() -> None:
    inventory = FakeInventory()
    async with client(inventory) as http:
        stockroom = Stockroom(http)
        await stockroom.seed()
        assert (await stockroom.restock()).receipts == 0
        inventory.reserved[("wh-shenzhen", "KETTLE-03")] = INITIAL_ON_HAND - 2
        inventory.backorders = [{"sku": "KETTLE-03", "qty": 12}]
        report = await stockroom.restock()
    assert report.receipts == 1
    (receipt,) = inventory.receipts
    assert receipt["warehouse_id"] == "wh-shenzhen"
    assert receipt["lines"] == [{"sku": "KETTLE-03", "qty": TARGET_AVAILABLE - 2 + 12}]
    assert receipt["receipt_id"].startswith("demo-")
