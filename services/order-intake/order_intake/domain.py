"""Pure rules of order intake: validation beyond field shapes, the order status derived
from the set of events that happened to it, timeline summaries, and the token bucket.

No I/O here; every function is a rule and takes what it needs as arguments."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

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

SKU_PATTERN = r"^[A-Z0-9][A-Z0-9._-]{1,39}$"
"""A SKU: 2 to 40 characters, upper-case letters, digits, '.', '_' and '-', starting with a letter or digit."""

MAX_LINES = 500
MAX_FUTURE_PLACED_AT = timedelta(minutes=5)
"""Clock skew we tolerate between the client's clock and ours."""

ISO_COUNTRIES = frozenset(
    [
        "AD",
        "AE",
        "AF",
        "AG",
        "AI",
        "AL",
        "AM",
        "AO",
        "AQ",
        "AR",
        "AS",
        "AT",
        "AU",
        "AW",
        "AX",
        "AZ",
        "BA",
        "BB",
        "BD",
        "BE",
        "BF",
        "BG",
        "BH",
        "BI",
        "BJ",
        "BL",
        "BM",
        "BN",
        "BO",
        "BQ",
        "BR",
        "BS",
        "BT",
        "BV",
        "BW",
        "BY",
        "BZ",
        "CA",
        "CC",
        "CD",
        "CF",
        "CG",
        "CH",
        "CI",
        "CK",
        "CL",
        "CM",
        "CN",
        "CO",
        "CR",
        "CU",
        "CV",
        "CW",
        "CX",
        "CY",
        "CZ",
        "DE",
        "DJ",
        "DK",
        "DM",
        "DO",
        "DZ",
        "EC",
        "EE",
        "EG",
        "EH",
        "ER",
        "ES",
        "ET",
        "FI",
        "FJ",
        "FK",
        "FM",
        "FO",
        "FR",
        "GA",
        "GB",
        "GD",
        "GE",
        "GF",
        "GG",
        "GH",
        "GI",
        "GL",
        "GM",
        "GN",
        "GP",
        "GQ",
        "GR",
        "GS",
        "GT",
        "GU",
        "GW",
        "GY",
        "HK",
        "HM",
        "HN",
        "HR",
        "HT",
        "HU",
        "ID",
        "IE",
        "IL",
        "IM",
        "IN",
        "IO",
        "IQ",
        "IR",
        "IS",
        "IT",
        "JE",
        "JM",
        "JO",
        "JP",
        "KE",
        "KG",
        "KH",
        "KI",
        "KM",
        "KN",
        "KP",
        "KR",
        "KW",
        "KY",
        "KZ",
        "LA",
        "LB",
        "LC",
        "LI",
        "LK",
        "LR",
        "LS",
        "LT",
        "LU",
        "LV",
        "LY",
        "MA",
        "MC",
        "MD",
        "ME",
        "MF",
        "MG",
        "MH",
        "MK",
        "ML",
        "MM",
        "MN",
        "MO",
        "MP",
        "MQ",
        "MR",
        "MS",
        "MT",
        "MU",
        "MV",
        "MW",
        "MX",
        "MY",
        "MZ",
        "NA",
        "NC",
        "NE",
        "NF",
        "NG",
        "NI",
        "NL",
        "NO",
        "NP",
        "NR",
        "NU",
        "NZ",
        "OM",
        "PA",
        "PE",
        "PF",
        "PG",
        "PH",
        "PK",
        "PL",
        "PM",
        "PN",
        "PR",
        "PS",
        "PT",
        "PW",
        "PY",
        "QA",
        "RE",
        "RO",
        "RS",
        "RU",
        "RW",
        "SA",
        "SB",
        "SC",
        "SD",
        "SE",
        "SG",
        "SH",
        "SI",
        "SJ",
        "SK",
        "SL",
        "SM",
        "SN",
        "SO",
        "SR",
        "SS",
        "ST",
        "SV",
        "SX",
        "SY",
        "SZ",
        "TC",
        "TD",
        "TF",
        "TG",
        "TH",
        "TJ",
        "TK",
        "TL",
        "TM",
        "TN",
        "TO",
        "TR",
        "TT",
        "TV",
        "TW",
        "TZ",
        "UA",
        "UG",
        "UM",
        "US",
        "UY",
        "UZ",
        "VA",
        "VC",
        "VE",
        "VG",
        "VI",
        "VN",
        "VU",
        "WF",
        "WS",
        "YE",
        "YT",
        "ZA",
        "ZM",
        "ZW",
    ]
)
"""ISO 3166-1 alpha-2 country codes."""


