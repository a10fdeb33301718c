"""Shipping rules with no I/O: promises, shipment plans, dispatch lines, carrier status
ordering and delay detection."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum

from fulfil.events import AllocatedLine, CustomerTier, DelayStage, DeliveredLine, LineQuantity, ServiceLevel


class ShipmentStatus(StrEnum):
    PENDING = "pending"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"


class CarrierStatus(StrEnum):
    IN_TRANSIT = "in_transit"
    OUT_FOR_DELIVERY = "out_for_delivery"
    DELIVERED = "delivered"
    EXCEPTION = "exception"


class ExceptionReason(StrEnum):
    ADDRESS_ISSUE = "address_issue"
    WEATHER = "weather"
    LOST = "lost"
    DAMAGED = "damaged"
    CUSTOMS = "customs"
    OTHER = "other"


class PromiseReason(StrEnum):
    """Why the current promised delivery time is what it is."""

    REQUESTED_DATE = "requested_delivery_date"
    SERVICE_LEVEL = "service_level_transit"
    REQUESTED_DATE_NOT_FEASIBLE = "requested_date_not_feasible"
    ORDER_TERMS_UNKNOWN = "order_terms_unknown"
    DISPATCH_LATE = "dispatch_late"
    TRANSIT_LATE = "transit_late"
    CARRIER_ESTIMATE = "carrier_estimate"
    DISPATCH_CARRIER = "dispatch_carrier_transit"
    """Handed to a carrier whose transit time differs from the warehouse's usual one."""


DEFAULT_TRANSIT_DAYS: dict[ServiceLevel, float] = {
    ServiceLevel.STANDARD: 3,
    ServiceLevel.EXPRESS: 1,
    ServiceLevel.ECONOMY: 5,
}


@dataclass(frozen=True)
class OrderTerms:
    """What shipping copies from order.received to make its promise."""

    service_level: ServiceLevel = ServiceLevel.STANDARD
    requested_delivery_date: date | None = None
    placed_at: datetime | None = None
    customer_tier: CustomerTier = CustomerTier.STANDARD
    known: bool = True
    """False when order.received was never seen: the defaults above stand in."""


UNKNOWN_TERMS = OrderTerms(known=False)


@dataclass(frozen=True)
class Promise:
    ship_by: datetime
    promised_delivery_at: datetime
    reason: PromiseReason


def end_of_day(day: date) -> datetime:
    """A promise for a date is kept until the last second of that day (UTC)."""
    return datetime.combine(day, time(23, 59, 59), tzinfo=UTC)


def requested_deadline(day: date, reference: datetime, compression: float = 1) -> datetime:
    """The end of the requested day; under demo time compression its distance from the
    order's placement shrinks like every other window, so the promise stays comparable."""
    deadline = end_of_day(day)
    if compression == 1:
        return deadline
    return reference + (deadline - reference) / compression


def make_promise(
    allocated_at: datetime, terms: OrderTerms, *, handling: timedelta, transit: timedelta, compression: float = 1
) -> Promise:
    """ship_by = allocated + handling; delivery = the requested date when it can be met,
    else ship_by + the service level's transit time."""
    ship_by = allocated_at + handling
    earliest = ship_by + transit
    if terms.requested_delivery_date is not None:
        requested = requested_deadline(terms.requested_delivery_date, terms.placed_at or allocated_at, compression)
        if requested >= earliest:
            return Promise(ship_by, requested, PromiseReason.REQUESTED_DATE)
        return Promise(ship_by, earliest, PromiseReason.REQUESTED_DATE_NOT_FEASIBLE)
    reason = PromiseReason.SERVICE_LEVEL if terms.known else PromiseReason.ORDER_TERMS_UNKNOWN
    return Promise(ship_by, earliest, reason)


@dataclass(frozen=True)
class PlannedShipment:
    warehouse_id: str
    lines: tuple[LineQuantity, ...]


def plan_shipments(allocations: Iterable[AllocatedLine]) -> list[PlannedShipment]:
    """One shipment per warehouse, in the order warehouses first appear in the allocation."""
    by_warehouse: dict[str, list[LineQuantity]] = {}
    for line in allocations:
        by_warehouse.setdefault(line.warehouse_id, []).append(
            LineQuantity(line_no=line.line_no, sku=line.sku, qty=line.qty)
        )
    return [PlannedShipment(warehouse, tuple(lines)) for warehouse, lines in by_warehouse.items()]


class InvalidDispatchLines(ValueError):
    """Dispatch lines that are not part of the shipment or exceed its quantities."""


