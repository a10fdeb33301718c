"""Sample order events for platform tests."""

from __future__ import annotations

from datetime import UTC, datetime

from fulfil.events import Address, Customer, OrderedLine, OrderReceived


def order_received(order_id: str, *, sku: str = "SKU-1", qty: int = 1) -> OrderReceived:
    now = datetime.now(UTC)
    return OrderReceived(
        order_id=order_id,
        occurred_at=now,
        client="erp-test",
        external_ref=f"ext-{order_id}",
        customer=Customer(id="c-1"),
        lines=(OrderedLine(line_no=1, sku=sku, qty=qty),),
        ship_to=Address(name="A", line1="1 Road", city="Town", postal_code="1000", country="NL"),
        placed_at=now,
    )
