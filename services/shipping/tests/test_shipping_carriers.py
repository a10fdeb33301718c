"""Carrier tracking webhooks: signatures, replays, out-of-order scans, delivery and exceptions."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from fulfil.events import DelayStage, OrderDelayed, OrderDelivered
from shipping.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from shipping_support import SECRET, T0, Harness, allocated, new_order_id, received

pytestmark = pytest.mark.asyncio(loop_scope="module")

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


async def shipped(h: Harness, carrier: str = "acme") -> tuple[str, dict[str, Any]]:
    """An order with one shipment dispatched an hour after T0; returns (order id, shipment)."""
    order = new_order_id()
    await h.apply(received(order))
    await h.apply(allocated(order))
    (shipment,) = await h.shipments(order)
    h.clock.advance(HOUR)
    tracking = "TRK-" + order
    response = await h.client.post(
        f"/v1/shipments/{shipment['id']}/dispatch", json={"carrier": carrier, "tracking_number": tracking}
    )
    assert response.status_code == 200, response.text
    # Carriers post scans after they happen: the scans below are all at most 40 h after T0.
    h.clock.current = T0 + 2 * DAY
    return order, response.json()


def scan(shipment: dict[str, Any], status: str, at_hours: float, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": f"{shipment['id']}-{status}-{at_hours}",
        "tracking_number": shipment["tracking_number"],
        "status": status,
        "occurred_at": (T0 + timedelta(hours=at_hours)).isoformat(),
        **extra,
    }


async def test_a_bad_stale_or_missing_signature_is_refused_with_401(h: Harness) -> None:
    _, shipment = await shipped(h)
    event = scan(shipment, "in_transit", 2)
    body = json.dumps(event).encode()
    now = int(h.clock.now().timestamp())
    url = "/v1/carriers/acme/events"

    async def post(headers: dict[str, str], content: bytes = body) -> int:
        response = await h.client.post(url, content=content, headers={"content-type": "application/json", **headers})
        if response.status_code == 401:
            assert response.headers["content-type"] == "application/problem+json"
        return response.status_code

    assert await post({TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: sign("not-the-secret", now, body)}) == 401
    tampered = body.replace(b"in_transit", b"delivered")
    assert await post({TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: sign(SECRET, now, body)}, tampered) == 401
    old = now - 301
    assert await post({TIMESTAMP_HEADER: str(old), SIGNATURE_HEADER: sign(SECRET, old, body)}) == 401
    assert await post({}) == 401
    # Unsigned junk is refused before its body is even looked at.
    assert await post({}, b'{"nonsense": true}') == 401
    assert (await h.post_carrier_event("nobody", event)).status_code == 404
    # The shipment did not move.
    assert (await h.client.get(f"/v1/shipments/{shipment['id']}")).json()["carrier_status"] is None

    within = now - 299
    assert await post({TIMESTAMP_HEADER: str(within), SIGNATURE_HEADER: sign(SECRET, within, body)}) == 200


async def test_a_replayed_event_id_is_a_no_op(h: Harness) -> None:
    order, shipment = await shipped(h)
    delivered = scan(shipment, "delivered", 30, signed_by="Han Meimei")
    first = await h.post_carrier_event("acme", delivered)
    assert first.status_code == 200
    assert first.json()["outcome"] == "applied"
    again = await h.post_carrier_event("acme", delivered)
    assert again.status_code == 200
    assert again.json()["outcome"] == "duplicate"
    assert len(await h.staged(order, "order.delivered")) == 1


async def test_delivery_publishes_order_delivered_with_damage_and_signature(h: Harness) -> None:
    order, shipment = await shipped(h)
    lines = [
        {"line_no": 1, "sku": "SKU-A", "qty_delivered": 2, "qty_damaged": 1},
        {"line_no": 2, "sku": "SKU-B", "qty_delivered": 1},
    ]
    response = await h.post_carrier_event("acme", scan(shipment, "delivered", 40, lines=lines, signed_by="Han Meimei"))
    assert response.status_code == 200, response.text
    (delivered,) = await h.staged(order, "order.delivered")
    assert isinstance(delivered, OrderDelivered)
    assert delivered.delivered_at == T0 + 40 * HOUR
    assert [(line.line_no, line.qty_delivered, line.qty_damaged) for line in delivered.lines] == [(1, 2, 1), (2, 1, 0)]
    now = (await h.client.get(f"/v1/shipments/{shipment['id']}")).json()
    assert now["status"] == "delivered"
    assert now["signed_by"] == "Han Meimei"
    assert now["late_delivery"] is False


async def test_delivery_without_lines_delivers_everything_shipped(h: Harness) -> None:
    order, shipment = await shipped(h)
    assert (await h.post_carrier_event("acme", scan(shipment, "delivered", 40))).status_code == 200
    (delivered,) = await h.staged(order, "order.delivered")
    assert isinstance(delivered, OrderDelivered)
    assert [(line.line_no, line.qty_delivered, line.qty_damaged) for line in delivered.lines] == [(1, 2, 0), (2, 1, 0)]


async def test_out_of_order_and_repeated_scans_never_move_a_shipment_backwards(h: Harness) -> None:
    order, shipment = await shipped(h)
    assert (await h.post_carrier_event("acme", scan(shipment, "out_for_delivery", 30))).json()["outcome"] == "applied"
    stale = await h.post_carrier_event("acme", scan(shipment, "in_transit", 10))
    assert stale.json()["outcome"] == "recorded"
    state = (await h.client.get(f"/v1/shipments/{shipment['id']}")).json()
    assert state["carrier_status"] == "out_for_delivery"

    assert (await h.post_carrier_event("acme", scan(shipment, "delivered", 32))).json()["outcome"] == "applied"
    # A second delivered scan (new event id) and a late exception change nothing and publish nothing.
    await h.post_carrier_event("acme", {**scan(shipment, "delivered", 33), "event_id": "dup-delivery-" + order})
    late_exception = scan(shipment, "exception", 34, reason="weather")
    assert (await h.post_carrier_event("acme", late_exception)).json()["outcome"] == "recorded"
    assert len(await h.staged(order, "order.delivered")) == 1
    assert await h.staged(order, "order.delayed") == []
    state = (await h.client.get(f"/v1/shipments/{shipment['id']}")).json()
    assert state["status"] == "delivered"
    kinds = [entry["kind"] for entry in state["timeline"]]
    assert kinds.count("carrier_delivered") == 2
    assert kinds.count("delivered") == 1


async def test_an_exception_publishes_order_delayed_and_moves_the_current_promise(h: Harness) -> None:
    order, shipment = await shipped(h)
    estimate = (T0 + 5 * 24 * HOUR).isoformat()
    event = scan(
        shipment, "exception", 20, reason="address_issue", description="no such street", estimated_delivery_at=estimate
    )
    assert (await h.post_carrier_event("acme", event)).status_code == 200
    (delayed,) = await h.staged(order, "order.delayed")
    assert isinstance(delayed, OrderDelayed)
    assert delayed.stage is DelayStage.CARRIER_EXCEPTION
    assert delayed.reason == "address_issue: no such street"
    assert delayed.new_estimate == T0 + 5 * 24 * HOUR
    assert delayed.occurred_at == T0 + 20 * HOUR
    state = (await h.client.get(f"/v1/shipments/{shipment['id']}")).json()
    assert state["promise_reason"] == "carrier_estimate"
    assert state["promised_delivery_at"] != state["original_promised_delivery_at"]
    change = next(entry for entry in state["timeline"] if entry["kind"] == "promise_changed")
    assert change["detail"]["reason"] == "carrier_estimate"

    no_reason = scan(shipment, "exception", 21)
    assert (await h.post_carrier_event("acme", no_reason)).status_code == 422
    unknown = {**scan(shipment, "in_transit", 22), "tracking_number": "NOPE"}
    assert (await h.post_carrier_event("acme", unknown)).status_code == 404


async def test_the_signature_is_checked_on_the_raw_body_before_it_is_parsed(h: Harness) -> None:
    url = "/v1/carriers/acme/events"
    now = int(h.clock.now().timestamp())
    junk = b'{"event_id": "x", "status":'
    headers = {"content-type": "application/json", TIMESTAMP_HEADER: str(now)}

    unsigned = await h.client.post(url, content=junk, headers=headers)
    assert unsigned.status_code == 401
    badly_signed = await h.client.post(
        url, content=junk, headers={**headers, SIGNATURE_HEADER: sign("not-the-secret", now, junk)}
    )
    assert badly_signed.status_code == 401
    assert badly_signed.headers["content-type"] == "application/problem+json"
    # Signed by the carrier but broken: now the carrier hears what is wrong with it.
    signed = await h.client.post(url, content=junk, headers={**headers, SIGNATURE_HEADER: sign(SECRET, now, junk)})
    assert signed.status_code == 400
    assert signed.headers["content-type"] == "application/problem+json"
    fields = json.dumps({"event_id": "x", "status": "teleported"}).encode()
    invalid = await h.client.post(url, content=fields, headers={**headers, SIGNATURE_HEADER: sign(SECRET, now, fields)})
    assert invalid.status_code == 422
    assert invalid.json()["type"].endswith("validation")
    # Ops see refusals per carrier and outcome.
    exposition = (await h.client.get("/metrics")).text
    for outcome in ("bad_signature", "invalid"):
        assert f'fulfil_shipping_carrier_events_total{{carrier="acme",outcome="{outcome}"}}' in exposition


async def test_the_webhook_body_schema_is_still_documented(h: Harness) -> None:
    spec = (await h.client.get("/openapi.json")).json()
    body = spec["paths"]["/v1/carriers/{carrier}/events"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/CarrierEvent"
    schemas = spec["components"]["schemas"]
    assert {"event_id", "tracking_number", "status", "occurred_at"} <= set(schemas["CarrierEvent"]["properties"])
    assert "DeliveredLine" in schemas


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([{"line_no": 9, "sku": "SKU-Z", "qty_delivered": 1}], "not shipped"),
        ([{"line_no": 1, "sku": "SKU-A", "qty_delivered": 5}], "5 delivered, 2 shipped"),
        ([{"line_no": 1, "sku": "SKU-A", "qty_delivered": 1, "qty_damaged": 2}], "2 damaged of 1"),
        ([], "at least one line"),
    ],
    ids=["unknown-line", "more-than-shipped", "damaged-more-than-delivered", "no-lines"],
)
async def test_delivered_lines_that_do_not_match_the_parcel_are_refused(
    h: Harness, lines: list[dict[str, Any]], message: str
) -> None:
    order, shipment = await shipped(h)
    response = await h.post_carrier_event("acme", scan(shipment, "delivered", 30, lines=lines))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("invalid-carrier-event")
    assert message in response.json()["detail"]
    assert await h.staged(order, "order.delivered") == []
    state = (await h.client.get(f"/v1/shipments/{shipment['id']}")).json()
    assert (state["status"], state["carrier_status"]) == ("shipped", None)
    # Corrected, the same event id goes through: a refusal is not remembered as a replay.
    fixed = scan(shipment, "delivered", 30, lines=[{"line_no": 1, "sku": "SKU-A", "qty_delivered": 2}])
    assert (await h.post_carrier_event("acme", fixed)).json()["outcome"] == "applied"


async def test_repeated_exception_scans_are_announced_once_per_reason(h: Harness) -> None:
    order, shipment = await shipped(h)
    for n, hours in enumerate((3, 4, 5)):
        event = {**scan(shipment, "exception", hours, reason="weather"), "event_id": f"wx-{n}-{order}"}
        assert (await h.post_carrier_event("acme", event)).json()["outcome"] == "applied"
    customs = scan(shipment, "exception", 6, reason="customs")
    assert (await h.post_carrier_event("acme", customs)).status_code == 200
    delays = [e for e in await h.staged(order, "order.delayed") if isinstance(e, OrderDelayed)]
    assert [d.reason for d in delays] == ["weather", "customs"]
    state = (await h.client.get(f"/v1/shipments/{shipment['id']}")).json()
    announced = [e["detail"]["announced"] for e in state["timeline"] if e["kind"] == "carrier_exception"]
    assert announced == [True, False, False, True]


async def test_the_same_exception_is_escalated_after_the_further_delay_or_a_later_estimate_and_then_stops(
    h: Harness,
) -> None:
    order, shipment = await shipped(h)
    h.clock.current = T0 + 30 * DAY

    async def weather(n: int, at_hours: float, **extra: Any) -> None:
        event = {**scan(shipment, "exception", at_hours, reason="weather", **extra), "event_id": f"w{n}-{order}"}
        assert (await h.post_carrier_event("acme", event)).status_code == 200

    await weather(0, 2)
    await weather(1, 10)  # same trouble, same day: silent
    await weather(2, 10.5, estimated_delivery_at=(T0 + 6 * DAY).isoformat())  # the estimate slips: told
    await weather(3, 11, estimated_delivery_at=(T0 + 5 * DAY).isoformat())  # better news: silent
    await weather(4, 10.5 + 20)  # less than a day after the last notice: silent
    await weather(5, 10.5 + 24)  # a day after it: escalation
    for n in range(6, 14):
        await weather(n, 10.5 + 24 * (n - 4))  # daily, but the cap (3 escalations) ends it
    delays = [e for e in await h.staged(order, "order.delayed") if isinstance(e, OrderDelayed)]
    assert len(delays) == 1 + h.settings.delay_max_escalations
    assert [d.occurred_at for d in delays] == [T0 + hours * HOUR for hours in (2, 10.5, 34.5, 58.5)]
    assert delays[1].new_estimate == T0 + 6 * DAY
    assert all(d.reason.startswith("weather: still late") for d in delays[1:])


async def test_carrier_event_times_are_bounded(h: Harness) -> None:
    order, shipment = await shipped(h)  # left at T0 + 1 h; the clock is at T0 + 2 days
    shipped_at = T0 + HOUR

    future = scan(shipment, "in_transit", 48 + 0.5)
    response = await h.post_carrier_event("acme", future)
    assert response.status_code == 422
    assert "in the future" in response.json()["detail"]
    within_skew = scan(shipment, "in_transit", 48 + 4 / 60)
    assert (await h.post_carrier_event("acme", within_skew)).status_code == 200

    before = scan(shipment, "out_for_delivery", 0.5)
    response = await h.post_carrier_event("acme", before)
    assert response.status_code == 422
    assert "before the shipment left" in response.json()["detail"]

    stale_estimate = scan(shipment, "exception", 20, reason="weather", estimated_delivery_at=(T0 + HOUR).isoformat())
    assert (await h.post_carrier_event("acme", stale_estimate)).status_code == 422

    # A scan a few minutes before the recorded dispatch (clock skew) is clamped to it.
    clamped = {**scan(shipment, "delivered", 1 - 3 / 60), "event_id": "early-" + order}
    assert (await h.post_carrier_event("acme", clamped)).json()["outcome"] == "applied"
    (delivered,) = await h.staged(order, "order.delivered")
    assert isinstance(delivered, OrderDelivered)
    assert delivered.delivered_at == shipped_at
    state = (await h.client.get(f"/v1/shipments/{shipment['id']}")).json()
    entry = next(e for e in state["timeline"] if e["kind"] == "carrier_delivered")
    assert entry["detail"]["clamped_from"] == (T0 + HOUR - 3 * timedelta(minutes=1)).isoformat()
