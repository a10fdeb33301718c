from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from fulfil import events
from fulfil.events import CATALOGUE, OrderCancelled, OrderDelivered, OrderReceived, parse_event
from pydantic import ValidationError

from tests.support.orders import order_received


def test_events_are_frozen() -> None:
    event = order_received("o-1")
    with pytest.raises(ValidationError):
        event.order_id = "o-2"  # type: ignore[misc]


def test_occurred_at_is_normalised_to_utc_and_naive_times_are_refused() -> None:
    plus8 = timezone(timedelta(hours=8))
    event = OrderCancelled(order_id="o-1", occurred_at=datetime(2026, 1, 1, 8, 0, tzinfo=plus8), reason="x")
    assert event.occurred_at == datetime(2026, 1, 1, 0, 0, tzinfo=UTC)
    assert event.occurred_at.tzinfo is UTC
    with pytest.raises(ValidationError, match="timezone"):
        OrderCancelled(order_id="o-1", occurred_at=datetime(2026, 1, 1), reason="x")


def test_quantities_are_integers_not_floats() -> None:
    data = order_received("o-1").model_dump()
    data["lines"][0]["qty"] = 1.5
    with pytest.raises(ValidationError):
        OrderReceived.model_validate(data)
    data["lines"][0]["qty"] = 0
    with pytest.raises(ValidationError):
        OrderReceived.model_validate(data)


def test_parse_event_picks_the_model_by_type() -> None:
    now = datetime.now(UTC)
    parsed = parse_event(
        {
            "type": "order.delivered",
            "order_id": "o-1",
            "occurred_at": now.isoformat(),
            "shipment_id": "s-1",
            "lines": [{"line_no": 1, "sku": "A", "qty_delivered": 2, "qty_damaged": 1}],
            "delivered_at": now.isoformat(),
        }
    )
    assert isinstance(parsed, OrderDelivered)
    assert parsed.lines[0].qty_damaged == 1


def test_catalogue_has_the_seven_order_events() -> None:
    assert set(CATALOGUE) == {
        "order.received",
        "order.allocated",
        "order.backordered",
        "order.shipped",
        "order.delivered",
        "order.delayed",
        "order.cancelled",
    }


def test_json_schema_is_generated_for_every_event() -> None:
    schema = events.json_schema()
    assert {"OrderReceived", "OrderAllocated", "OrderShipped", "OrderCancelled"} <= set(schema["$defs"])
    assert schema["discriminator"]["propertyName"] == "type"


def test_upcaster_brings_old_data_to_the_current_version(monkeypatch: pytest.MonkeyPatch) -> None:
    def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
        return {**{k: v for k, v in data.items() if k != "why"}, "reason": data["why"]}

    monkeypatch.setattr(OrderCancelled, "schema_version", 2)
    monkeypatch.setitem(events.UPCASTERS, ("order.cancelled", 1), v1_to_v2)
    upcast = events.upcast("order.cancelled", 1, {"order_id": "o", "why": "changed mind"})
    assert upcast == {"order_id": "o", "reason": "changed mind"}


def test_skus_include_consented_substitutes() -> None:
    event = order_received("o-1")
    line = event.lines[0].model_copy(update={"substitutes": ("SKU-2",)})
    assert event.model_copy(update={"lines": (line,)}).skus() == {"SKU-1", "SKU-2"}
