"""A generator of realistic orders for demos and load: a pool of returning customers
(some core, zh-CN and en), a SKU catalogue, multi-line orders that often need two
warehouses, consented substitutes, requested dates and service levels. Posts to
order-intake's ``POST /v1/orders`` with the client's API key."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx

CATALOGUE = (
    [f"TEA-{n:03d}" for n in range(1, 21)]
    + [f"CUP-{n:03d}" for n in range(1, 11)]
    + [f"KETTLE-{n:02d}" for n in range(1, 6)]
    + [f"GIFTBOX-{n:02d}" for n in range(1, 6)]
)
PLACES = (
    ("Shanghai", "200000", "CN"),
    ("Beijing", "100000", "CN"),
    ("Guangzhou", "510000", "CN"),
    ("Shenzhen", "518000", "CN"),
    ("Hangzhou", "310000", "CN"),
    ("Chengdu", "610000", "CN"),
    ("Hong Kong", "999077", "HK"),
    ("Singapore", "018989", "SG"),
    ("Berlin", "10115", "DE"),
    ("London", "EC1A 1BB", "GB"),
)
ZH_NAMES = ("李娜", "王芳", "张伟", "刘洋", "陈静", "杨磊", "赵敏", "黄强")
EN_NAMES = ("Maria Lopez", "John Smith", "Aisha Khan", "Tom Becker", "Emma Wilson", "Kenji Sato")
SERVICE_LEVELS = (("standard", 0.6), ("express", 0.25), ("economy", 0.15))


@dataclass(frozen=True)
class Customer:
    id: str
    tier: str
    locale: str
    name: str
    email: str
    place: tuple[str, str, str]


def customers(rng: random.Random, count: int = 200) -> list[Customer]:
    pool = []
    for n in range(1, count + 1):
        locale = "zh-CN" if rng.random() < 0.6 else "en"
        name = rng.choice(ZH_NAMES if locale == "zh-CN" else EN_NAMES)
        pool.append(
            Customer(
                id=f"cust-{n:04d}",
                tier="core" if rng.random() < 0.15 else "standard",
                locale=locale,
                name=name,
                email=f"customer{n}@example.com",
                place=rng.choice(PLACES),
            )
        )
    return pool


def make_order(
    rng: random.Random, customer: Customer, now: datetime, sequence: int, *, time_compression: float = 1
) -> dict[str, Any]:
    """One order body for ``POST /v1/orders``. Under time compression the placement lag
    shrinks like every other window; a requested date stays a calendar date (shipping
    compresses its distance from placement with the same factor)."""
    line_count = rng.choices((1, 2, 3, 4, 5), weights=(35, 30, 18, 10, 7))[0]
    skus = rng.sample(CATALOGUE, line_count)
    lines = []
    for line_no, sku in enumerate(skus, start=1):
        # Bulk lines are what stock runs short of and splits across warehouses.
        qty = rng.randint(10, 40) if rng.random() < 0.1 else rng.randint(1, 4)
        line: dict[str, Any] = {"line_no": line_no, "sku": sku, "qty": qty}
        if rng.random() < 0.2:
            family = sku.split("-")[0]
            line["substitutes"] = rng.sample([s for s in CATALOGUE if s.startswith(family) and s != sku], 1)
        lines.append(line)
    city, postal_code, country = customer.place
    body: dict[str, Any] = {
        "external_ref": f"SIM-{sequence:07d}-{rng.randrange(16**6):06x}",
        "customer": {"id": customer.id, "tier": customer.tier, "locale": customer.locale, "email": customer.email},
        "lines": lines,
        "ship_to": {
            "name": customer.name,
            "line1": f"{rng.randint(1, 999)} Demo Road",
            "city": city,
            "postal_code": postal_code,
            "country": country,
        },
        "placed_at": (now - timedelta(seconds=rng.randint(0, 120)) / time_compression).isoformat(),
        "service_level": rng.choices([s for s, _ in SERVICE_LEVELS], weights=[w for _, w in SERVICE_LEVELS])[0],
        "allow_partial": rng.random() < 0.85,
    }
    if rng.random() < 0.2:
        body["requested_delivery_date"] = (now + timedelta(days=rng.randint(2, 10))).date().isoformat()
    return body


class OrderGenerator:
    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        api_key: str,
        rng: random.Random | None = None,
        time_compression: float = 1,
    ) -> None:
        self.client = client
        self.api_key = api_key
        self.rng = rng or random.Random()
        self.time_compression = time_compression
        self.customers = customers(self.rng)
        self.sequence = 0

    async def post_one(self, now: datetime) -> httpx.Response:
        self.sequence += 1
        customer = self.rng.choice(self.customers)
        body = make_order(self.rng, customer, now, self.sequence, time_compression=self.time_compression)
        return await self.client.post(
            "/v1/orders",
            json=body,
            headers={"Authorization": f"Bearer {self.api_key}", "Idempotency-Key": str(uuid.uuid4())},
        )
