"""The live KPI summaries (one per window): refreshed from the aggregates when they
change (at most once a second), pushed to SSE clients and exposed on /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fulfil.service import Runtime
from prometheus_client import Counter
from prometheus_client.core import REGISTRY, GaugeHistogramMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlmodel.ext.asyncio.session import AsyncSession

from kpi import domain, service
from kpi.cohorts import Window
from kpi.domain import Aggregate, Dimension, Kpi, Series, Stage
from kpi.service import Clock

log = logging.getLogger(__name__)

REFRESH_SECONDS = 1.0
"""Minimum time between two refreshes (and so between two SSE messages of a window)."""
MAX_BUSY_SHARE = 0.1
"""Under load, refresh at most this share of the time (a refresh reads a few hundred rows)."""
FULL_REFRESH_SECONDS = 15.0
"""Recompute even without changes: rolling windows move with the clock."""
KEEP_ALIVE_SECONDS = 15.0
RETRY_MS = 3000
METRIC_DIMENSIONS = (Dimension.TIER, Dimension.WAREHOUSE, Dimension.CARRIER)

ORDERS_SETTLED = Counter(
    "fulfil_kpi_orders_settled_total", "Orders whose per-order state was settled into the aggregates"
)


@dataclass
class MetricsSnapshot:
    """What /metrics exposes: the all-time aggregates, overall and per bounded dimension."""

    overall: Aggregate
    groups: dict[Dimension, dict[str, Aggregate]]
    unreceived: int


@dataclass
class LiveState:
    summaries: dict[Window, dict[str, Any]] = field(default_factory=dict)
    versions: dict[Window, int] = field(default_factory=lambda: dict.fromkeys(Window, 0))
    metrics: MetricsSnapshot | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    aggregates_changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by the fold when it added changes to the aggregates (and when a window gets a watcher)."""
    watchers: dict[Window, int] = field(default_factory=lambda: dict.fromkeys(Window, 0))
    """SSE clients per window: windows nobody watches are not refreshed (all always is, for /metrics)."""

    def watched(self) -> list[Window]:
        return [window for window in Window if window is Window.ALL or self.watchers[window]]

    async def publish(self, window: Window, summary: dict[str, Any]) -> bool:
        """Store a window's summary; True (and a new version) when it differs from the last."""
        previous = self.summaries.get(window)
        if previous is not None and _comparable(previous) == _comparable(summary):
            return False
        async with self.changed:
            self.summaries[window] = summary
            self.versions[window] += 1
            self.changed.notify_all()
        return True


def _comparable(summary: dict[str, Any]) -> dict[str, Any]:
    # as_of changes every time; compare the rest.
    return {k: v for k, v in summary.items() if k != "as_of"}


def _groups(groups: dict[str, Aggregate]) -> list[dict[str, Any]]:
    return [
        {"group": key, **service.summary_of(total).model_dump(mode="json", include={"orders_received", "kpis"})}
        for key, total in groups.items()
    ]


async def build_summary(
    session: AsyncSession, window: Window, now: datetime
) -> tuple[dict[str, Any], Aggregate, dict[Dimension, dict[str, Aggregate]]]:
    """What the dashboard shows for one window: headline rates, distributions, backlog
    (the window's open orders, consistent with orders_open) and breakdowns."""
    total = await service.load_overall(session, window, now)
    groups = {
        dimension: await service.load_totals(session, window, now, dimension, (domain.COUNTS,))
        for dimension in (Dimension.WAREHOUSE, Dimension.CARRIER)
    }
    since = service.window_since(window, now)
    backlog = await service.open_orders(session, domain.RECEIVED_OPEN_STAGES, now, 1, received_since=since)
    summary = {
        "window": str(window),
        "since": since.isoformat() if since else None,
        "as_of": now.isoformat(),
        "overall": service.summary_of(total).model_dump(mode="json"),
        "cycle_time": [d.model_dump(mode="json") for d in service.distributions_of(total)],
        "by_warehouse": _groups(groups[Dimension.WAREHOUSE]),
        "by_carrier": _groups(groups[Dimension.CARRIER]),
        "oldest_open": backlog.oldest.model_dump(mode="json") if backlog.oldest else None,
    }
    return summary, total, groups


async def refresh_once(runtime: Runtime, live: LiveState, clock: Clock) -> bool:
    """Recompute every window's summary and the metrics; True when a summary changed."""
    now = clock()
    changed = False
    async with runtime.read_sessions() as session:
        for window in live.watched():
            summary, total, groups = await build_summary(session, window, now)
            changed |= await live.publish(window, summary)
            if window is Window.ALL:
                groups[Dimension.TIER] = await service.load_totals(
                    session, window, now, Dimension.TIER, (domain.COUNTS,)
                )
                unreceived = await service.open_orders(session, [Stage.UNRECEIVED], now, 1)
                live.metrics = MetricsSnapshot(total, groups, unreceived.count)
    return changed