def dispatch_lines(
    allocated: Sequence[LineQuantity], requested: Sequence[LineQuantity] | None
) -> tuple[LineQuantity, ...]:
    """The lines leaving the warehouse: all of the shipment, or the given subset of it."""
    if requested is None:
        return tuple(allocated)
    if not requested:
        raise InvalidDispatchLines("a dispatch must carry at least one line")
    available = {(line.line_no, line.sku): line.qty for line in allocated}
    asked: dict[tuple[int, str], int] = {}
    for line in requested:
        key = (line.line_no, line.sku)
        if key not in available:
            raise InvalidDispatchLines(f"line {line.line_no} ({line.sku}) is not part of this shipment")
        asked[key] = asked.get(key, 0) + line.qty
        if asked[key] > available[key]:
            raise InvalidDispatchLines(
                f"line {line.line_no} ({line.sku}): {asked[key]} asked, {available[key]} in the shipment"
            )
    return tuple(requested)


def promise_at_dispatch(
    promised: datetime,
    reason: PromiseReason,
    ship_by: datetime,
    shipped_at: datetime,
    *,
    usual_transit: timedelta,
    actual_transit: timedelta,
) -> datetime | None:
    """The current promise once the actual carrier is known, or None when it stands.
    Only a carrier whose transit time differs from the one the promise was made with
    moves it: a requested date stays while that carrier can still meet it."""
    if actual_transit == usual_transit:
        return None
    earliest = max(ship_by, shipped_at) + actual_transit
    if reason is PromiseReason.REQUESTED_DATE and earliest <= promised:
        return None
    return earliest if earliest != promised else None


def remaining_lines(allocated: Sequence[LineQuantity], dispatched: Sequence[LineQuantity]) -> tuple[LineQuantity, ...]:
    """What stays in the warehouse after a partial dispatch (validated by dispatch_lines)."""
    taken: dict[tuple[int, str], int] = {}
    for line in dispatched:
        taken[(line.line_no, line.sku)] = taken.get((line.line_no, line.sku), 0) + line.qty
    rest = []
    for line in allocated:
        left = line.qty - taken.pop((line.line_no, line.sku), 0)
        if left > 0:
            rest.append(LineQuantity(line_no=line.line_no, sku=line.sku, qty=left))
    return tuple(rest)


class InvalidDeliveredLines(ValueError):
    """Delivered lines a carrier reported that do not match what was shipped."""


def check_delivered_lines(shipped: Sequence[LineQuantity], delivered: Sequence[DeliveredLine]) -> None:
    """A carrier can hand over what was shipped, or less; never another line, more units
    than shipped, or more damaged units than delivered."""
    if not delivered:
        raise InvalidDeliveredLines("a delivery must list at least one line (or omit lines for all shipped)")
    available: dict[tuple[int, str], int] = {}
    for sent in shipped:
        available[(sent.line_no, sent.sku)] = available.get((sent.line_no, sent.sku), 0) + sent.qty
    seen: dict[tuple[int, str], int] = {}
    for line in delivered:
        key = (line.line_no, line.sku)
        if key not in available:
            raise InvalidDeliveredLines(f"line {line.line_no} ({line.sku}) was not shipped in this parcel")
        if line.qty_damaged > line.qty_delivered:
            raise InvalidDeliveredLines(
                f"line {line.line_no} ({line.sku}): {line.qty_damaged} damaged of {line.qty_delivered} delivered"
            )
        seen[key] = seen.get(key, 0) + line.qty_delivered
        if seen[key] > available[key]:
            raise InvalidDeliveredLines(
                f"line {line.line_no} ({line.sku}): {seen[key]} delivered, {available[key]} shipped"
            )
    if sum(seen.values()) == 0:
        raise InvalidDeliveredLines("a delivery of no units is not a delivery; report an exception instead")


def supersedes(
    current: CarrierStatus | None, current_at: datetime | None, incoming: CarrierStatus, incoming_at: datetime
) -> bool:
    """Whether a carrier event becomes the shipment's latest carrier status. Delivered is
    final; otherwise the later event time wins, so late-arriving old scans are only recorded."""
    if current is None or current_at is None:
        return True
    if current is CarrierStatus.DELIVERED:
        return False
    if incoming is CarrierStatus.DELIVERED:
        return True
    return incoming_at >= current_at


# -- delay detection -------------------------------------------------------------------