class OrderStatus(StrEnum):
    RECEIVED = "received"
    ALLOCATED = "allocated"
    PARTIALLY_ALLOCATED = "partially_allocated"
    BACKORDERED = "backordered"
    PARTIALLY_SHIPPED = "partially_shipped"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"


SHIPPED_STATUSES = frozenset({OrderStatus.SHIPPED, OrderStatus.DELIVERED})
"""Once here, nothing is left to cancel."""


@dataclass(frozen=True)
class FieldError:
    location: tuple[str | int, ...]
    """Where in the order, e.g. ("lines", 2, "line_no")."""
    detail: str
    code: str

    @property
    def pointer(self) -> str:
        """The RFC 6901 JSON pointer of the location (names here need no escaping)."""
        return "".join(f"/{part}" for part in self.location)


def check_order_rules(
    line_numbers: Sequence[int | None], placed_at: datetime | None, now: datetime
) -> list[FieldError]:
    """Rules spanning fields that the field shapes cannot express; every violation, with its location.

    ``line_numbers`` has None for a line whose line_no is itself invalid, so that the rules
    can be checked, and reported with the field errors, even on an order that is invalid."""
    errors: list[FieldError] = []
    first_seen: dict[int, int] = {}
    for index, line_no in enumerate(line_numbers):
        if line_no is None:
            continue
        if line_no in first_seen:
            errors.append(
                FieldError(
                    ("lines", index, "line_no"),
                    f"line_no {line_no} is already used by /lines/{first_seen[line_no]}",
                    "duplicate_line_no",
                )
            )
        else:
            first_seen[line_no] = index
    if placed_at is not None and placed_at > now + MAX_FUTURE_PLACED_AT:
        errors.append(
            FieldError(
                ("placed_at",),
                f"placed_at may be at most {int(MAX_FUTURE_PLACED_AT.total_seconds() // 60)} minutes in the future",
                "placed_at_in_future",
            )
        )
    return errors


# -- the status, derived from the set of events --------------------------------------------

_TYPE_RANK = {
    "order.received": 0,
    "order.allocated": 1,
    "order.backordered": 2,
    "order.cancelled": 3,
    "order.shipped": 4,
    "order.delayed": 5,
    "order.delivered": 6,
}


def timeline_order(event: OrderEvent) -> tuple[datetime, int]:
    """Sort key of the timeline: event time, then causal rank for events at the same instant."""
    return event.occurred_at, _TYPE_RANK.get(event.type, 99)


@dataclass(frozen=True)
class LatestDelay:
    occurred_at: datetime
    stage: str
    reason: str
    new_estimate: datetime | None
    shipment_id: str | None


@dataclass(frozen=True)
class OrderState:
    status: OrderStatus
    delayed: bool
    latest_delay: LatestDelay | None


@dataclass
class _Tally:
    ordered: dict[int, int] = field(default_factory=dict)
    allocated: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    shipped: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    shipments: set[str] = field(default_factory=set)
    delivered_shipments: set[str] = field(default_factory=set)
    complete_allocation: bool = False
    backordered: bool = False
    cancelled: bool = False
    received: bool = False


def derive_state(events: Iterable[OrderEvent]) -> OrderState:
    """The order's status from everything that happened to it.

    Only sums, sets and a maximum are folded, so the result does not depend on the
    order in which events arrived; callers drop duplicates by ce_id before calling."""
    tally = _Tally()
    delays: list[OrderDelayed] = []
    for event in events:
        if isinstance(event, OrderReceived):
            tally.received = True
            tally.ordered = {line.line_no: line.qty for line in event.lines}
        elif isinstance(event, OrderAllocated):
            tally.complete_allocation |= event.complete
            for allocation in event.allocations:
                tally.allocated[allocation.line_no] += allocation.qty
        elif isinstance(event, OrderBackordered):
            tally.backordered = True
        elif isinstance(event, OrderShipped):
            tally.shipments.add(event.shipment_id)
            for line in event.lines:
                tally.shipped[line.line_no] += line.qty
        elif isinstance(event, OrderDelivered):
            tally.delivered_shipments.add(event.shipment_id)
        elif isinstance(event, OrderDelayed):
            delays.append(event)
        elif isinstance(event, OrderCancelled):
            tally.cancelled = True
    status = _status(tally)
    latest = max(delays, key=lambda d: (d.occurred_at, d.stage, d.reason), default=None)
    latest_delay = (
        LatestDelay(latest.occurred_at, latest.stage, latest.reason, latest.new_estimate, latest.shipment_id)
        if latest is not None
        else None
    )
    delayed = latest_delay is not None and status not in (OrderStatus.DELIVERED, OrderStatus.CANCELLED)
    return OrderState(status, delayed, latest_delay)


