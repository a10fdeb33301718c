"""The hand-computed scenario (see kpi_scenario.py) scored by the pure domain, KPI by KPI."""

from __future__ import annotations

import json
import math
import statistics
from datetime import timedelta, timezone

import pytest
from fulfil.events import OrderCancelled
from kpi import domain
from kpi.cohorts import Window, window_start
from kpi.domain import Aggregate, Contribution, Criterion, Dimension, Kpi, OrderScore, Series, Stage
from kpi_scenario import NOW, allocated, backordered, delivered, h, received, scenario_events, shipped

HOUR = 3600.0
K = Kpi


def scores(window: Window = Window.ALL) -> list[OrderScore]:
    facts = domain.facts_by_order(scenario_events())
    scored = [domain.score(f) for f in facts.values()]
    start = window_start(window, math.floor(NOW.timestamp()))
    if start is None:
        return scored
    return [s for s in scored if s.received_at is not None and s.received_at.timestamp() >= start]


@pytest.fixture
def total() -> Aggregate:
    return domain.aggregate(scores())


EXPECTED_TALLIES = {
    # O8 (A x3, cancelled after a complete first-pass allocation) still counts in the fill
    # rates: +1 line, +3 units, +1 order, all filled, at first pass and secondary.
    K.LINE_FILL_RATE_FIRST_PASS: (11, 14),  # was (10, 13)
    K.UNIT_FILL_RATE_FIRST_PASS: (25, 33),  # was (22, 30)
    K.ORDER_FILL_RATE_FIRST_PASS: (9, 12),  # was (8, 11)
    K.LINE_FILL_RATE_SECONDARY: (13, 14),  # was (12, 13)
    K.UNIT_FILL_RATE_SECONDARY: (31, 33),  # was (28, 30)
    K.ORDER_FILL_RATE_SECONDARY: (11, 12),  # was (10, 11)
    K.BACKORDER_RATE: (2, 13),  # was (2, 12): O8 was received, not backordered: +1 order
    K.ON_TIME_DISPATCH_RATE: (9, 10),
    K.ON_TIME_DELIVERY_RATE: (8, 9),
    K.IN_FULL_RATE: (7, 8),
    K.OTIF_RATE: (6, 8),
    K.DAMAGE_RATE: (1, 25),
    K.DAMAGE_FREE_ORDER_RATE: (7, 8),
    K.ORDER_ACCURACY: (9, 10),
    K.PERFECT_ORDER_RATE: (5, 8),
}

