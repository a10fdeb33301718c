"""Delay detection with a fake clock: one notice per (shipment, stage), escalations only
after the further delay, nothing for on-time shipments, late stays late."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from typing import Any

import pytest
from fulfil.events import DelayStage, OrderDelayed, OrderShipped
from shipping import service
from shipping_support import T0, Harness, allocated, new_order_id, received

pytestmark = pytest.mark.asyncio(loop_scope="module")

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
SHIP_BY = T0 + DAY
PROMISE = T0 + 4 * DAY


async def pending(h: Harness) -> tuple[str, dict[str, Any]]:
    order = new_order_id()
    await h.apply(received(order))
    await h.apply(allocated(order))
    (shipment,) = await h.shipments(order)
    return order, shipment


async def scan_at(h: Harness, at: datetime, order: str) -> list[OrderDelayed]:
    h.clock.current = at
    announced = await service.scan_for_delays(h.runtime.sessions, h.settings, at)
    return [notice for notice in announced if notice.order_id == order]


async def dispatch(h: Harness, shipment: dict[str, Any], at: datetime) -> dict[str, Any]:
    h.clock.current = at
    response = await h.client.post(
        f"/v1/shipments/{shipment['id']}/dispatch", json={"carrier": "acme", "tracking_number": "T-" + shipment["id"]}
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def deliver(h: Harness, shipment: dict[str, Any], at: datetime) -> None:
    h.clock.current = at
    event = {
        "event_id": "d-" + shipment["id"],
        "tracking_number": shipment["tracking_number"],
        "status": "delivered",
        "occurred_at": at.isoformat(),
    }
    assert (await h.post_carrier_event("acme", event)).status_code == 200


async def test_a_late_dispatch_is_announced_once_then_escalated_after_the_further_delay(h: Harness) -> None:
    order, shipment = await pending(h)
    assert await scan_at(h, SHIP_BY - HOUR, order) == []
    assert await scan_at(h, SHIP_BY, order) == []

    (notice,) = await scan_at(h, SHIP_BY + HOUR, order)
    assert notice.stage is DelayStage.DISPATCH
    assert notice.shipment_id == shipment["id"]
    assert notice.occurred_at == SHIP_BY + HOUR
    assert notice.new_estimate == PROMISE + HOUR
    for later in (2 * HOUR, 12 * HOUR, 24 * HOUR + 59 * timedelta(minutes=1)):
        assert await scan_at(h, SHIP_BY + later, order) == []

    (escalation,) = await scan_at(h, SHIP_BY + 25 * HOUR, order)
    assert escalation.stage is DelayStage.DISPATCH
    assert ": still late" in escalation.reason
    assert escalation.new_estimate == PROMISE + 25 * HOUR
    assert await scan_at(h, SHIP_BY + 26 * HOUR, order) == []
    assert len(await h.staged(order, "order.delayed")) == 2

    state = (await h.client.get(f"/v1/shipments/{shipment['id']}")).json()
    assert state["late_dispatch"] is True
    assert state["promise_reason"] == "dispatch_late"
    assert datetime.fromisoformat(state["original_promised_delivery_at"]) == PROMISE
    changes = [entry["detail"] for entry in state["timeline"] if entry["kind"] == "promise_changed"]
    assert [change["reason"] for change in changes] == ["dispatch_late", "dispatch_late"]

    # Dispatched late at last: order.shipped still carries the original promise.
    await dispatch(h, shipment, SHIP_BY + 30 * HOUR)
    (shipped,) = await h.staged(order, "order.shipped")
    assert isinstance(shipped, OrderShipped)
    assert shipped.promised_delivery_at == PROMISE
    assert await scan_at(h, SHIP_BY + 60 * HOUR, order) == []


async def test_a_late_transit_is_announced_once_and_a_late_arrival_still_counts_as_late(h: Harness) -> None:
    order, shipment = await pending(h)
    shipment = await dispatch(h, shipment, T0 + 2 * HOUR)
    assert await scan_at(h, PROMISE, order) == []

    (notice,) = await scan_at(h, PROMISE + 3 * HOUR, order)
    assert notice.stage is DelayStage.TRANSIT
    assert notice.new_estimate == PROMISE + 3 * HOUR + h.settings.transit_grace
    assert await scan_at(h, PROMISE + 10 * HOUR, order) == []

    await deliver(h, shipment, PROMISE + 12 * HOUR)
    state = (await h.client.get(f"/v1/shipments/{shipment['id']}")).json()
    assert state["status"] == "delivered"
    assert state["late_delivery"] is True
    assert await scan_at(h, PROMISE + 48 * HOUR, order) == []
    assert len(await h.staged(order, "order.delayed")) == 1
    assert len(await h.staged(order, "order.delivered")) == 1


async def test_a_shipment_late_at_both_stages_gets_one_notice_per_stage(h: Harness) -> None:
    order, shipment = await pending(h)
    assert [n.stage for n in await scan_at(h, SHIP_BY + HOUR, order)] == [DelayStage.DISPATCH]
    shipment = await dispatch(h, shipment, SHIP_BY + 2 * HOUR)
    assert await scan_at(h, SHIP_BY + 3 * HOUR, order) == []
    assert [n.stage for n in await scan_at(h, PROMISE + HOUR, order)] == [DelayStage.TRANSIT]
    assert await scan_at(h, PROMISE + 2 * HOUR, order) == []


async def test_an_on_time_shipment_is_never_announced(h: Harness) -> None:
    order, shipment = await pending(h)
    for at in (T0 + HOUR, SHIP_BY - HOUR):
        assert await scan_at(h, at, order) == []
    shipment = await dispatch(h, shipment, SHIP_BY - HOUR)
    assert await scan_at(h, PROMISE - HOUR, order) == []
    await deliver(h, shipment, PROMISE - HOUR)
    for at in (PROMISE + HOUR, PROMISE + 10 * DAY):
        assert await scan_at(h, at, order) == []
    state = (await h.client.get(f"/v1/shipments/{shipment['id']}")).json()
    assert (state["late_dispatch"], state["late_delivery"]) == (False, False)
    assert await h.staged(order, "order.delayed") == []


async def test_a_cancelled_shipment_is_never_announced(h: Harness) -> None:
    from shipping_support import cancelled

    order, _ = await pending(h)
    await h.apply(cancelled(order, at=T0 + HOUR))
    assert await scan_at(h, SHIP_BY + 2 * DAY, order) == []


async def test_shipments_late_for_ever_do_not_starve_newer_delays(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "SCAN_BATCH", 3)
    ancient = [new_order_id() for _ in range(4)]
    for order in ancient:
        await h.apply(allocated(order, at=T0 - 60 * DAY))
    # Announce everything due (a few batches), so the ancient ones are known late.
    for _ in range(30):
        if not await service.scan_for_delays(h.runtime.sessions, h.settings, T0):
            break
    fresh, _ = await pending(h)  # ship-by T0 + 1 day, behind the ancient ones in ship-by order
    announced: list[OrderDelayed] = []
    for minutes in range(1, 6):
        announced += await scan_at(h, SHIP_BY + minutes * timedelta(minutes=1), fresh)
    assert [n.stage for n in announced] == [DelayStage.DISPATCH]


async def test_a_lost_parcel_under_time_compression_is_escalated_a_few_times_then_left_alone(h: Harness) -> None:
    compressed = h.settings.model_copy(update={"time_compression": 1440.0})
    order, shipment = await pending(h)
    shipment = await dispatch(h, shipment, T0 + 2 * HOUR)
    notices: list[OrderDelayed] = []
    # A simulated month of scans every five (real) seconds: the parcel never arrives.
    at = PROMISE
    while at < PROMISE + 30 * DAY / 1440:
        at += timedelta(seconds=5)
        notices += [n for n in await service.scan_for_delays(h.runtime.sessions, compressed, at) if n.order_id == order]
    assert len(notices) == 1 + compressed.delay_max_escalations
    assert [": still late" in n.reason for n in notices] == [False, True, True, True]
    gaps = [b.occurred_at - a.occurred_at for a, b in itertools.pairwise(notices)]
    assert all(gap >= compressed.escalate_after for gap in gaps)
    state = (await h.client.get(f"/v1/shipments/{shipment['id']}")).json()
    assert state["late_delivery"] is True