def _covers(done: dict[int, int], ordered: dict[int, int]) -> bool:
    return bool(ordered) and all(done.get(line_no, 0) >= qty for line_no, qty in ordered.items())


def _status(tally: _Tally) -> OrderStatus:
    # Without the order itself we cannot count lines; then trust what shipping said.
    fully_shipped = _covers(tally.shipped, tally.ordered) if tally.received else bool(tally.shipments)
    if fully_shipped:
        if tally.shipments and tally.shipments <= tally.delivered_shipments:
            return OrderStatus.DELIVERED
        return OrderStatus.SHIPPED
    if tally.cancelled:
        return OrderStatus.CANCELLED
    if tally.shipments:
        return OrderStatus.PARTIALLY_SHIPPED
    if tally.complete_allocation or _covers(tally.allocated, tally.ordered):
        return OrderStatus.ALLOCATED
    if any(tally.allocated.values()):
        return OrderStatus.PARTIALLY_ALLOCATED
    if tally.backordered:
        return OrderStatus.BACKORDERED
    return OrderStatus.RECEIVED


# -- what a timeline entry says ---------------------------------------------------------


def _units(count: int) -> str:
    return f"{count} unit{'s' if count != 1 else ''}"


def summarize(event: OrderEvent) -> str:
    """One line a person reads in the order's timeline."""
    if isinstance(event, OrderReceived):
        return f"Order {event.external_ref} received: {len(event.lines)} line(s), {_units(event.units())}"
    if isinstance(event, OrderAllocated):
        parts = []
        for a in sorted(event.allocations, key=lambda a: (a.line_no, a.sku, a.warehouse_id)):
            substitute = f" (substitute for {a.substitute_for})" if a.substitute_for else ""
            parts.append(f"line {a.line_no}: {a.qty} x {a.sku}{substitute} from {a.warehouse_id}")
        scope = "all lines covered" if event.complete else "partly covered"
        return f"Stock allocated, {scope}: " + "; ".join(parts)
    if isinstance(event, OrderBackordered):
        lines = ", ".join(f"line {line.line_no}: {line.qty} x {line.sku}" for line in event.lines)
        restock = f"; restock expected {event.expected_restock_date.isoformat()}" if event.expected_restock_date else ""
        return f"Backordered ({event.reason}): {lines}{restock}"
    if isinstance(event, OrderShipped):
        units = sum(line.qty for line in event.lines)
        return (
            f"Shipment {event.shipment_id} shipped from {event.warehouse_id} with {event.carrier}, "
            f"tracking number {event.tracking_number}: {_units(units)}; "
            f"promised delivery {event.promised_delivery_at.isoformat()}"
        )
    if isinstance(event, OrderDelivered):
        delivered = sum(line.qty_delivered for line in event.lines)
        damaged = sum(line.qty_damaged for line in event.lines)
        damage = f", {damaged} damaged" if damaged else ""
        return (
            f"Shipment {event.shipment_id} delivered at {event.delivered_at.isoformat()}: {_units(delivered)}{damage}"
        )
    if isinstance(event, OrderDelayed):
        estimate = f"; new estimate {event.new_estimate.isoformat()}" if event.new_estimate else ""
        shipment = f" of shipment {event.shipment_id}" if event.shipment_id else ""
        return f"Delayed at {event.stage}{shipment}: {event.reason}{estimate}"
    if isinstance(event, OrderCancelled):
        return f"Cancelled: {event.reason}"
    return event.type


# -- rate limiting ----------------------------------------------------------------------


@dataclass
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take`` says how long to wait when empty."""

    rate: float
    burst: float
    tokens: float
    updated_at: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens; 0 when allowed, else the seconds until enough have refilled."""
        elapsed = max(0.0, now - self.updated_at)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated_at = max(self.updated_at, now)
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


def retry_after_seconds(wait: float) -> int:
    return max(1, math.ceil(wait))
