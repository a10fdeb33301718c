"""/metrics in Prometheus conventions: every KPI value can go down, so none is a counter."""

from __future__ import annotations

from fulfil.events import OrderCancelled
from kpi import domain
from kpi.live import METRIC_DIMENSIONS, KpiCollector, LiveState, MetricsSnapshot
from kpi_scenario import h, scenario_events
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


def snapshot_of(events: list[domain.OrderEvent]) -> MetricsSnapshot:
    scored = [domain.score(f) for f in domain.facts_by_order(events).values()]
    groups = {d: domain.aggregate_by(scored, d) for d in METRIC_DIMENSIONS}
    return MetricsSnapshot(domain.aggregate(scored), groups, unreceived=0)


def exposition(snapshot: MetricsSnapshot) -> tuple[str, dict[str, Metric]]:
    live = LiveState()
    live.metrics = snapshot
    collector = KpiCollector()
    collector.live = live
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return text, {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict[str, Metric], name: str, **labels: str) -> float:
    family = families[name]
    return next(s.value for s in family.samples if s.name == name and s.labels == labels)


def test_kpi_values_that_can_go_down_are_gauges() -> None:
    text, before = exposition(snapshot_of(scenario_events()))
    # The open order O9 is cancelled: it leaves the open orders and its stage durations go
    # (it stays in the fill and backorder rates: what inventory did for it still counts).
    cancelled = OrderCancelled(order_id="O9", occurred_at=h(2), reason="no longer needed")
    _, after = exposition(snapshot_of([*scenario_events(), cancelled]))
    assert value(before, "fulfil_kpi_open_orders", stage="warehouse") == 1
    assert value(after, "fulfil_kpi_open_orders", stage="warehouse") == 0
    assert value(before, "fulfil_kpi_orders", state="open") == 4
    assert value(after, "fulfil_kpi_orders", state="open") == 3
    # Transmission (placed -> received) of every received order but the cancelled O8, then O9.
    assert value(before, "fulfil_kpi_duration_seconds_gcount", stage="transmission") == 12
    assert value(after, "fulfil_kpi_duration_seconds_gcount", stage="transmission") == 11
    # Was 12 -> 11 when a cancellation took an order out of every rate; now O8 and O9 both stay.
    assert value(before, "fulfil_kpi_denominator", criterion="backorder_rate") == 13
    assert value(after, "fulfil_kpi_denominator", criterion="backorder_rate") == 13
    for name in (
        "fulfil_kpi_ratio",
        "fulfil_kpi_numerator",
        "fulfil_kpi_denominator",
        "fulfil_kpi_perfect_order_failures",
        "fulfil_kpi_open_orders",
        "fulfil_kpi_orders",
        "fulfil_kpi_ratio_by_warehouse",
        "fulfil_kpi_duration_seconds_gcount",
        "fulfil_kpi_duration_seconds_gsum",
    ):
        assert before[name].type == "gauge", name
    # A gauge histogram: buckets that may go down, with _gcount/_gsum instead of counter-like _count/_sum.
    assert before["fulfil_kpi_duration_seconds"].type == "histogram"
    assert 'fulfil_kpi_duration_seconds_bucket{le="+Inf",stage="cycle_time"} 8.0' in text
    assert 'fulfil_kpi_duration_seconds_gcount{stage="cycle_time"} 8.0' in text
    assert "_total" not in text
    assert "fulfil_kpi_duration_seconds_count" not in text


def test_only_the_settled_orders_count_is_a_counter() -> None:
    from prometheus_client import REGISTRY

    text = generate_latest(REGISTRY).decode()
    kpi_counters = {
        line.split()[2]
        for line in text.splitlines()
        if line.startswith("# TYPE fulfil_kpi") and line.endswith("counter")
    }
    assert kpi_counters == {"fulfil_kpi_orders_settled_total"}
    assert "fulfil_kpi_orders_settled_total" in text
