"""End to end on the real broker: order events in through the consumer, dispatch and
carrier webhooks over HTTP, order.shipped / order.delivered / order.delayed out through
the outbox relay, the delay scanner running as the app's background task."""

from __future__ import annotations

from datetime import timedelta

from fulfil import kafka
from fulfil.codec import encode
from fulfil.events import DelayStage, OrderDelayed, OrderEvent
from fulfil.testing import eventually, read_topic
from shipping_support import T0, allocated, harness, new_order_id, received


async def publish(bootstrap_settings: object, events: list[OrderEvent], *, repeat_last: bool = False) -> None:
    from fulfil.settings import ServiceSettings

    assert isinstance(bootstrap_settings, ServiceSettings)
    producer = kafka.producer(bootstrap_settings)
    await producer.start()
    try:
        records = [encode(event, source="/test/upstream")[1] for event in events]
        if repeat_last:
            records.append(records[-1])  # a redelivery: same ce_id
        for record in records:
            await producer.send_and_wait(
                bootstrap_settings.kafka_topic, record.value, key=record.key, headers=record.headers
            )
    finally:
        await producer.stop()


async def test_order_events_in_shipping_events_out(kafka_bootstrap: str, database_url: str, topic_name: str) -> None:
    async with harness(kafka_bootstrap, database_url, topic_name, delay_scan_seconds=0.05) as h:
        on_time, late = new_order_id(), new_order_id()
        await publish(
            h.settings,
            [
                received(on_time),
                allocated(on_time, warehouses=("wh-east", "wh-west")),
                received(late),
                allocated(late),
            ],
            repeat_last=True,
        )

        async def shipments_of_both() -> bool:
            return len(await h.shipments(on_time)) == 2 and len(await h.shipments(late)) == 1

        await eventually(shipments_of_both, timeout=30)

        h.clock.current = T0 + timedelta(hours=2)
        for shipment in await h.shipments(on_time):
            body = {"carrier": "acme", "tracking_number": "T-" + shipment["id"]}
            assert (await h.client.post(f"/v1/shipments/{shipment['id']}/dispatch", json=body)).status_code == 200
        # Delivered the same day, still before the late order's ship-by.
        h.clock.current = T0 + timedelta(hours=20)
        for shipment in await h.shipments(on_time):
            event = {
                "event_id": "e-" + shipment["id"],
                "tracking_number": "T-" + shipment["id"],
                "status": "delivered",
                "occurred_at": (T0 + timedelta(hours=20)).isoformat(),
            }
            assert (await h.post_carrier_event("acme", event)).status_code == 200

        # The background scanner sees the clock pass the late order's ship-by.
        h.clock.current = T0 + timedelta(hours=30)
        envelopes = await read_topic(kafka_bootstrap, topic_name, expect=5 + 2 + 2 + 1, timeout=30)
        ours = [e for e in envelopes if e.source == "/fulfil/shipping"]
        by_type: dict[str, list[str]] = {}
        for envelope in ours:
            by_type.setdefault(envelope.type, []).append(envelope.subject)
        assert sorted(by_type["order.shipped"]) == [on_time, on_time]
        assert sorted(by_type["order.delivered"]) == [on_time, on_time]
        (delay,) = [e.data for e in ours if e.type == "order.delayed"]
        assert isinstance(delay, OrderDelayed)
        assert delay.order_id == late
        assert delay.stage is DelayStage.DISPATCH
        # The redelivered allocation made no second shipment.
        assert len(await h.shipments(late)) == 1
