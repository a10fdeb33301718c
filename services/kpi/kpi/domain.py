"""KPI rules: per-order facts (a merge of events), how an order scores, and what it
contributes to the aggregates. No I/O.

Facts are a join-semilattice: every event adds entries under keys derived from the
event's own content (never from when it was emitted), and a key already present is
only replaced by an entry that sorts earlier (the earliest event time, then its
canonical form). Applying any permutation of a set of events, with any duplicates and
any re-emissions of the same fact under a new id or time, therefore gives the same
facts, and so the same KPIs.

An order's **contribution** is what it adds to the aggregates: integer counters only
(tallies, counts, histogram buckets, DDSketch bins, and the exact sums of durations and
of their squares in microseconds). Aggregates are sums of contributions, so adding and
subtracting them is exact and commutative: when an order's facts change, its old
contribution is subtracted and the new one added, and any arrival order gives the same
aggregates to the last bit.

Definitions used by ``score`` (all times are event times, in UTC):

- An order counts once it has been received. A customer-cancelled order still counts
  in what inventory did for it: the fill rates (first pass and secondary), the backorder
  rate and the per-SKU stockout counts, exactly as if it had not been cancelled (a
  stockout that made a customer cancel must not vanish from them). It is excluded from
  everything about shipping and delivery (on-time dispatch and delivery, in-full, OTIF,
  damage, accuracy, perfect order), from the cycle time and its stages, and from the
  open orders; it is counted as ``orders_cancelled``.
- Fill rates are over orders whose first pass is decided (an allocation or backorder
  was seen). First pass counts allocations flagged ``first_pass`` of the ordered SKU;
  the secondary fill rate also counts substitutes and later releases, and an
  allocation flagged ``complete`` covers every line.
- An order is delivered when every line has shipped in full (by line number) and
  every shipment has been delivered. Cycle time = last delivery - placed_at.
- On-time dispatch and delivery, damage and accuracy are per shipment / delivered
  line over everything delivered so far; in-full, OTIF, damage-free and perfect
  order are per delivered order.
- Stage durations are clamped at zero (clocks of different systems disagree).
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple, TypeVar

from ddsketch.mapping import LogarithmicMapping
from fulfil.events import (
    OrderAllocated,
    OrderBackordered,
    OrderCancelled,
    OrderDelayed,
    OrderDelivered,
    OrderEvent,
    OrderReceived,
    OrderShipped,
)
from pydantic import BaseModel

SKETCH_RELATIVE_ACCURACY = 0.01
UNASSIGNED = "unassigned"


class Stage(StrEnum):
    """Where an order is; the first five are open."""

    UNRECEIVED = "unreceived"
    """Later events arrived before order.received (out of order)."""
    PROCESSING = "processing"
    BACKORDERED = "backordered"
    WAREHOUSE = "warehouse"
    TRANSIT = "transit"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"


OPEN_STAGES = (Stage.UNRECEIVED, Stage.PROCESSING, Stage.BACKORDERED, Stage.WAREHOUSE, Stage.TRANSIT)
"""Stages of the backlog (/v1/open-orders), including orders not received yet."""
RECEIVED_OPEN_STAGES = (Stage.PROCESSING, Stage.BACKORDERED, Stage.WAREHOUSE, Stage.TRANSIT)
"""Open stages of received orders: a KPI summary's ``open_by_stage`` (they add up to
``orders_open``). An order not received yet has no cohort, so it is in no window."""


class Criterion(StrEnum):
    """Perfect-order criteria (SCOR RL.1.1 style); an order can fail several."""

    COMPLETE = "complete"
    ON_TIME = "on_time"
    DAMAGE_FREE = "damage_free"
    ACCURATE = "accurate"


class Dimension(StrEnum):
    TIER = "tier"
    WAREHOUSE = "warehouse"
    CARRIER = "carrier"
    CLIENT = "client"


class Series(StrEnum):
    """Duration series: cycle time and its stages (seconds)."""

    CYCLE_TIME = "cycle_time"
    CYCLE_TIME_BACKORDERED = "cycle_time_backordered"
    CYCLE_TIME_NOT_BACKORDERED = "cycle_time_not_backordered"
    TRANSMISSION = "transmission"
    PROCESSING = "processing"
    WAREHOUSE = "warehouse"
    TRANSIT = "transit"
    BACKORDER_WAIT = "backorder_wait"


class Kpi(StrEnum):
    LINE_FILL_RATE_FIRST_PASS = "line_fill_rate_first_pass"
    UNIT_FILL_RATE_FIRST_PASS = "unit_fill_rate_first_pass"
    ORDER_FILL_RATE_FIRST_PASS = "order_fill_rate_first_pass"
    LINE_FILL_RATE_SECONDARY = "line_fill_rate_secondary"
    UNIT_FILL_RATE_SECONDARY = "unit_fill_rate_secondary"
    ORDER_FILL_RATE_SECONDARY = "order_fill_rate_secondary"
    BACKORDER_RATE = "backorder_rate"
    ON_TIME_DISPATCH_RATE = "on_time_dispatch_rate"
    ON_TIME_DELIVERY_RATE = "on_time_delivery_rate"
    IN_FULL_RATE = "in_full_rate"
    OTIF_RATE = "otif_rate"
    DAMAGE_RATE = "damage_rate"
    DAMAGE_FREE_ORDER_RATE = "damage_free_order_rate"
    ORDER_ACCURACY = "order_accuracy"
    PERFECT_ORDER_RATE = "perfect_order_rate"


# -- facts -------------------------------------------------------------------------


class OrderedLineFact(BaseModel):
    sku: str
    qty: int
    substitutes: tuple[str, ...] = ()


class ReceivedFact(BaseModel):
    received_at: datetime
    placed_at: datetime
    client: str
    tier: str
    lines: dict[int, OrderedLineFact]


class AllocationFact(BaseModel):
    at: datetime
    line_no: int
    sku: str
    qty: int
    warehouse_id: str
    substitute_for: str | None
    first_pass: bool
    complete: bool


class BackorderFact(BaseModel):
    at: datetime
    line_no: int
    sku: str
    qty: int


class ShipmentFact(BaseModel):
    shipped_at: datetime
    warehouse_id: str
    carrier: str
    ship_by: datetime
    promised_delivery_at: datetime
    lines: dict[int, int]
    """line_no -> units shipped."""


class DeliveredLineFact(BaseModel):
    line_no: int
    sku: str
    qty_delivered: int
    qty_damaged: int


class DeliveryFact(BaseModel):
    delivered_at: datetime
    lines: tuple[DeliveredLineFact, ...]


class OrderFacts(BaseModel):
    order_id: str
    received: ReceivedFact | None = None
    allocations: dict[str, AllocationFact] = {}
    """Keyed by the allocation event's content (see ``allocation_key``)."""
    backorders: dict[str, BackorderFact] = {}
    """Keyed by line and SKU."""
    shipments: dict[str, ShipmentFact] = {}
    deliveries: dict[str, DeliveryFact] = {}
    delays: dict[str, datetime] = {}
    cancelled_at: datetime | None = None

    # -- derived stage times --------------------------------------------------------

    def first_allocated_at(self) -> datetime | None:
        return min((a.at for a in self.allocations.values()), default=None)

    def fully_allocated_at(self) -> datetime | None:
        return min((a.at for a in self.allocations.values() if a.complete), default=None)

    def backordered_at(self) -> datetime | None:
        return min((b.at for b in self.backorders.values()), default=None)

    def last_shipped_at(self) -> datetime | None:
        return max((s.shipped_at for s in self.shipments.values()), default=None)

    def last_delivered_at(self) -> datetime | None:
        return max((d.delivered_at for d in self.deliveries.values()), default=None)

    def first_seen_at(self) -> datetime | None:
        times: list[datetime] = [a.at for a in self.allocations.values()]
        times += [b.at for b in self.backorders.values()]
        times += [s.shipped_at for s in self.shipments.values()]
        times += [d.delivered_at for d in self.deliveries.values()]
        times += list(self.delays.values())
        if self.received is not None:
            times.append(self.received.received_at)
        if self.cancelled_at is not None:
            times.append(self.cancelled_at)
        return min(times, default=None)


