"""Shipments from allocations, warehouse dispatch and cancellation, on a real database."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta

import pytest
from fulfil.events import DelayStage, OrderShipped, ServiceLevel
from shipping import service
from shipping.models import ShipmentRow
from shipping_support import T0, Harness, allocated, cancelled, new_order_id, received
from sqlalchemy.exc import IntegrityError

pytestmark = pytest.mark.asyncio(loop_scope="module")

DAY = timedelta(days=1)


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value).astimezone(UTC)


async def test_a_split_allocation_makes_one_pending_shipment_per_warehouse(h: Harness) -> None:
    order = new_order_id()
    await h.apply(received(order, service_level=ServiceLevel.EXPRESS, requested=date(2026, 3, 20)))
    await h.apply(allocated(order, at=T0 + timedelta(hours=1), warehouses=("wh-east", "wh-west")))

    items = await h.shipments(order)
    assert [(s["warehouse_id"], s["status"]) for s in items] == [("wh-east", "pending"), ("wh-west", "pending")]
    east, west = items
    assert [line["line_no"] for line in east["lines"]] == [1]
    assert [line["line_no"] for line in west["lines"]] == [2]
    assert ts(east["ship_by"]) == T0 + timedelta(hours=25)
    assert ts(west["ship_by"]) == T0 + timedelta(hours=49)
    # The requested date can be met from both warehouses, so it is the promise.
    assert ts(east["promised_delivery_at"]) == datetime(2026, 3, 20, 23, 59, 59, tzinfo=UTC)
    assert east["promise_reason"] == "requested_delivery_date"
    assert east["original_promised_delivery_at"] == east["promised_delivery_at"]
    assert east["service_level"] == "express"

    detail = (await h.client.get(f"/v1/shipments/{east['id']}")).json()
    assert [entry["kind"] for entry in detail["timeline"]] == ["created"]
    missing = await h.client.get("/v1/shipments/shp_nope")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"


async def test_an_allocation_for_an_order_never_received_uses_the_standard_defaults(h: Harness) -> None:
    order = new_order_id()
    await h.apply(allocated(order))
    (shipment,) = await h.shipments(order)
    assert ts(shipment["promised_delivery_at"]) == T0 + DAY + 3 * DAY
    assert shipment["promise_reason"] == "order_terms_unknown"
    assert shipment["service_level"] == "standard"

    # The order's terms turn up after all (express): the placeholder promise is replaced.
    await h.apply(received(order, at=T0 + timedelta(minutes=10), service_level=ServiceLevel.EXPRESS))
    (shipment,) = await h.shipments(order)
    assert ts(shipment["promised_delivery_at"]) == T0 + DAY + DAY
    assert ts(shipment["original_promised_delivery_at"]) == T0 + DAY + DAY
    assert shipment["promise_reason"] == "service_level_transit"
    assert shipment["service_level"] == "express"


async def test_ship_by_follows_the_handling_time_inventory_announces_unless_shipping_overrides_it(
    h: Harness,
) -> None:
    order = new_order_id()
    split = allocated(order, warehouses=("wh-east", "wh-west"))
    await h.apply(split.model_copy(update={"handling_hours": {"wh-east": 6, "wh-west": 6}}))
    east, west = await h.shipments(order)
    assert ts(east["ship_by"]) == T0 + timedelta(hours=6)  # as inventory keeps it for wh-east
    assert ts(west["ship_by"]) == T0 + timedelta(hours=48)  # shipping's override for wh-west wins
    assert ts(east["promised_delivery_at"]) == T0 + timedelta(hours=6) + 3 * DAY

    # The order's terms, seen late, move the promise; the ship-by stays what the allocation set.
    await h.apply(received(order, at=T0 + timedelta(minutes=10), service_level=ServiceLevel.EXPRESS))
    east, west = await h.shipments(order)
    assert ts(east["ship_by"]) == T0 + timedelta(hours=6)
    assert ts(east["promised_delivery_at"]) == T0 + timedelta(hours=6) + DAY
    assert ts(west["promised_delivery_at"]) == T0 + timedelta(hours=48) + DAY

    # A warehouse the allocation names no handling time for gets the service-wide default.
    other = new_order_id()
    await h.apply(allocated(other, warehouses=("wh-south",)))
    (south,) = await h.shipments(other)
    assert ts(south["ship_by"]) == T0 + DAY


async def test_dispatch_stages_order_shipped_once_and_is_idempotent(h: Harness) -> None:
    order = new_order_id()
    await h.apply(received(order))
    await h.apply(allocated(order))
    (shipment,) = await h.shipments(order)
    h.clock.advance(timedelta(hours=2))
    body = {"carrier": "acme", "tracking_number": "TRK-1"}

    first = await h.client.post(f"/v1/shipments/{shipment['id']}/dispatch", json=body)
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "shipped"
    assert first.json()["late_dispatch"] is False
    again = await h.client.post(f"/v1/shipments/{shipment['id']}/dispatch", json=body)
    assert again.status_code == 200
    assert again.json()["shipped_at"] == first.json()["shipped_at"]

    (shipped,) = await h.staged(order, "order.shipped")
    assert isinstance(shipped, OrderShipped)
    assert shipped.shipment_id == shipment["id"]
    assert shipped.occurred_at == T0 + timedelta(hours=2)
    assert shipped.ship_by == T0 + DAY
    assert shipped.promised_delivery_at == T0 + 4 * DAY
    assert [(line.line_no, line.qty) for line in shipped.lines] == [(1, 2), (2, 1)]

    other = await h.client.post(
        f"/v1/shipments/{shipment['id']}/dispatch", json={"carrier": "acme", "tracking_number": "TRK-2"}
    )
    assert other.status_code == 409
    assert other.headers["content-type"] == "application/problem+json"
    assert len(await h.staged(order, "order.shipped")) == 1


async def test_concurrent_dispatches_publish_one_order_shipped(h: Harness) -> None:
    order = new_order_id()
    await h.apply(allocated(order))
    (shipment,) = await h.shipments(order)
    body = {"carrier": "acme", "tracking_number": "TRK-C"}
    responses = await asyncio.gather(
        *[h.client.post(f"/v1/shipments/{shipment['id']}/dispatch", json=body) for _ in range(5)]
    )
    assert [r.status_code for r in responses] == [200] * 5
    assert len(await h.staged(order, "order.shipped")) == 1


async def test_dispatch_refusals(h: Harness) -> None:
    order = new_order_id()
    await h.apply(allocated(order))
    (shipment,) = await h.shipments(order)
    url = f"/v1/shipments/{shipment['id']}/dispatch"

    too_many = {"carrier": "acme", "tracking_number": "T", "lines": [{"line_no": 1, "sku": "SKU-A", "qty": 9}]}
    assert (await h.client.post(url, json=too_many)).status_code == 422
    unknown_carrier = await h.client.post(url, json={"carrier": "nobody", "tracking_number": "T"})
    assert unknown_carrier.status_code == 422
    future = (h.clock.now() + DAY).isoformat()
    assert (
        await h.client.post(url, json={"carrier": "acme", "tracking_number": "T", "dispatched_at": future})
    ).status_code == 422
    before_allocation = (T0 - timedelta(hours=1)).isoformat()
    refused = await h.client.post(
        url, json={"carrier": "acme", "tracking_number": "T", "dispatched_at": before_allocation}
    )
    assert refused.status_code == 422
    assert "before the allocation" in refused.json()["detail"]
    assert (
        await h.client.post("/v1/shipments/shp_nope/dispatch", json={"carrier": "acme", "tracking_number": "T"})
    ).status_code == 404
    assert await h.staged(order, "order.shipped") == []


async def test_a_partial_dispatch_leaves_the_rest_pending_with_its_ship_by(h: Harness) -> None:
    order = new_order_id()
    await h.apply(received(order))
    await h.apply(allocated(order))
    (shipment,) = await h.shipments(order)
    h.clock.advance(timedelta(hours=2))
    some = {"carrier": "acme", "tracking_number": "P-" + order, "lines": [{"line_no": 1, "sku": "SKU-A", "qty": 1}]}
    response = await h.client.post(f"/v1/shipments/{shipment['id']}/dispatch", json=some)
    assert response.status_code == 200, response.text
    sent = response.json()
    assert sent["status"] == "shipped"
    assert sent["shipped_lines"] == [{"line_no": 1, "sku": "SKU-A", "qty": 1}]
    assert sent["lines"] == sent["shipped_lines"]
    (shipped,) = await h.staged(order, "order.shipped")
    assert isinstance(shipped, OrderShipped)
    assert [(line.line_no, line.qty) for line in shipped.lines] == [(1, 1)]

    # Nothing is lost: one unit of line 1 and all of line 2 wait in a pending shipment.
    rest_id = sent["remainder_shipment_id"]
    rest = (await h.client.get(f"/v1/shipments/{rest_id}")).json()
    assert rest["status"] == "pending"
    assert rest["parent_shipment_id"] == shipment["id"]
    assert [(line["line_no"], line["qty"]) for line in rest["lines"]] == [(1, 1), (2, 1)]
    for kept in ("ship_by", "original_promised_delivery_at", "promised_delivery_at", "service_level", "allocated_at"):
        assert rest[kept] == shipment[kept]
    assert {s["id"] for s in await h.shipments(order)} == {shipment["id"], rest_id}
    # A retry of the same partial dispatch changes nothing.
    again = await h.client.post(f"/v1/shipments/{shipment['id']}/dispatch", json=some)
    assert again.status_code == 200
    assert len(await h.shipments(order)) == 2

    # The rest is watched like any pending shipment: late after the same ship-by.
    ship_by = ts(shipment["ship_by"])
    notices = await service.scan_for_delays(h.runtime.sessions, h.settings, ship_by + timedelta(hours=1))
    assert [(n.shipment_id, n.stage) for n in notices if n.order_id == order] == [(rest_id, DelayStage.DISPATCH)]

    later = {"carrier": "acme", "tracking_number": "P2-" + order}
    h.clock.current = ship_by + timedelta(hours=2)
    rest_sent = await h.client.post(f"/v1/shipments/{rest_id}/dispatch", json=later)
    assert rest_sent.status_code == 200, rest_sent.text
    assert rest_sent.json()["late_dispatch"] is True
    assert rest_sent.json()["remainder_shipment_id"] is None
    events = [e for e in await h.staged(order, "order.shipped") if isinstance(e, OrderShipped)]
    units = [(line.line_no, line.qty) for e in events for line in e.lines]
    assert sorted(units) == [(1, 1), (1, 1), (2, 1)]


async def test_a_dispatch_delay_announced_before_a_split_is_not_announced_again_for_the_rest(h: Harness) -> None:
    order = new_order_id()
    await h.apply(allocated(order))
    (shipment,) = await h.shipments(order)
    ship_by = ts(shipment["ship_by"])
    first = await service.scan_for_delays(h.runtime.sessions, h.settings, ship_by + timedelta(hours=1))
    assert [n.shipment_id for n in first if n.order_id == order] == [shipment["id"]]
    h.clock.current = ship_by + timedelta(hours=2)
    some = {"carrier": "acme", "tracking_number": "S-" + order, "lines": [{"line_no": 2, "sku": "SKU-B", "qty": 1}]}
    sent = (await h.client.post(f"/v1/shipments/{shipment['id']}/dispatch", json=some)).json()
    rest = (await h.client.get(f"/v1/shipments/{sent['remainder_shipment_id']}")).json()
    assert rest["late_dispatch"] is True
    soon = await service.scan_for_delays(h.runtime.sessions, h.settings, ship_by + timedelta(hours=3))
    assert [n for n in soon if n.order_id == order] == []
    # ... but it is escalated on the usual cadence.
    escalated = await service.scan_for_delays(h.runtime.sessions, h.settings, ship_by + timedelta(hours=26))
    ours = [n for n in escalated if n.order_id == order]
    assert [(n.shipment_id, ": still late" in n.reason) for n in ours] == [(rest["id"], True)]


async def test_a_tracking_number_names_one_parcel(h: Harness) -> None:
    first, second = new_order_id(), new_order_id()
    for order in (first, second):
        await h.apply(allocated(order))
    (one,) = await h.shipments(first)
    (two,) = await h.shipments(second)
    body = {"carrier": "acme", "tracking_number": "SAME-" + first}
    assert (await h.client.post(f"/v1/shipments/{one['id']}/dispatch", json=body)).status_code == 200
    taken = await h.client.post(f"/v1/shipments/{two['id']}/dispatch", json=body)
    assert taken.status_code == 409
    assert taken.headers["content-type"] == "application/problem+json"
    assert one["id"] in taken.json()["detail"]
    assert (await h.client.get(f"/v1/shipments/{two['id']}")).json()["status"] == "pending"
    assert await h.staged(second, "order.shipped") == []
    # Also when only part of the shipment would have left: no remainder, nothing staged.
    part = {**body, "lines": [{"line_no": 1, "sku": "SKU-A", "qty": 1}]}
    partly = await h.client.post(f"/v1/shipments/{two['id']}/dispatch", json=part)
    assert partly.status_code == 409, partly.text
    assert [s["id"] for s in await h.shipments(second)] == [two["id"]]
    # Another carrier may use the same number.
    other = {"carrier": "simcarrier", "tracking_number": "SAME-" + first}
    assert (await h.client.post(f"/v1/shipments/{two['id']}/dispatch", json=other)).status_code == 200


async def test_the_database_refuses_a_second_parcel_with_the_same_tracking_number(h: Harness) -> None:
    order = new_order_id()
    await h.apply(allocated(order, warehouses=("wh-east", "wh-west")))
    east, west = await h.shipments(order)
    async with h.runtime.sessions() as session:
        for shipment_id in (east["id"], west["id"]):
            row = await session.get(ShipmentRow, shipment_id)
            assert row is not None
            row.carrier, row.tracking_number = "acme", "DUP-" + order
            session.add(row)
        with pytest.raises(IntegrityError):
            await session.commit()


async def test_concurrent_dispatches_with_one_tracking_number_ship_one_parcel(h: Harness) -> None:
    orders = [new_order_id() for _ in range(4)]
    for order in orders:
        await h.apply(allocated(order))
    ids = [(await h.shipments(order))[0]["id"] for order in orders]
    body = {"carrier": "acme", "tracking_number": "RACE-" + orders[0]}
    responses = await asyncio.gather(*[h.client.post(f"/v1/shipments/{i}/dispatch", json=body) for i in ids])
    assert sorted(r.status_code for r in responses) == [200, 409, 409, 409]
    shipped = [e for order in orders for e in await h.staged(order, "order.shipped")]
    assert len(shipped) == 1


async def test_a_slower_carrier_at_dispatch_moves_the_current_promise_not_the_original(h: Harness) -> None:
    order = new_order_id()
    await h.apply(received(order, service_level=ServiceLevel.EXPRESS))
    await h.apply(allocated(order))
    (shipment,) = await h.shipments(order)
    assert ts(shipment["promised_delivery_at"]) == T0 + 2 * DAY  # acme, the usual carrier: express 1 day
    h.clock.advance(timedelta(hours=3))
    # simcarrier takes 2 days for express (see shipping_support).
    body = {"carrier": "simcarrier", "tracking_number": "SLOW-" + order}
    sent = (await h.client.post(f"/v1/shipments/{shipment['id']}/dispatch", json=body)).json()
    assert ts(sent["original_promised_delivery_at"]) == T0 + 2 * DAY
    assert ts(sent["promised_delivery_at"]) == T0 + DAY + 2 * DAY
    assert sent["promise_reason"] == "dispatch_carrier_transit"
    change = next(e for e in sent["timeline"] if e["kind"] == "promise_changed")
    assert change["detail"]["reason"] == "dispatch_carrier_transit"
    (shipped,) = await h.staged(order, "order.shipped")
    assert isinstance(shipped, OrderShipped)
    assert shipped.promised_delivery_at == T0 + 2 * DAY  # what was promised

    usual = new_order_id()
    await h.apply(received(usual, service_level=ServiceLevel.EXPRESS))
    await h.apply(allocated(usual))
    (same,) = await h.shipments(usual)
    kept = await h.client.post(
        f"/v1/shipments/{same['id']}/dispatch", json={"carrier": "acme", "tracking_number": "U-" + usual}
    )
    assert kept.json()["promise_reason"] == "service_level_transit"


async def test_a_compressed_demo_compresses_requested_dates_too(h: Harness) -> None:
    compressed = h.settings.model_copy(update={"time_compression": 288.0})
    order = new_order_id()
    async with h.runtime.sessions() as session, session.begin():
        await service.record_order_terms(session, compressed, received(order, requested=date(2026, 3, 12)))
        await service.create_shipments(session, compressed, allocated(order), event_id="e-" + order)
    (shipment,) = await h.shipments(order)
    promised = ts(shipment["promised_delivery_at"])
    placed = T0 - timedelta(minutes=5)
    assert promised == placed + (datetime(2026, 3, 12, 23, 59, 59, tzinfo=UTC) - placed) / 288
    assert promised - T0 < timedelta(hours=1)  # not days away in real time
    assert shipment["promise_reason"] == "requested_delivery_date"


async def test_shipments_are_listed_page_by_page(h: Harness) -> None:
    order = new_order_id()
    for hour in range(5):
        await h.apply(allocated(order, at=T0 + timedelta(hours=hour), warehouses=("wh-east", "wh-west")))
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"order_id": order, "limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = (await h.client.get("/v1/shipments", params=params)).json()
        seen.extend(item["id"] for item in page["items"])
        cursor = page.get("next_cursor")
        if not cursor:
            break
    everything = [s["id"] for s in await h.shipments(order)]
    assert len(everything) == 10
    assert seen == everything
    bad = await h.client.get("/v1/shipments", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 400
    assert bad.headers["content-type"] == "application/problem+json"


async def test_cancellation_cancels_pending_shipments_and_leaves_dispatched_ones(h: Harness) -> None:
    order = new_order_id()
    await h.apply(received(order))
    await h.apply(allocated(order, warehouses=("wh-east", "wh-west")))
    east, west = await h.shipments(order)
    dispatched = await h.client.post(
        f"/v1/shipments/{east['id']}/dispatch", json={"carrier": "acme", "tracking_number": "TRK-E"}
    )
    assert dispatched.status_code == 200

    await h.apply(cancelled(order, at=T0 + timedelta(hours=3)))

    east_now = (await h.client.get(f"/v1/shipments/{east['id']}")).json()
    west_now = (await h.client.get(f"/v1/shipments/{west['id']}")).json()
    assert east_now["status"] == "shipped"
    assert east_now["timeline"][-1]["kind"] == "cancel_refused"
    assert west_now["status"] == "cancelled"
    assert ts(west_now["cancelled_at"]) == T0 + timedelta(hours=3)

    refused = await h.client.post(
        f"/v1/shipments/{west['id']}/dispatch", json={"carrier": "acme", "tracking_number": "TRK-W-" + order}
    )
    assert refused.status_code == 409
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"].endswith("shipment-cancelled")
    assert len(await h.staged(order, "order.shipped")) == 1


async def test_a_cancellation_that_arrives_before_the_allocation_wins_the_race(h: Harness) -> None:
    order = new_order_id()
    await h.apply(received(order))
    await h.apply(cancelled(order, at=T0 + timedelta(minutes=1)))
    await h.apply(allocated(order, at=T0 + timedelta(minutes=2)))
    assert await h.shipments(order) == []
    # Even an order shipping never heard of: cancel first, then allocation.
    stranger = new_order_id()
    await h.apply(cancelled(stranger))
    await h.apply(allocated(stranger, warehouses=("wh-east", "wh-west")))
    assert await h.shipments(stranger) == []


async def test_dispatch_racing_a_cancellation_ends_one_way_or_the_other(h: Harness) -> None:
    for _ in range(5):
        order = new_order_id()
        await h.apply(allocated(order))
        (shipment,) = await h.shipments(order)
        body = {"carrier": "acme", "tracking_number": "R-" + order}
        response, _ = await asyncio.gather(
            h.client.post(f"/v1/shipments/{shipment['id']}/dispatch", json=body), h.apply(cancelled(order))
        )
        final = (await h.client.get(f"/v1/shipments/{shipment['id']}")).json()
        shipped = await h.staged(order, "order.shipped")
        if response.status_code == 200:
            assert final["status"] == "shipped"
            assert final["timeline"][-1]["kind"] == "cancel_refused"
            assert len(shipped) == 1
        else:
            assert response.status_code == 409
            assert final["status"] == "cancelled"
            assert shipped == []


async def test_the_webhook_signature_headers_are_documented(h: Harness) -> None:
    spec = (await h.client.get("/openapi.json")).json()
    operation = spec["paths"]["/v1/carriers/{carrier}/events"]["post"]
    headers = {p["name"] for p in operation["parameters"] if p["in"] == "header"}
    assert headers == {"X-Carrier-Timestamp", "X-Carrier-Signature"}
    assert "401" in operation["responses"]
    assert "409" in spec["paths"]["/v1/shipments/{shipment_id}/dispatch"]["post"]["responses"]
