"""Helpers for the shipping tests: a fake clock, order events, signed webhook posts and
a look into what the service staged in its outbox."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI
from fulfil.codec import Envelope, decode
from fulfil.events import (
    Address,
    AllocatedLine,
    Customer,
    CustomerTier,
    OrderAllocated,
    OrderCancelled,
    OrderedLine,
    OrderEvent,
    OrderReceived,
    ServiceLevel,
)
from fulfil.outbox import OutboxRow, unpack_headers
from fulfil.service import Runtime
from fulfil.testing import POSTGRES_ADMIN_URL, create_topics, running_app, settings_for
from shipping.config import Settings
from shipping.handlers import handlers_for
from shipping.main import create_app
from shipping.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from sqlmodel import col, select

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
SECRET = "test-carrier-secret-0123456789"


@dataclass
class FakeClock:
    current: datetime = T0

    def now(self) -> datetime:
        return self.current

    def advance(self, delta: timedelta) -> datetime:
        self.current += delta
        return self.current


def shipping_settings(bootstrap: str, database_url: str, topic: str, **overrides: Any) -> Settings:
    base = settings_for(bootstrap, database_url, topic=topic, service_name="shipping")
    options: dict[str, Any] = {
        "carriers": {"acme": {"secret": SECRET}, "simcarrier": {"secret": SECRET, "transit_days": {"express": 2}}},
        "default_carrier": "acme",
        "delay_scan_seconds": 3600,
        "warehouse_handling_hours": {"wh-west": 48},
        **overrides,
    }
    return Settings(**{**base.model_dump(), **options})


@dataclass
class Harness:
    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings
    clock: FakeClock

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.app.state.runtime
        return runtime

    async def apply(self, event: OrderEvent) -> None:
        """Run the service's handler for one event as the consumer loop would: one transaction."""
        handler = handlers_for(self.settings)[type(event)]
        envelope = Envelope(str(uuid.uuid4()), "/test", event.type, event.occurred_at, event.order_id, event)
        async with self.runtime.sessions() as session, session.begin():
            await handler(event, session, envelope)

    async def staged(self, order_id: str, event_type: str | None = None) -> list[OrderEvent]:
        """Events the service staged in its outbox for one order, oldest first."""
        async with self.runtime.sessions() as session:
            rows = await session.exec(
                select(OutboxRow).where(OutboxRow.key == order_id.encode()).order_by(col(OutboxRow.id))
            )
            events = [decode(r.key, r.value, unpack_headers(r.headers)).data for r in rows]
        return [e for e in events if event_type is None or e.type == event_type]

    async def shipments(self, order_id: str) -> list[dict[str, Any]]:
        response = await self.client.get("/v1/shipments", params={"order_id": order_id})
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    async def post_carrier_event(
        self, carrier: str, payload: dict[str, Any], *, secret: str = SECRET, at: datetime | None = None
    ) -> httpx.Response:
        body = json.dumps(payload, default=str).encode()
        timestamp = int((at or self.clock.now()).timestamp())
        headers = {
            "content-type": "application/json",
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(secret, timestamp, body),
        }
        return await self.client.post(f"/v1/carriers/{carrier}/events", content=body, headers=headers)


@asynccontextmanager
async def harness(
    bootstrap: str, database_url: str, topic: str, clock: FakeClock | None = None, **overrides: Any
) -> AsyncIterator[Harness]:
    settings = shipping_settings(bootstrap, database_url, topic, **overrides)
    await create_topics(settings)
    clock = clock or FakeClock()
    app = create_app(settings, clock=clock)
    async with running_app(app) as client:
        yield Harness(app, client, settings, clock)


def received(
    order_id: str,
    *,
    at: datetime = T0,
    service_level: ServiceLevel = ServiceLevel.STANDARD,
    requested: date | None = None,
    tier: CustomerTier = CustomerTier.STANDARD,
) -> OrderReceived:
    return OrderReceived(
        order_id=order_id,
        occurred_at=at,
        client="shop",
        external_ref=f"ext-{order_id}",
        customer=Customer(id="c-1", tier=tier),
        lines=(
            OrderedLine(line_no=1, sku="SKU-A", qty=2),
            OrderedLine(line_no=2, sku="SKU-B", qty=1),
        ),
        ship_to=Address(name="Li Lei", line1="1 Road", city="Shanghai", postal_code="200000", country="CN"),
        placed_at=at - timedelta(minutes=5),
        requested_delivery_date=requested,
        service_level=service_level,
    )


def allocated(order_id: str, *, at: datetime = T0, warehouses: tuple[str, ...] = ("wh-east",)) -> OrderAllocated:
    """Line 1 from the first warehouse, line 2 from the last (a split when there are two)."""
    return OrderAllocated(
        order_id=order_id,
        occurred_at=at,
        allocations=(
            AllocatedLine(line_no=1, sku="SKU-A", qty=2, warehouse_id=warehouses[0]),
            AllocatedLine(line_no=2, sku="SKU-B", qty=1, warehouse_id=warehouses[-1]),
        ),
        complete=True,
        first_pass=True,
    )


def cancelled(order_id: str, *, at: datetime = T0) -> OrderCancelled:
    return OrderCancelled(order_id=order_id, occurred_at=at, reason="customer changed their mind")


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str | None]:
    """A fresh PostgreSQL database for a module, dropped afterwards; None when none answers."""
    import asyncpg

    admin_url = POSTGRES_ADMIN_URL.replace("postgresql+asyncpg://", "postgresql://")
    name = "fulfil_shipping_" + uuid.uuid4().hex[:12]
    try:
        connection = await asyncpg.connect(admin_url, timeout=3)
    except Exception:
        yield None
        return
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        connection = await asyncpg.connect(admin_url)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()


def new_order_id() -> str:
    return "o-" + uuid.uuid4().hex[:10]