T = TypeVar("T", bound=BaseModel)


def _earliest(existing: T | None, new: T, at: datetime) -> T:
    """First write wins, made order-independent: of two conflicting entries keep the earliest."""
    if existing is None:
        return new
    existing_at = _at_of(existing)
    if (at, new.model_dump_json()) < (existing_at, existing.model_dump_json()):
        return new
    return existing


def _at_of(entry: BaseModel) -> datetime:
    for name in ("received_at", "shipped_at", "delivered_at", "at"):
        value = getattr(entry, name, None)
        if isinstance(value, datetime):
            return value
    raise TypeError(f"{type(entry).__name__} has no event time")


V = TypeVar("V")


def _put(entries: dict[str, V], key: str, value: V) -> None:
    """Set an entry, keeping the entries sorted by key: stored facts (and the reasons
    derived from them) then do not depend on the order in which events arrived."""
    new = key not in entries
    entries[key] = value
    if new and len(entries) > 1 and next(reversed(entries)) != max(entries):
        ordered = sorted(entries.items())
        entries.clear()
        entries.update(ordered)


def _min_time(existing: datetime | None, new: datetime) -> datetime:
    return new if existing is None else min(existing, new)


def _utc(value: datetime) -> datetime:
    """Every stored time is UTC (producers may send any offset; SQLite keeps no offset)."""
    return value.astimezone(UTC)