# Per group, by hand from the table in kpi_scenario.py: (received, cancelled, delivered, open)
# and the tallies of the KPIs below. A split order (O2) counts in both its warehouses and
# both its carriers, with both its shipments. The cancelled O8 (standard, shop, WH-1, no
# carrier; A x3 allocated at first pass) adds (3, 3) to the first-pass unit fill rate and
# (0, 1) to the backorder rate of its groups, and nothing to the delivery KPIs.
BREAKDOWN_KPIS = (
    K.PERFECT_ORDER_RATE,
    K.OTIF_RATE,
    K.ON_TIME_DISPATCH_RATE,
    K.ON_TIME_DELIVERY_RATE,
    K.DAMAGE_RATE,
    K.UNIT_FILL_RATE_FIRST_PASS,
    K.BACKORDER_RATE,
)
EXPECTED_BREAKDOWNS: dict[Dimension, dict[str, tuple[tuple[int, ...], tuple[tuple[int, int], ...]]]] = {
    Dimension.TIER: {
        # core: O1 O4 perfect, O7 damaged, O9 in the warehouse, O12 in transit.
        "core": ((5, 0, 3, 2), ((2, 3), (3, 3), (4, 4), (3, 3), (1, 9), (9, 11), (0, 5))),
        # standard: O2 O3 O5 perfect, O6 late, O11 short, O8 cancelled, O10 backordered, O13 processing.
        # Was (13, 19), (2, 7) before O8 counted in the fill and backorder rates.
        "standard": ((8, 1, 5, 2), ((3, 5), (3, 5), (5, 6), (5, 6), (0, 16), (16, 22), (2, 8))),
    },
    Dimension.CLIENT: {
        "erp": ((6, 0, 4, 2), ((2, 4), (2, 4), (5, 5), (4, 5), (0, 11), (11, 13), (0, 6))),
        # Was (11, 17), (2, 6) before O8 counted.
        "shop": ((7, 1, 4, 2), ((3, 4), (4, 4), (4, 5), (4, 4), (1, 14), (14, 20), (2, 7))),
    },
    Dimension.WAREHOUSE: {
        # Was (16, 20), (1, 7) before O8 (allocated in WH-1) counted.
        "WH-1": ((8, 1, 5, 2), ((4, 5), (5, 5), (6, 7), (6, 6), (1, 18), (19, 23), (1, 8))),
        "WH-2": ((4, 0, 4, 0), ((2, 4), (2, 4), (5, 5), (4, 5), (0, 11), (10, 12), (0, 4))),
        "unassigned": ((2, 0, 0, 2), ((0, 0), (0, 0), (0, 0), (0, 0), (0, 0), (0, 2), (1, 2))),
    },
    Dimension.CARRIER: {
        "DHL": ((6, 0, 5, 1), ((4, 5), (5, 5), (6, 7), (6, 6), (1, 18), (15, 19), (1, 6))),
        "UPS": ((4, 0, 4, 0), ((2, 4), (2, 4), (5, 5), (4, 5), (0, 11), (10, 12), (0, 4))),
        # O8 O9 O10 O13; was (1, 3), (1, 3) before O8 (never shipped) counted.
        "unassigned": ((4, 1, 0, 3), ((0, 0), (0, 0), (0, 0), (0, 0), (0, 0), (4, 6), (1, 4))),
    },
}


def breakdown(total: Aggregate) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    counts = (total.orders_received, total.orders_cancelled, total.orders_delivered, total.orders_open)
    return counts, tuple(total.tallies[kpi] for kpi in BREAKDOWN_KPIS)


def test_every_kpi_of_the_scenario_has_the_hand_computed_numerator_and_denominator(total: Aggregate) -> None:
    assert total.tallies == EXPECTED_TALLIES
    assert total.rate(K.PERFECT_ORDER_RATE) == 5 / 8
    assert (total.orders_received, total.orders_cancelled, total.orders_delivered, total.orders_open) == (13, 1, 8, 4)
    assert total.failures == {
        Criterion.COMPLETE: 1,
        Criterion.ON_TIME: 1,
        Criterion.DAMAGE_FREE: 1,
        Criterion.ACCURATE: 1,
    }
    # Open orders by stage add up to orders_open (the unreceived have no cohort).
    assert total.open_by_stage == {Stage.PROCESSING: 1, Stage.BACKORDERED: 1, Stage.WAREHOUSE: 1, Stage.TRANSIT: 1}
    assert sum(total.open_by_stage.values()) == total.orders_open
    assert total.top_stockouts() == [("F", 1, 1), ("C", 1, 2)]
    assert total.stockouts["A"] == (0, 7)  # was (0, 6): O8's line of A counts, cancelled or not


def test_cycle_time_mean_std_histogram_and_percentiles(total: Aggregate) -> None:
    cycle = total.distribution(Series.CYCLE_TIME)
    # Cycle times in hours: 20 20 20 22 28 28 40 70 -> mean 31, population variance 258.
    assert cycle.count == 8
    assert cycle.mean_seconds == 31 * HOUR
    assert cycle.std_seconds == pytest.approx(math.sqrt(258) * HOUR, rel=1e-12)
    day = domain.HISTOGRAM_BOUNDS_SECONDS.index(86400.0)
    assert cycle.buckets[day] == 4  # 20 20 20 22 h
    assert cycle.buckets[day + 1] == 3  # 28 28 40 h
    assert cycle.buckets[day + 2] == 1  # 70 h
    assert sum(cycle.buckets) == 8
    # DDSketch picks the value at rank q * (n - 1) = 7q: p50 -> 22 h (4th), p90, p95, p99 -> 40 h (7th).
    for q, exact in ((0.5, 22), (0.9, 40), (0.95, 40), (0.99, 40)):
        value = cycle.percentile(q)
        assert value is not None
        assert abs(value - exact * HOUR) <= 0.01 * exact * HOUR
    backordered = total.distribution(Series.CYCLE_TIME_BACKORDERED)
    assert (backordered.count, backordered.mean_seconds) == (1, 70 * HOUR)
    others = total.distribution(Series.CYCLE_TIME_NOT_BACKORDERED)
    assert (others.count, others.mean_seconds) == (7, pytest.approx(178 / 7 * HOUR))


