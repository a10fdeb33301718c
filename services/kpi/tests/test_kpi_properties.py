"""Any permutation of the scenario's events, with any duplicates and any re-emissions of
the same fact under a new id and a later time, gives the same facts and KPIs; and, split
into any consumer batches, the same aggregate changes, to the last bit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from kpi import domain, service
from kpi.domain import Counters, OrderFacts
from kpi.models import KpiTable
from kpi_scenario import NOW, scenario_events
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

EVENTS = scenario_events()
SETTLE_AFTER = 8 * 86400


def kpis(facts: dict[str, OrderFacts]) -> dict[str, Any]:
    scored = [domain.score(f) for f in facts.values()]
    total = domain.aggregate(scored)
    return {
        "parts": total.parts,
        "by_warehouse": {k: a.parts for k, a in domain.aggregate_by(scored, domain.Dimension.WAREHOUSE).items()},
        "by_carrier": {k: a.parts for k, a in domain.aggregate_by(scored, domain.Dimension.CARRIER).items()},
    }


def stored_round_trip(events: list[domain.OrderEvent]) -> dict[str, OrderFacts]:
    """Like the handler: load the stored JSON, apply one event, store the JSON again."""
    stored: dict[str, str] = {}
    for event in events:
        raw = stored.get(event.order_id)
        facts = OrderFacts.model_validate_json(raw) if raw else OrderFacts(order_id=event.order_id)
        stored[event.order_id] = domain.apply(facts, event).model_dump_json()
    return {order_id: OrderFacts.model_validate_json(raw) for order_id, raw in stored.items()}


def batches(events: list[domain.OrderEvent], size: int) -> Iterator[list[domain.OrderEvent]]:
    for start in range(0, len(events), size):
        yield events[start : start + size]


def journalled(
    events: list[domain.OrderEvent], batch_size: int
) -> tuple[dict[str, str], dict[tuple[Any, ...], Counters]]:
    """Apply the events in consumer batches to a fresh database; return the stored facts
    and the sum of every journalled aggregate change."""
    engine = create_engine("sqlite://")
    KpiTable.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        for batch in batches(events, batch_size):
            service.apply_events(session, batch, now=NOW, settle_after=SETTLE_AFTER)
        facts = {row[0]: row[1] for row in session.execute(select(service.ORDERS.c.order_id, service.ORDERS.c.facts))}
        total: dict[tuple[Any, ...], Counters] = {}
        for (changes,) in session.execute(select(service.PENDING.c.changes)):
            for level, start, dimension, group, part, counters in json.loads(changes):
                domain.add_counters(total.setdefault((level, start, dimension, group, part), {}), counters)
    engine.dispose()
    return facts, {key: counters for key, counters in total.items() if counters}


REFERENCE_FACTS = domain.facts_by_order(EVENTS)
REFERENCE = kpis(REFERENCE_FACTS)
REFERENCE_STORED, REFERENCE_AGGREGATES = journalled(EVENTS, len(EVENTS))


def reemitted(index: int, hours: int) -> domain.OrderEvent:
    """The same fact emitted again later (the producer stamps the new emission's time)."""
    event = EVENTS[index]
    return event.model_copy(update={"occurred_at": event.occurred_at + timedelta(hours=hours)})


@settings(max_examples=150, deadline=None)
@given(
    order=st.permutations(range(len(EVENTS))),
    duplicates=st.lists(st.tuples(st.integers(0, len(EVENTS) - 1), st.integers(0, len(EVENTS))), max_size=25),
    reemissions=st.lists(
        st.tuples(st.integers(0, len(EVENTS) - 1), st.integers(1, 72), st.integers(0, len(EVENTS))), max_size=15
    ),
    batch_size=st.integers(1, 40),
)
def test_any_order_duplicates_and_reemissions_give_the_same_kpis(
    order: list[int], duplicates: list[tuple[int, int]], reemissions: list[tuple[int, int, int]], batch_size: int
) -> None:
    events = [EVENTS[i] for i in order]
    for source, position in duplicates:
        events.insert(min(position, len(events)), EVENTS[source])
    for source, hours, position in reemissions:
        events.insert(min(position, len(events)), reemitted(source, hours))
    facts = stored_round_trip(events)
    assert {k: f.model_dump() for k, f in facts.items()} == {k: f.model_dump() for k, f in REFERENCE_FACTS.items()}
    assert kpis(facts) == REFERENCE
    stored, aggregates = journalled(events, batch_size)
    assert stored == REFERENCE_STORED
    assert aggregates == REFERENCE_AGGREGATES


def test_the_reference_is_not_trivial() -> None:
    # Dropping one delivery changes the KPIs and the aggregates: the property protects something.
    without = [e for e in EVENTS if not (e.order_id == "O6" and e.type == "order.delivered")]
    assert kpis(domain.facts_by_order(without)) != REFERENCE
    assert journalled(without, 7)[1] != REFERENCE_AGGREGATES
    # The journal holds every level the scenario's cohorts reach at NOW: 6h for all, 1h and 1m for O13.
    assert {key[0] for key in REFERENCE_AGGREGATES} == {"6h", "1h", "1m"}
    overall = {key: c for key, c in REFERENCE_AGGREGATES.items() if key[0] == "6h" and key[2] == ""}
    merged = domain.Aggregate()
    for (_, _, _, _, part), counters in overall.items():
        merged.add({part: counters})
    assert merged == domain.aggregate(domain.score(f) for f in REFERENCE_FACTS.values())