def allocation_key(event: OrderAllocated) -> str:
    """The identity of an allocation event: its content, not when it was emitted.

    A re-emission of the same allocation (new ce_id, new occurred_at) therefore merges
    with the original instead of counting twice. Two genuine releases with identical
    content also merge; the secondary fill rate still reaches the line once an
    allocation flagged ``complete`` arrives."""
    lines = sorted(
        (line.line_no, line.sku, line.qty, line.warehouse_id, line.substitute_for or "") for line in event.allocations
    )
    content = repr((event.first_pass, event.complete, lines))
    return hashlib.blake2b(content.encode(), digest_size=8).hexdigest()


def apply(facts: OrderFacts, event: OrderEvent) -> OrderFacts:
    """Merge one event into an order's facts (in place; returns them).

    Facts are built with ``model_construct``: the event was validated when it was decoded."""
    at = _utc(event.occurred_at)
    if isinstance(event, OrderReceived):
        received = ReceivedFact.model_construct(
            received_at=at,
            placed_at=_utc(event.placed_at),
            client=event.client,
            tier=event.customer.tier.value,
            lines={
                line.line_no: OrderedLineFact.model_construct(sku=line.sku, qty=line.qty, substitutes=line.substitutes)
                for line in event.lines
            },
        )
        facts.received = _earliest(facts.received, received, at)
    elif isinstance(event, OrderAllocated):
        identity = allocation_key(event)
        ordered = sorted(event.allocations, key=lambda a: (a.line_no, a.sku, a.warehouse_id, a.qty))
        for index, line in enumerate(ordered):
            key = f"{identity}#{index}"
            allocation = AllocationFact.model_construct(
                at=at,
                line_no=line.line_no,
                sku=line.sku,
                qty=line.qty,
                warehouse_id=line.warehouse_id,
                substitute_for=line.substitute_for,
                first_pass=event.first_pass,
                complete=event.complete,
            )
            _put(facts.allocations, key, _earliest(facts.allocations.get(key), allocation, at))
    elif isinstance(event, OrderBackordered):
        for bline in event.lines:
            key = f"{bline.line_no}#{bline.sku}"
            backorder = BackorderFact.model_construct(at=at, line_no=bline.line_no, sku=bline.sku, qty=bline.qty)
            _put(facts.backorders, key, _earliest(facts.backorders.get(key), backorder, at))
    elif isinstance(event, OrderShipped):
        shipped: dict[int, int] = {}
        for sline in event.lines:
            shipped[sline.line_no] = shipped.get(sline.line_no, 0) + sline.qty
        shipment = ShipmentFact.model_construct(
            shipped_at=at,
            warehouse_id=event.warehouse_id,
            carrier=event.carrier,
            ship_by=_utc(event.ship_by),
            promised_delivery_at=_utc(event.promised_delivery_at),
            lines=dict(sorted(shipped.items())),
        )
        _put(facts.shipments, event.shipment_id, _earliest(facts.shipments.get(event.shipment_id), shipment, at))
    elif isinstance(event, OrderDelivered):
        delivered_at = _utc(event.delivered_at)
        delivery = DeliveryFact.model_construct(
            delivered_at=delivered_at,
            lines=tuple(
                DeliveredLineFact.model_construct(
                    line_no=d.line_no, sku=d.sku, qty_delivered=d.qty_delivered, qty_damaged=d.qty_damaged
                )
                for d in event.lines
            ),
        )
        existing = facts.deliveries.get(event.shipment_id)
        _put(facts.deliveries, event.shipment_id, _earliest(existing, delivery, delivered_at))
    elif isinstance(event, OrderDelayed):
        key = f"{event.shipment_id or ''}#{event.stage}"
        _put(facts.delays, key, _min_time(facts.delays.get(key), at))
    elif isinstance(event, OrderCancelled):
        facts.cancelled_at = _min_time(facts.cancelled_at, at)
    return facts


def facts_from(order_id: str, events: Iterable[OrderEvent]) -> OrderFacts:
    facts = OrderFacts(order_id=order_id)
    for event in events:
        apply(facts, event)
    return facts


def facts_by_order(events: Iterable[OrderEvent]) -> dict[str, OrderFacts]:
    """Fold a stream of events (any order, any duplicates) into facts per order."""
    facts: dict[str, OrderFacts] = {}
    for event in events:
        order = facts.get(event.order_id)
        if order is None:
            order = facts[event.order_id] = OrderFacts(order_id=event.order_id)
        apply(order, event)
    return facts


# -- scoring -----------------------------------------------------------------------

MICROSECOND = timedelta(microseconds=1)


class CriterionResult(NamedTuple):
    passed: bool
    reason: str