def test_stage_durations(total: Aggregate) -> None:
    d = total.durations
    assert (d[Series.TRANSMISSION].count, d[Series.TRANSMISSION].mean_seconds) == (12, 360)
    # received -> fully allocated: nine orders 0.1 h, O3 47.9 h.
    assert d[Series.PROCESSING].count == 10
    assert d[Series.PROCESSING].total_seconds == pytest.approx((9 * 0.1 + 47.9) * HOUR)
    assert d[Series.BACKORDER_WAIT].count == 1
    assert d[Series.BACKORDER_WAIT].total_seconds == pytest.approx(47.8 * HOUR)
    # fully allocated -> last shipped, delivered orders: 1.8 4.8 2 1.8 9.8 1.8 1.8 1.8 h.
    assert d[Series.WAREHOUSE].total_seconds == pytest.approx(25.6 * HOUR)
    # per delivered shipment: 18 21 23 20 20 18 38 18 18 h; sorted 18 18 18 18 20 20 21 23 38:
    # p50 at rank 4 -> 20 h, p95 at rank 7.6 -> 23 h (the 8th value).
    transit = d[Series.TRANSIT]
    assert transit.count == 9
    assert transit.total_seconds == pytest.approx(194 * HOUR)
    for q, exact in ((0.5, 20), (0.95, 23)):
        value = transit.percentile(q)
        assert value is not None
        assert abs(value - exact * HOUR) <= 0.01 * exact * HOUR


def test_breakdowns_by_dimension() -> None:
    scored = scores()
    for dimension, expected in EXPECTED_BREAKDOWNS.items():
        groups = domain.aggregate_by(scored, dimension)
        assert {key: breakdown(total) for key, total in groups.items()} == expected, dimension
    by_tier = domain.aggregate_by(scored, Dimension.TIER)
    assert by_tier["core"].failures[Criterion.DAMAGE_FREE] == 1
    assert by_tier["standard"].open_by_stage == {
        Stage.PROCESSING: 1,
        Stage.BACKORDERED: 1,
        Stage.WAREHOUSE: 0,
        Stage.TRANSIT: 0,
    }
    core_cycle = by_tier["core"].distribution(Series.CYCLE_TIME)
    assert (core_cycle.count, core_cycle.mean_seconds) == (3, 62 / 3 * HOUR)  # O1 20, O4 22, O7 20 h


def test_windows_are_cohorts_of_orders_received_in_them() -> None:
    # 1h and 24h: only O13 (received at 99.5 h; the 24h window starts at 76 h) is in them.
    for window in (Window.HOUR, Window.DAY):
        recent = domain.aggregate(scores(window))
        assert (recent.orders_received, recent.orders_open, recent.orders_delivered) == (1, 1, 0), window
        assert recent.open_by_stage[Stage.PROCESSING] == 1
        assert recent.tallies == {kpi: (0, 1) if kpi is K.BACKORDER_RATE else (0, 0) for kpi in Kpi}
        assert recent.distribution(Series.CYCLE_TIME).count == 0
        assert recent.distribution(Series.CYCLE_TIME).percentile(0.95) is None
        assert recent.distribution(Series.TRANSMISSION).mean_seconds == 360
        assert recent.top_stockouts() == []
    assert domain.aggregate(scores(Window.WEEK)) == domain.aggregate(scores())


