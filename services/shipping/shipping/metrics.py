"""Prometheus metrics of the shipping service (served on /metrics with the platform's).
Labels are bounded: configured carriers, outcomes and stages, never a shipment or order."""

from __future__ import annotations

from prometheus_client import Counter

CARRIER_EVENTS = Counter(
    "fulfil_shipping_carrier_events_total",
    "Carrier tracking webhooks by outcome: applied, recorded (older scan), duplicate, "
    "bad_signature, invalid (refused with 4xx after the signature check)",
    ["carrier", "outcome"],
)
DELAY_NOTICES = Counter(
    "fulfil_shipping_delay_notices_total",
    "order.delayed notices staged, by stage, first notice or escalation",
    ["stage", "escalation"],
)