@dataclass
class OrderScore:
    """How one order scored: stage, KPI contributions (numerator, denominator) and why."""

    order_id: str
    stage: Stage
    stage_since: datetime | None
    received_at: datetime | None
    cancelled: bool
    backordered: bool
    tallies: dict[Kpi, tuple[int, int]] = field(default_factory=dict)
    durations: dict[Series, list[int]] = field(default_factory=dict)
    """Microseconds."""
    criteria: dict[Criterion, CriterionResult] = field(default_factory=dict)
    perfect: bool | None = None
    groups: dict[Dimension, tuple[str, ...]] = field(default_factory=dict)
    stockouts: dict[str, tuple[int, int]] = field(default_factory=dict)
    """sku -> (backordered lines, ordered lines)."""
    notes: list[str] = field(default_factory=list)


def _micros(start: datetime | None, end: datetime | None) -> int | None:
    if start is None or end is None:
        return None
    return max(0, (end - start) // MICROSECOND)


def stage_of(facts: OrderFacts) -> tuple[Stage, datetime | None]:
    """The order's current stage and since when (event time)."""
    if facts.cancelled_at is not None:
        return Stage.CANCELLED, facts.cancelled_at
    received = facts.received
    if received is None:
        return Stage.UNRECEIVED, facts.first_seen_at()
    if _is_delivered(facts):
        return Stage.DELIVERED, facts.last_delivered_at()
    fully_allocated = facts.fully_allocated_at()
    if fully_allocated is None:
        backordered = facts.backordered_at()
        if backordered is not None:
            return Stage.BACKORDERED, backordered
        return Stage.PROCESSING, received.received_at
    if _shipped_in_full(facts):
        return Stage.TRANSIT, facts.last_shipped_at()
    return Stage.WAREHOUSE, fully_allocated


def _shipped_units(facts: OrderFacts) -> dict[int, int]:
    shipped: dict[int, int] = {}
    for shipment in facts.shipments.values():
        for line_no, qty in shipment.lines.items():
            shipped[line_no] = shipped.get(line_no, 0) + qty
    return shipped


def _shipped_in_full(facts: OrderFacts) -> bool:
    if facts.received is None or not facts.shipments:
        return False
    shipped = _shipped_units(facts)
    return all(shipped.get(line_no, 0) >= line.qty for line_no, line in facts.received.lines.items())


def _is_delivered(facts: OrderFacts) -> bool:
    return _shipped_in_full(facts) and all(sid in facts.deliveries for sid in facts.shipments)


def groups_of(facts: OrderFacts) -> dict[Dimension, tuple[str, ...]]:
    """The groups an order belongs to per dimension (several warehouses/carriers if split)."""
    received = facts.received
    warehouses = sorted({s.warehouse_id for s in facts.shipments.values()}) or sorted(
        {a.warehouse_id for a in facts.allocations.values()}
    )
    carriers = sorted({s.carrier for s in facts.shipments.values()})
    return {
        Dimension.TIER: (received.tier if received else UNASSIGNED,),
        Dimension.WAREHOUSE: tuple(warehouses) or (UNASSIGNED,),
        Dimension.CARRIER: tuple(carriers) or (UNASSIGNED,),
        Dimension.CLIENT: (received.client if received else UNASSIGNED,),
    }


def score(facts: OrderFacts) -> OrderScore:
    """Score one order on every criterion; rates get (numerator, denominator) contributions."""
    stage, since = stage_of(facts)
    received = facts.received
    result = OrderScore(
        order_id=facts.order_id,
        stage=stage,
        stage_since=since,
        received_at=received.received_at if received else None,
        cancelled=facts.cancelled_at is not None,
        backordered=bool(facts.backorders),
        groups=groups_of(facts),
    )
    if received is None:
        result.notes.append("not received yet: excluded from KPIs")
        return result

    lines = received.lines
    tallies = result.tallies
    # What inventory did for the order: counted whether or not the customer cancelled it.
    _fill_rates(facts, lines, result)
    tallies[Kpi.BACKORDER_RATE] = (int(result.backordered), 1)
    backordered_lines = {b.line_no for b in facts.backorders.values()}
    stockouts = result.stockouts
    for line_no, line in lines.items():
        stocked_out, ordered = stockouts.get(line.sku, (0, 0))
        stockouts[line.sku] = (stocked_out + (line_no in backordered_lines), ordered + 1)

    if result.cancelled:
        result.notes.append("cancelled by the customer: counted in fill rates, backorder rate and stockouts only")
        return result

    # Per shipment: dispatch and delivery punctuality.
    shipments = facts.shipments
    dispatched_on_time = sum(1 for s in shipments.values() if s.shipped_at <= s.ship_by)
    tallies[Kpi.ON_TIME_DISPATCH_RATE] = (dispatched_on_time, len(shipments))
    delivered_known = [(sid, d) for sid, d in facts.deliveries.items() if sid in shipments]
    late = [sid for sid, d in delivered_known if d.delivered_at > shipments[sid].promised_delivery_at]
    tallies[Kpi.ON_TIME_DELIVERY_RATE] = (len(delivered_known) - len(late), len(delivered_known))

    # Per delivered line: damage and accuracy.
    delivered_units = damaged_units = accurate_lines = delivered_lines = 0
    inaccurate: list[str] = []
    for sid, delivery in facts.deliveries.items():
        shipment = shipments.get(sid)
        for dline in delivery.lines:
            delivered_units += dline.qty_delivered
            damaged_units += dline.qty_damaged
            delivered_lines += 1
            ordered_line = lines.get(dline.line_no)
            shipped_qty = shipment.lines.get(dline.line_no, 0) if shipment else None
            sku_ok = ordered_line is not None and (
                dline.sku == ordered_line.sku or dline.sku in ordered_line.substitutes
            )
            qty_ok = shipped_qty is None or dline.qty_delivered == shipped_qty
            if sku_ok and qty_ok:
                accurate_lines += 1
            elif not sku_ok:
                inaccurate.append(f"shipment {sid} line {dline.line_no}: sku {dline.sku} not ordered nor consented")
            else:
                inaccurate.append(
                    f"shipment {sid} line {dline.line_no}: {dline.qty_delivered} delivered of {shipped_qty} shipped"
                )
    tallies[Kpi.DAMAGE_RATE] = (damaged_units, delivered_units)
    tallies[Kpi.ORDER_ACCURACY] = (accurate_lines, delivered_lines)

    # Durations.
    durations = result.durations
    fully_allocated = facts.fully_allocated_at()
    _add(durations, Series.TRANSMISSION, _micros(received.placed_at, received.received_at))
    _add(durations, Series.PROCESSING, _micros(received.received_at, fully_allocated))
    if facts.backorders:
        _add(durations, Series.BACKORDER_WAIT, _micros(facts.backordered_at(), fully_allocated))
    for sid, delivery in facts.deliveries.items():
        if sid in shipments:
            _add(durations, Series.TRANSIT, _micros(shipments[sid].shipped_at, delivery.delivered_at))

    if stage is not Stage.DELIVERED:
        result.notes.append(f"open ({stage}): not in order-level delivery KPIs yet")
        return result

    _add(durations, Series.WAREHOUSE, _micros(fully_allocated, facts.last_shipped_at()))
    cycle = _micros(received.placed_at, facts.last_delivered_at())
    _add(durations, Series.CYCLE_TIME, cycle)
    _add(
        durations,
        Series.CYCLE_TIME_BACKORDERED if result.backordered else Series.CYCLE_TIME_NOT_BACKORDERED,
        cycle,
    )

    delivered_per_line: dict[int, int] = {}
    for delivery in facts.deliveries.values():
        for dline in delivery.lines:
            delivered_per_line[dline.line_no] = delivered_per_line.get(dline.line_no, 0) + dline.qty_delivered
    short = [
        f"line {n}: {delivered_per_line.get(n, 0)} of {line.qty} delivered"
        for n, line in lines.items()
        if delivered_per_line.get(n, 0) < line.qty
    ]
    criteria = result.criteria
    criteria[Criterion.COMPLETE] = CriterionResult(
        not short, "; ".join(short) if short else "every line delivered in full"
    )
    criteria[Criterion.ON_TIME] = CriterionResult(
        not late,
        "late: " + ", ".join(f"shipment {sid}" for sid in late)
        if late
        else "every shipment delivered by its promised time",
    )
    criteria[Criterion.DAMAGE_FREE] = CriterionResult(
        damaged_units == 0, f"{damaged_units} of {delivered_units} units damaged"
    )
    criteria[Criterion.ACCURATE] = CriterionResult(
        not inaccurate, "; ".join(inaccurate) if inaccurate else "every delivered line matches the order"
    )
    in_full = not short
    on_time = not late
    result.perfect = in_full and on_time and damaged_units == 0 and not inaccurate
    tallies[Kpi.IN_FULL_RATE] = (int(in_full), 1)
    tallies[Kpi.OTIF_RATE] = (int(in_full and on_time), 1)
    tallies[Kpi.DAMAGE_FREE_ORDER_RATE] = (int(damaged_units == 0), 1)
    tallies[Kpi.PERFECT_ORDER_RATE] = (int(result.perfect), 1)
    return result


def _fill_rates(facts: OrderFacts, lines: dict[int, OrderedLineFact], result: OrderScore) -> None:
    """Fill rates at first pass and secondary, over orders whose first pass is decided."""
    if not facts.allocations and not facts.backorders:
        result.notes.append("first pass not decided yet: not in fill rates")
        return
    first_pass: dict[int, int] = {}
    any_pass: dict[int, int] = {}
    substituted = complete = False
    for allocation in facts.allocations.values():
        any_pass[allocation.line_no] = any_pass.get(allocation.line_no, 0) + allocation.qty
        complete = complete or allocation.complete
        if allocation.substitute_for is not None:
            substituted = True
        elif allocation.first_pass:
            first_pass[allocation.line_no] = first_pass.get(allocation.line_no, 0) + allocation.qty
    units = fp_units = any_units = fp_full = any_full = 0
    for line_no, line in lines.items():
        units += line.qty
        fp = min(first_pass.get(line_no, 0), line.qty)
        secondary = line.qty if complete else min(any_pass.get(line_no, 0), line.qty)
        fp_units += fp
        any_units += secondary
        fp_full += fp == line.qty
        any_full += secondary == line.qty
    tallies = result.tallies
    tallies[Kpi.LINE_FILL_RATE_FIRST_PASS] = (fp_full, len(lines))
    tallies[Kpi.UNIT_FILL_RATE_FIRST_PASS] = (fp_units, units)
    tallies[Kpi.ORDER_FILL_RATE_FIRST_PASS] = (int(fp_full == len(lines) and not substituted), 1)
    tallies[Kpi.LINE_FILL_RATE_SECONDARY] = (any_full, len(lines))
    tallies[Kpi.UNIT_FILL_RATE_SECONDARY] = (any_units, units)
    tallies[Kpi.ORDER_FILL_RATE_SECONDARY] = (int(any_full == len(lines)), 1)


def _add(durations: dict[Series, list[int]], series: Series, micros: int | None) -> None:
    if micros is not None:
        durations.setdefault(series, []).append(micros)


# -- contributions: integer counters -----------------------------------------------

Counters = dict[str, int]
Parts = dict[str, Counters]
"""An aggregate's counters by part: ``counts`` (orders, tallies, failures, open stages),
``stockouts`` (per SKU) and one part per duration series. Stored and read per part, so
a KPI summary never decodes sketches and a cycle-time report never decodes SKUs."""

COUNTS = "counts"
STOCKOUTS = "stockouts"
PARTS = (COUNTS, STOCKOUTS, *(s.value for s in Series if s is not Series.CYCLE_TIME))
"""Stored parts. Cycle time is not one of them: it is the sum of its backordered and not
backordered halves, added up when read."""

HISTOGRAM_BOUNDS_SECONDS: tuple[float, ...] = (
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    2 * 3600.0,
    4 * 3600.0,
    8 * 3600.0,
    12 * 3600.0,
    86400.0,
    2 * 86400.0,
    3 * 86400.0,
    5 * 86400.0,
    7 * 86400.0,
    14 * 86400.0,
    30 * 86400.0,
)
"""Fixed upper bounds (seconds, inclusive) of the cycle-time histogram:
1m 5m 15m 30m 1h 2h 4h 8h 12h 1d 2d 3d 5d 7d 14d 30d, then +Inf."""
_HISTOGRAM_BOUNDS_MICROS = tuple(round(bound * 1_000_000) for bound in HISTOGRAM_BOUNDS_SECONDS)
_HISTOGRAM_KEYS = tuple(f"h{i}" for i in range(len(HISTOGRAM_BOUNDS_SECONDS) + 1))
# Counter names, built once (formatting an enum member is slow, and this is the hot path).
_NUM_KEYS = {kpi: f"num|{kpi.value}" for kpi in Kpi}
_DEN_KEYS = {kpi: f"den|{kpi.value}" for kpi in Kpi}
_FAIL_KEYS = {criterion: f"fail|{criterion.value}" for criterion in Criterion}
_OPEN_KEYS = {stage: f"open|{stage.value}" for stage in Stage}

PERCENTILES = (0.5, 0.9, 0.95, 0.99)
SKETCH = LogarithmicMapping(SKETCH_RELATIVE_ACCURACY)
"""DDSketch's logarithmic key mapping: a value v falls in bin key(v), represented by
value(key) within 1% of v. Bins hold integer counts, so sketches add and subtract exactly."""


def duration_counters(samples_micros: Iterable[int]) -> Counters:
    """Counters of a set of durations: count ``n``, sum ``s`` and sum of squares ``q``
    (microseconds, exact), histogram buckets ``h<i>``, DDSketch bins ``b<key>`` and the
    sketch's zero bin ``z``."""
    counters: Counters = {}
    for micros in samples_micros:
        counters["n"] = counters.get("n", 0) + 1
        counters["s"] = counters.get("s", 0) + micros
        counters["q"] = counters.get("q", 0) + micros * micros
        bucket = _HISTOGRAM_KEYS[bisect_left(_HISTOGRAM_BOUNDS_MICROS, micros)]
        counters[bucket] = counters.get(bucket, 0) + 1
        seconds = micros / 1_000_000
        sketch_bin = f"b{SKETCH.key(seconds)}" if seconds > SKETCH.min_possible else "z"
        counters[sketch_bin] = counters.get(sketch_bin, 0) + 1
    return counters


def _counts_of(order: OrderScore) -> Counters:
    counts: Counters = {"received": 1}
    if order.cancelled:
        # Neither delivered nor open; ``score`` gave it only fill and backorder tallies.
        counts["cancelled"] = 1
    elif order.stage is Stage.DELIVERED:
        counts["delivered"] = 1
    elif order.stage in RECEIVED_OPEN_STAGES:
        counts["open"] = 1
        counts[_OPEN_KEYS[order.stage]] = 1
    for kpi, (numerator, denominator) in order.tallies.items():
        if numerator:
            counts[_NUM_KEYS[kpi]] = numerator
        if denominator:
            counts[_DEN_KEYS[kpi]] = denominator
    for criterion, outcome in order.criteria.items():
        if not outcome.passed:
            counts[_FAIL_KEYS[criterion]] = 1
    return counts


@dataclass(frozen=True)
class Contribution:
    """What one order adds to the aggregates of its cohort, and of its groups.

    It is stored with the order, so that exactly what was added is subtracted when the
    order's facts change (even if the scoring rules changed in between)."""

    cohort: int | None
    """order.received event time, whole seconds since the epoch; None: not received yet,
    so in no cohort and contributing nothing."""
    groups: dict[str, tuple[str, ...]]
    parts: Parts

    @classmethod
    def of(cls, order: OrderScore) -> Contribution:
        groups = {str(d): g for d, g in order.groups.items()}
        if order.received_at is None:
            return cls(None, groups, {})
        parts: Parts = {COUNTS: _counts_of(order)}
        stockouts: Counters = {}
        for sku, (stocked_out, ordered) in order.stockouts.items():
            if stocked_out:
                stockouts[f"b|{sku}"] = stocked_out
            stockouts[f"o|{sku}"] = ordered
        if stockouts:
            parts[STOCKOUTS] = stockouts
        for series, samples in order.durations.items():
            if series is not Series.CYCLE_TIME:  # the sum of its two halves: derived when read
                parts[series.value] = duration_counters(samples)
        return cls(math.floor(order.received_at.timestamp()), groups, parts)

    def scopes(self) -> list[tuple[str, str]]:
        """(dimension, group) aggregates the order counts in; ("", "") is overall."""
        return [("", ""), *((d, g) for d in sorted(self.groups) for g in self.groups[d])]

    def to_json(self) -> dict[str, Any]:
        return {"cohort": self.cohort, "groups": {d: list(g) for d, g in self.groups.items()}, "parts": self.parts}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Contribution:
        return cls(data["cohort"], {d: tuple(g) for d, g in data["groups"].items()}, data["parts"])


def add_counters(total: Counters, counters: Mapping[str, int], sign: int = 1) -> None:
    """total += sign * counters, keeping only non-zero counters (so deltas stay sparse)."""
    for key, value in counters.items():
        summed = total.get(key, 0) + sign * value
        if summed:
            total[key] = summed
        else:
            total.pop(key, None)


def add_parts(total: Parts, parts: Mapping[str, Mapping[str, int]], sign: int = 1) -> None:
    """total += sign * parts, part by part; parts left empty are dropped."""
    for part, counters in parts.items():
        mine = total.get(part)
        if mine is None:
            mine = total[part] = {}
        add_counters(mine, counters, sign)
        if not mine:
            del total[part]


def difference(new: Parts, old: Parts) -> Parts:
    """new - old, sparse; parts equal in both (most of them, for most events) are skipped whole."""
    delta: Parts = {}
    for part in new.keys() | old.keys():
        after = new.get(part, {})
        before = old.get(part, {})
        if after == before:
            continue
        changed = {}
        for key in after.keys() | before.keys():
            value = after.get(key, 0) - before.get(key, 0)
            if value:
                changed[key] = value
        if changed:
            delta[part] = changed
    return delta


# -- reading aggregates ------------------------------------------------------------


@dataclass(frozen=True)
class Distribution:
    """A duration series: mean and population std (exact), percentiles (DDSketch, 1%
    relative error) and the fixed histogram."""

    counters: Mapping[str, int]

    @property
    def count(self) -> int:
        return self.counters.get("n", 0)

    @property
    def total_seconds(self) -> float:
        return self.counters.get("s", 0) / 1_000_000

    @property
    def mean_seconds(self) -> float | None:
        count = self.count
        return self.counters.get("s", 0) / (count * 1_000_000) if count else None

    @property
    def std_seconds(self) -> float | None:
        """Population standard deviation, from exact integer sums (no cancellation error)."""
        count = self.count
        if not count:
            return None
        total = self.counters.get("s", 0)
        spread = count * self.counters.get("q", 0) - total * total
        return math.sqrt(max(spread, 0)) / count / 1_000_000

    @property
    def buckets(self) -> list[int]:
        return [self.counters.get(key, 0) for key in _HISTOGRAM_KEYS]

    def percentile(self, q: float) -> float | None:
        """DDSketch's quantile: the bin holding rank q * (n - 1), as its representative value."""
        count = self.count
        if not count:
            return None
        rank = q * (count - 1)
        running = self.counters.get("z", 0)
        if rank < running:
            return 0.0
        bins = sorted((int(key[1:]), n) for key, n in self.counters.items() if key[0] == "b")
        for key, n in bins:
            running += n
            if running > rank:
                return float(SKETCH.value(key))
        return float(SKETCH.value(bins[-1][0])) if bins else 0.0


@dataclass
class Aggregate:
    """KPIs over a set of orders: the sum of their contributions, with typed readers.

    Readers look up the names they know, so counters of a KPI, criterion, stage or series
    that a later version no longer has are ignored rather than failing."""

    parts: Parts = field(default_factory=dict)

    def add(self, parts: Mapping[str, Mapping[str, int]], sign: int = 1) -> None:
        add_parts(self.parts, parts, sign)

    def merge(self, other: Aggregate) -> None:
        add_parts(self.parts, other.parts)

    def _count(self, key: str) -> int:
        return self.parts.get(COUNTS, {}).get(key, 0)

    @property
    def orders_received(self) -> int:
        return self._count("received")

    @property
    def orders_cancelled(self) -> int:
        return self._count("cancelled")

    @property
    def orders_delivered(self) -> int:
        return self._count("delivered")

    @property
    def orders_open(self) -> int:
        return self._count("open")

    @property
    def tallies(self) -> dict[Kpi, tuple[int, int]]:
        counts = self.parts.get(COUNTS, {})
        return {kpi: (counts.get(_NUM_KEYS[kpi], 0), counts.get(_DEN_KEYS[kpi], 0)) for kpi in Kpi}

    @property
    def failures(self) -> dict[Criterion, int]:
        return {criterion: self._count(_FAIL_KEYS[criterion]) for criterion in Criterion}

    @property
    def open_by_stage(self) -> dict[Stage, int]:
        return {stage: self._count(_OPEN_KEYS[stage]) for stage in RECEIVED_OPEN_STAGES}

    @property
    def stockouts(self) -> dict[str, tuple[int, int]]:
        """sku -> (backordered lines, ordered lines)."""
        counters = self.parts.get(STOCKOUTS, {})
        return {
            key[2:]: (counters.get(f"b|{key[2:]}", 0), ordered)
            for key, ordered in counters.items()
            if key.startswith("o|")
        }

    def distribution(self, series: Series) -> Distribution:
        if series is Series.CYCLE_TIME:
            total: Counters = {}
            for half in (Series.CYCLE_TIME_BACKORDERED, Series.CYCLE_TIME_NOT_BACKORDERED):
                add_counters(total, self.parts.get(half.value, {}))
            return Distribution(total)
        return Distribution(self.parts.get(series.value, {}))

    @property
    def durations(self) -> dict[Series, Distribution]:
        return {series: self.distribution(series) for series in Series}

    def rate(self, kpi: Kpi) -> float | None:
        numerator, denominator = self._count(_NUM_KEYS[kpi]), self._count(_DEN_KEYS[kpi])
        return numerator / denominator if denominator else None

    def top_stockouts(self, limit: int = 10) -> list[tuple[str, int, int]]:
        """SKUs by stockout frequency (backordered lines / ordered lines), most often first."""
        counters = self.parts.get(STOCKOUTS, {})
        rows = []
        for key, stocked_out in counters.items():
            if key.startswith("b|") and stocked_out > 0:
                sku = key[2:]
                ordered = counters.get(f"o|{sku}", 0)
                if ordered > 0:
                    rows.append((sku, stocked_out, ordered))
        rows.sort(key=lambda r: (-r[1] / r[2], -r[1], r[0]))
        return rows[:limit]


def aggregate(scores: Iterable[OrderScore]) -> Aggregate:
    total = Aggregate()
    for order in scores:
        total.add(Contribution.of(order).parts)
    return total


def aggregate_by(scores: Sequence[OrderScore], dimension: Dimension) -> dict[str, Aggregate]:
    """One aggregate per group; a split order counts in each of its warehouses/carriers."""
    groups: dict[str, Aggregate] = {}
    for order in scores:
        parts = Contribution.of(order).parts
        for key in order.groups[dimension]:
            groups.setdefault(key, Aggregate()).add(parts)
    return dict(sorted(groups.items()))