def test_one_order_explains_why_it_is_not_perfect() -> None:
    facts = domain.facts_by_order(scenario_events())
    short = domain.score(facts["O11"])
    assert short.perfect is False
    assert short.criteria[Criterion.COMPLETE].passed is False
    assert short.criteria[Criterion.COMPLETE].reason == "line 1: 3 of 4 delivered"
    assert short.criteria[Criterion.ACCURATE].reason == "shipment S11 line 1: 3 delivered of 4 shipped"
    assert short.criteria[Criterion.ON_TIME].passed
    assert short.criteria[Criterion.DAMAGE_FREE].passed
    substitute = domain.score(facts["O4"])
    assert substitute.perfect is True
    assert substitute.tallies[K.ORDER_FILL_RATE_FIRST_PASS] == (0, 1)
    assert substitute.tallies[K.ORDER_FILL_RATE_SECONDARY] == (1, 1)
    cancelled = domain.score(facts["O8"])
    assert cancelled.stage is Stage.CANCELLED
    # Cancelled after a complete first-pass allocation: in the fill and backorder rates only.
    filled = {
        K.LINE_FILL_RATE_FIRST_PASS: (1, 1),
        K.UNIT_FILL_RATE_FIRST_PASS: (3, 3),
        K.ORDER_FILL_RATE_FIRST_PASS: (1, 1),
        K.LINE_FILL_RATE_SECONDARY: (1, 1),
        K.UNIT_FILL_RATE_SECONDARY: (3, 3),
        K.ORDER_FILL_RATE_SECONDARY: (1, 1),
    }
    assert cancelled.tallies == {**filled, K.BACKORDER_RATE: (0, 1)}
    assert cancelled.stockouts == {"A": (0, 1)}
    assert cancelled.durations == {}
    assert cancelled.perfect is None
    assert cancelled.notes == ["cancelled by the customer: counted in fill rates, backorder rate and stockouts only"]
    counts = {"received": 1, "cancelled": 1, "den|backorder_rate": 1}
    for kpi, (numerator, denominator) in filled.items():
        counts |= {f"num|{kpi}": numerator, f"den|{kpi}": denominator}
    assert Contribution.of(cancelled).parts == {"counts": counts, "stockouts": {"o|A": 1}}
    assert domain.stage_of(facts["O12"]) == (Stage.TRANSIT, h(3))
    assert domain.stage_of(facts["O10"]) == (Stage.BACKORDERED, h(0.2))


def test_events_before_order_received_leave_the_order_unreceived() -> None:
    events = [e for e in scenario_events() if e.order_id == "O1" and e.type != "order.received"]
    facts = domain.facts_by_order(events)["O1"]
    assert domain.stage_of(facts) == (Stage.UNRECEIVED, h(0.2))
    scored = domain.score(facts)
    assert scored.tallies == {}
    assert Contribution.of(scored) == Contribution(None, Contribution.of(scored).groups, {})


def test_a_reemitted_partial_first_pass_allocation_counts_once() -> None:
    """The same allocation emitted again later (new ce_id, new occurred_at) is one fact:
    a partial first pass must not add up to a full line, nor make the order filled."""
    order = [received("R1", [("A", 4)]), allocated("R1", [(1, "A", 2, "WH-1")], complete=False)]
    again = allocated("R1", [(1, "A", 2, "WH-1")], at=5.0, complete=False)
    once = domain.score(domain.facts_from("R1", order))
    twice = domain.score(domain.facts_from("R1", [*order, again]))
    assert twice.tallies == once.tallies
    assert twice.tallies[K.UNIT_FILL_RATE_FIRST_PASS] == (2, 4)
    assert twice.tallies[K.LINE_FILL_RATE_FIRST_PASS] == (0, 1)
    assert twice.tallies[K.ORDER_FILL_RATE_SECONDARY] == (0, 1)
    assert twice.stage is Stage.PROCESSING
    # The earliest emission wins, whichever arrives first.
    facts = domain.facts_from("R1", [again, *order])
    assert facts.first_allocated_at() == h(0.2)
    # A release that completes the order covers the line, so the secondary fill rate reaches it.
    release = allocated("R1", [(1, "A", 2, "WH-2")], at=30, first_pass=False, complete=True)
    filled = domain.score(domain.facts_from("R1", [*order, again, release]))
    assert filled.tallies[K.UNIT_FILL_RATE_SECONDARY] == (4, 4)
    assert filled.tallies[K.UNIT_FILL_RATE_FIRST_PASS] == (2, 4)


