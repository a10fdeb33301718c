"""Prometheus metrics of the platform. Labels are bounded: never per order or SKU."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONSUMER_LAG = Gauge(
    "fulfil_consumer_lag_records",
    "Records in the partition not yet applied by the consumer group",
    ["group", "partition"],
)
EVENTS_APPLIED = Counter("fulfil_events_applied_total", "Events applied by a consumer group", ["group", "event_type"])
EVENTS_DUPLICATE = Counter(
    "fulfil_events_duplicate_total", "Redelivered events skipped because already applied", ["group"]
)
HANDLER_SECONDS = Histogram(
    "fulfil_handler_duration_seconds",
    "Time a handler took to apply one event",
    ["group", "event_type"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
HANDLER_FAILURES = Counter(
    "fulfil_handler_failures_total", "Failed attempts to apply an event", ["group", "event_type"]
)
DEAD_LETTERED = Counter("fulfil_dead_lettered_total", "Records sent to the dead-letter topic", ["group"])
OUTBOX_BACKLOG = Gauge("fulfil_outbox_backlog_rows", "Outbox rows not yet published", ["service"])
OUTBOX_PUBLISHED = Counter("fulfil_outbox_published_total", "Outbox rows published", ["service"])
OUTBOX_PUBLISH_FAILURES = Counter(
    "fulfil_outbox_publish_failures_total", "Failed attempts to publish an outbox batch", ["service"]
)
