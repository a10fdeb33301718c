"""Small builders shared by the inventory tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fulfil import kafka
from fulfil.codec import encode
from fulfil.events import Address, Customer, CustomerTier, OrderedLine, OrderEvent, OrderReceived
from fulfil.testing import settings_for
from inventory.config import Settings

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def line(line_no: int, sku: str, qty: int, *substitutes: str) -> OrderedLine:
    return OrderedLine(line_no=line_no, sku=sku, qty=qty, substitutes=substitutes)


def order(
    order_id: str,
    *lines: OrderedLine,
    tier: CustomerTier = CustomerTier.STANDARD,
    allow_partial: bool = True,
    minutes: int = 0,
) -> OrderReceived:
    at = T0 + timedelta(minutes=minutes)
    return OrderReceived(
        order_id=order_id,
        occurred_at=at,
        client="shop",
        external_ref=f"ext-{order_id}",
        customer=Customer(id=f"c-{order_id}", tier=tier),
        lines=lines,
        ship_to=Address(name="A. Buyer", line1="1 Road", city="Lyon", postal_code="69001", country="FR"),
        placed_at=at,
        allow_partial=allow_partial,
    )


async def publish(settings: Settings, events: list[OrderEvent]) -> None:
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for event in events:
            _, record = encode(event, source="/test")
            await producer.send_and_wait(
                settings.kafka_topic, key=record.key, value=record.value, headers=record.headers
            )
    finally:
        await producer.stop()


def inventory_settings(kafka_bootstrap: str, database_url: str, topic: str) -> Settings:
    return Settings(**settings_for(kafka_bootstrap, database_url, topic=topic, service_name="inventory").model_dump())