@dataclass(frozen=True)
class ShipmentTimes:
    """What delay detection needs to know about one shipment."""

    status: ShipmentStatus
    ship_by: datetime
    promised_delivery_at: datetime
    """The original promise: lateness is measured against what was promised."""
    carrier_estimate: datetime | None = None
    current_promise: datetime | None = None
    """Today's promise (e.g. moved for a slower carrier), if it differs from the original."""


@dataclass(frozen=True)
class Announced:
    """A (shipment, stage) delay already announced: when last, and how often in all."""

    last_at: datetime
    count: int


@dataclass(frozen=True)
class EscalationPolicy:
    escalate_after: timedelta
    """A delay is announced again only this long after its last announcement."""
    max_escalations: int
    """After the first notice, at most this many escalations: a lost parcel must not spam."""


MISSED_SHIP_BY = "missed_ship_by"
MISSED_PROMISED_DELIVERY = "missed_promised_delivery"
STILL_LATE = "still late"


def delay_reason(code: str, detail: str | None = None, *, escalation: bool = False) -> str:
    """``code: detail``: the code first, so notices can say it in the customer's words;
    the detail (and whether this repeats an earlier notice) for the people reading the timeline."""
    details = [part for part in (STILL_LATE if escalation else None, detail) if part]
    return f"{code}: {'; '.join(details)}" if details else code


def is_escalation(reason: str) -> bool:
    return reason.partition(": ")[2].startswith(STILL_LATE)


@dataclass(frozen=True)
class DelayFinding:
    stage: DelayStage
    reason: str
    new_estimate: datetime | None
    escalation: bool


def late_stage(shipment: ShipmentTimes, now: datetime) -> DelayStage | None:
    if shipment.status is ShipmentStatus.PENDING and now > shipment.ship_by:
        return DelayStage.DISPATCH
    if shipment.status is ShipmentStatus.SHIPPED and now > shipment.promised_delivery_at:
        return DelayStage.TRANSIT
    return None


def stage_of(status: ShipmentStatus) -> DelayStage | None:
    """The stage a shipment in this status can be late at."""
    return {ShipmentStatus.PENDING: DelayStage.DISPATCH, ShipmentStatus.SHIPPED: DelayStage.TRANSIT}.get(status)


def may_announce(announced: Announced | None, now: datetime, policy: EscalationPolicy) -> bool:
    """Once, then only as an escalation after the further delay, and never beyond the cap."""
    if announced is None:
        return True
    return announced.count <= policy.max_escalations and now >= announced.last_at + policy.escalate_after


def next_delay_check(shipment: ShipmentTimes, announced: Announced | None, policy: EscalationPolicy) -> datetime | None:
    """When the scanner must look at this shipment again (None: nothing left to announce).
    The scanner selects only shipments whose time has come, so shipments late forever
    never crowd out newer delays."""
    stage = stage_of(shipment.status)
    if stage is None:
        return None
    if announced is None:
        return shipment.ship_by if stage is DelayStage.DISPATCH else shipment.promised_delivery_at
    if announced.count > policy.max_escalations:
        return None
    return announced.last_at + policy.escalate_after


def detect_delay(
    shipment: ShipmentTimes,
    announced: Announced | None,
    now: datetime,
    *,
    policy: EscalationPolicy,
    transit_grace: timedelta,
) -> DelayFinding | None:
    """A late shipment is announced once per stage, then again only as an escalation once
    ``policy.escalate_after`` has passed since the last announcement, at most
    ``policy.max_escalations`` times."""
    stage = late_stage(shipment, now)
    if stage is None or not may_announce(announced, now, policy):
        return None
    escalation = announced is not None
    if stage is DelayStage.DISPATCH:
        lateness = now - shipment.ship_by
        # The promise slips by as much as the dispatch is late so far.
        estimate = shipment.promised_delivery_at + lateness
        code, detail = MISSED_SHIP_BY, f"not dispatched by {shipment.ship_by.isoformat()}, {_hours(lateness)} late"
    else:
        lateness = now - shipment.promised_delivery_at
        if shipment.carrier_estimate is not None and shipment.carrier_estimate > now:
            estimate = shipment.carrier_estimate
        elif shipment.current_promise is not None and shipment.current_promise > now:
            estimate = shipment.current_promise
        else:
            estimate = now + transit_grace
        code = MISSED_PROMISED_DELIVERY
        detail = f"not delivered by {shipment.promised_delivery_at.isoformat()}, {_hours(lateness)} late"
    return DelayFinding(stage, delay_reason(code, detail, escalation=escalation), estimate, escalation)


def _hours(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:.1f} h"