def test_every_stored_time_is_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    ship = shipped("U1", "S1", [(1, "A", 2)], at=2, ship_by=4, promised=26, warehouse="WH-1", carrier="DHL")
    delivery = delivered("U1", "S1", [(1, "A", 2, 0)], at=20)
    events = [
        received("U1", [("A", 2)]),
        allocated("U1", [(1, "A", 2, "WH-1")]),
        ship.model_copy(
            update={"ship_by": h(4).astimezone(plus_two), "promised_delivery_at": h(26).astimezone(plus_two)}
        ),
        delivery.model_copy(update={"delivered_at": h(20).astimezone(plus_two)}),
    ]
    facts = domain.facts_from("U1", events)
    stored = json.loads(facts.model_dump_json())
    assert "+02:00" not in json.dumps(stored)
    assert stored["deliveries"]["S1"]["delivered_at"] == "2026-01-06T04:00:00Z"
    assert stored["shipments"]["S1"]["promised_delivery_at"] == "2026-01-06T10:00:00Z"
    assert domain.stage_of(facts) == (Stage.DELIVERED, h(20))
    assert domain.stage_of(facts)[1].utcoffset() == timedelta(0)  # type: ignore[union-attr]


def test_moments_are_exact_under_adding_and_subtracting() -> None:
    samples = [20 * 3_600_000_000, 1, 0, 7_919_000_000, 70 * 3_600_000_000]
    whole = domain.duration_counters(samples)
    dist = domain.Distribution(whole)
    assert dist.mean_seconds == pytest.approx(statistics.mean(samples) / 1_000_000, rel=1e-15)
    assert dist.std_seconds == pytest.approx(statistics.pstdev(samples) / 1_000_000, rel=1e-12)
    total: domain.Parts = {}
    domain.add_parts(total, {"x": domain.duration_counters(samples[:2])})
    domain.add_parts(total, {"x": domain.duration_counters([*samples[2:], 123_456])})
    domain.add_parts(total, {"x": domain.duration_counters([123_456])}, -1)
    assert total == {"x": whole}
    domain.add_parts(total, {"x": whole}, -1)
    assert total == {}


def test_distribution_percentiles_stay_within_one_percent() -> None:
    values = [1 + (i * 7919) % 100_000 for i in range(5000)]
    total = Aggregate()
    total.add({"cycle_time_backordered": domain.duration_counters(v * 1_000_000 for v in values[:2500])})
    total.add({"cycle_time_not_backordered": domain.duration_counters(v * 1_000_000 for v in values[2500:])})
    dist = total.distribution(Series.CYCLE_TIME)  # the sum of its two halves
    ordered = sorted(values)
    for q in domain.PERCENTILES:
        exact = ordered[math.floor(q * (len(ordered) - 1))]
        value = dist.percentile(q)
        assert value is not None
        assert abs(value - exact) <= 0.0101 * exact


def test_an_aggregate_survives_serialization_and_merging(total: Aggregate) -> None:
    scored = scores()
    first, second = domain.aggregate(scored[:5]), domain.aggregate(scored[5:])
    restored = Aggregate(json.loads(json.dumps(first.parts)))
    restored.merge(Aggregate(json.loads(json.dumps(second.parts))))
    assert restored == total  # exactly: every counter is an integer