async def refresh_loop(runtime: Runtime) -> None:
    """Recompute the live summaries when the aggregates or the orders changed, at most
    every second (less often when a refresh is slow), and every 15 s regardless."""
    live: LiveState = runtime.extras["live"]
    clock: Clock = runtime.extras["clock"]
    seen_applied = -1
    last_full = 0.0
    while True:
        applied = runtime.consumer.stats.applied if runtime.consumer else 0
        pause = REFRESH_SECONDS
        due = live.aggregates_changed.is_set() or applied != seen_applied
        if due or time.monotonic() - last_full > FULL_REFRESH_SECONDS:
            live.aggregates_changed.clear()
            started = time.monotonic()
            try:
                await refresh_once(runtime, live, clock)
                seen_applied = applied
                last_full = time.monotonic()
            except Exception as exc:  # the next tick tries again
                log.warning("KPI refresh failed: %r", exc)
            pause = max(REFRESH_SECONDS, (time.monotonic() - started) / MAX_BUSY_SHARE)
        await asyncio.sleep(pause)


async def sse_messages(
    live: LiveState, window: Window = Window.ALL, last_event_id: int | None = None
) -> AsyncIterator[str]:
    """Server-Sent Events: a retry hint, then the window's summary whenever it changes,
    keep-alives between."""
    live.watchers[window] += 1
    if live.watchers[window] == 1 and window is not Window.ALL:
        # Nobody watched this window, so its summary is stale: wait for a fresh one (within a second).
        live.summaries.pop(window, None)
        live.aggregates_changed.set()
    try:
        yield f"retry: {RETRY_MS}\n\n"
        sent = last_event_id if last_event_id is not None else -1
        while True:
            summary = live.summaries.get(window)
            if summary is not None and live.versions[window] != sent:
                sent = live.versions[window]
                yield f"id: {sent}\nevent: kpi\ndata: {json.dumps(summary, separators=(',', ':'))}\n\n"
                continue
            async with live.changed:
                try:
                    await asyncio.wait_for(live.changed.wait(), KEEP_ALIVE_SECONDS)
                except TimeoutError:
                    yield ": keep-alive\n\n"
    finally:
        live.watchers[window] -= 1


# -- Prometheus -----------------------------------------------------------------------


class KpiCollector(Collector):
    """Exposes the live aggregates (window: all) with bounded labels only.

    Every KPI value can go down (a cancellation takes an order out of the open orders and
    the cycle-time stages, a late shipment takes an order out of "delivered"), so they are
    gauges and the duration
    histograms are gauge histograms; only truly monotonic counts end in ``_total``."""

    def __init__(self) -> None:
        self.live: LiveState | None = None

    def collect(self) -> Iterable[Any]:
        snapshot = self.live.metrics if self.live is not None else None
        if snapshot is None:
            return []
        total = snapshot.overall
        ratio = GaugeMetricFamily(
            "fulfil_kpi_ratio", "KPI rate over all orders (numerator / denominator)", labels=["criterion"]
        )
        numerators = GaugeMetricFamily("fulfil_kpi_numerator", "KPI numerator over all orders", labels=["criterion"])
        denominators = GaugeMetricFamily(
            "fulfil_kpi_denominator", "KPI denominator over all orders", labels=["criterion"]
        )
        for kpi, (numerator, denominator) in total.tallies.items():
            numerators.add_metric([kpi], numerator)
            denominators.add_metric([kpi], denominator)
            if denominator:
                ratio.add_metric([kpi], numerator / denominator)
        families: list[Any] = [ratio, numerators, denominators]
        for dimension in METRIC_DIMENSIONS:
            by_group = GaugeMetricFamily(
                f"fulfil_kpi_ratio_by_{dimension}", f"KPI rate by {dimension}", labels=["criterion", str(dimension)]
            )
            for group, agg in snapshot.groups.get(dimension, {}).items():
                for kpi in Kpi:
                    rate = agg.rate(kpi)
                    if rate is not None:
                        by_group.add_metric([kpi, group], rate)
            families.append(by_group)
        orders = GaugeMetricFamily("fulfil_kpi_orders", "Orders received, by what became of them", labels=["state"])
        orders.add_metric(["received"], total.orders_received)
        orders.add_metric(["delivered"], total.orders_delivered)
        orders.add_metric(["open"], total.orders_open)
        orders.add_metric(["cancelled"], total.orders_cancelled)
        failures = GaugeMetricFamily(
            "fulfil_kpi_perfect_order_failures",
            "Delivered orders failing a perfect-order criterion",
            labels=["criterion"],
        )
        for criterion, count in total.failures.items():
            failures.add_metric([criterion], count)
        open_orders = GaugeMetricFamily("fulfil_kpi_open_orders", "Open orders by stage", labels=["stage"])
        for stage, count in total.open_by_stage.items():
            open_orders.add_metric([stage], count)
        open_orders.add_metric([Stage.UNRECEIVED], snapshot.unreceived)
        durations = GaugeHistogramMetricFamily(
            "fulfil_kpi_duration_seconds", "Order cycle time and its stages (seconds)", labels=["stage"]
        )
        for series in Series:
            dist = total.distribution(series)
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip([*domain.HISTOGRAM_BOUNDS_SECONDS, float("inf")], dist.buckets, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            durations.add_metric([series], buckets, gsum_value=dist.total_seconds)
        return [*families, orders, failures, open_orders, durations]


COLLECTOR = KpiCollector()
REGISTRY.register(COLLECTOR)