def test_removed_names_in_stored_counters_are_ignored(total: Aggregate) -> None:
    """A Kpi, Criterion, Stage or Series removed in a later version leaves counters behind."""
    stored = json.loads(json.dumps(total.parts))
    stored["counts"].update({"num|retired_kpi": 3, "den|retired_kpi": 4, "fail|retired": 1, "open|retired": 2})
    stored["retired_series"] = {"n": 1, "s": 5, "q": 25, "b7": 1, "h0": 1}
    old = Aggregate(stored)
    assert old.tallies == total.tallies
    assert old.failures == total.failures
    assert old.open_by_stage == total.open_by_stage
    assert old.durations == total.durations


def test_a_late_shipment_takes_an_order_out_of_delivered() -> None:
    """Out of order: a shipment seen after the order's delivery means it is not delivered
    after all (a shipment is on its way); its delivered-order contributions are taken back."""
    order = [
        received("L1", [("A", 2)]),
        allocated("L1", [(1, "A", 2, "WH-1")]),
        shipped("L1", "S1", [(1, "A", 2)], at=2, ship_by=4, promised=26, warehouse="WH-1", carrier="DHL"),
        delivered("L1", "S1", [(1, "A", 2, 0)], at=20),
    ]
    facts = domain.facts_from("L1", order)
    before = Contribution.of(domain.score(facts))
    assert before.parts["counts"]["delivered"] == 1
    extra = shipped("L1", "S2", [(1, "A", 1)], at=21, ship_by=24, promised=48, warehouse="WH-2", carrier="UPS")
    after = Contribution.of(domain.score(domain.apply(facts, extra)))
    assert domain.stage_of(facts)[0] is Stage.TRANSIT
    change = domain.difference(after.parts, before.parts)
    assert change["counts"]["delivered"] == -1
    assert change["counts"]["num|perfect_order_rate"] == -1
    assert change["cycle_time_not_backordered"]["n"] == -1
    total = Aggregate()
    total.add(before.parts)
    total.add(change)
    assert total == Aggregate(after.parts)
    assert after.groups["carrier"] == ("DHL", "UPS")


def test_an_order_backordered_at_first_pass_then_cancelled_still_counts_as_a_stockout() -> None:
    """A stockout that made the customer cancel stays in the backorder rate and the SKU's
    stockout counts; the cancellation only takes the order out of the open orders (and
    keeps it out of perfect order). Replacing its contribution gives exactly that."""
    order = [received("C1", [("F", 2)]), backordered("C1", [(1, "F", 2)])]
    facts = domain.facts_from("C1", order)
    before = Contribution.of(domain.score(facts))
    assert before.parts["counts"]["open|backordered"] == 1
    cancel = OrderCancelled(order_id="C1", occurred_at=h(1), reason="customer gave up waiting")
    scored = domain.score(domain.apply(facts, cancel))
    assert scored.stage is Stage.CANCELLED
    assert scored.tallies[K.BACKORDER_RATE] == (1, 1)
    assert scored.tallies[K.UNIT_FILL_RATE_FIRST_PASS] == (0, 2)
    assert K.PERFECT_ORDER_RATE not in scored.tallies
    assert scored.stockouts == {"F": (1, 1)}
    after = Contribution.of(scored)
    # Incremental: subtract the old contribution, add the new one.
    total = Aggregate()
    total.add(before.parts)
    total.add(domain.difference(after.parts, before.parts))
    assert total == Aggregate(after.parts)
    assert total.tallies[K.BACKORDER_RATE] == (1, 1)
    assert total.tallies[K.PERFECT_ORDER_RATE] == (0, 0)
    assert total.stockouts == {"F": (1, 1)}
    assert total.top_stockouts() == [("F", 1, 1)]
    assert (total.orders_received, total.orders_cancelled, total.orders_open) == (1, 1, 0)
    assert total.open_by_stage[Stage.BACKORDERED] == 0
    assert total.distribution(Series.TRANSMISSION).count == 0


def test_delivery_without_shipment_is_not_delivered() -> None:
    order = [received("D1", [("A", 1)]), delivered("D1", "S1", [(1, "A", 1, 0)], at=5)]
    assert domain.stage_of(domain.facts_from("D1", order))[0] is Stage.PROCESSING
