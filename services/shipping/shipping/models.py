"""The shipping service's tables (on its own registry) and API schemas."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from fulfil.events import CustomerTier, DelayStage, DeliveredLine, LineQuantity, ServiceLevel
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sqlalchemy import JSON, Column, DateTime, Dialect, Index, String, TypeDecorator
from sqlalchemy.orm import registry
from sqlmodel import Field as SQLField
from sqlmodel import SQLModel

from shipping.domain import CarrierStatus, ExceptionReason, ShipmentStatus


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, on SQLite (which stores naive text) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_column(*, nullable: bool = True, index: bool = False) -> Any:
    return SQLField(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


class ShippingTable(SQLModel, registry=registry()):
    pass


class OrderTermsRow(ShippingTable, table=True):
    """What shipping copied from order.received, and whether the order was cancelled
    (kept even when cancellation arrives first, so a later allocation ships nothing)."""

    __tablename__ = "shipping_orders"

    order_id: str = SQLField(primary_key=True, max_length=64)
    received: bool = False
    service_level: str = SQLField(default=ServiceLevel.STANDARD.value, max_length=20)
    requested_delivery_date: date | None = None
    placed_at: datetime | None = utc_column()
    customer_tier: str = SQLField(default=CustomerTier.STANDARD.value, max_length=20)
    cancelled_at: datetime | None = utc_column()
    cancel_reason: str | None = None


class ShipmentRow(ShippingTable, table=True):
    __tablename__ = "shipments"
    __table_args__ = (
        # A tracking number names one parcel of one carrier; the database guarantees it.
        Index("ux_shipments_carrier_tracking", "carrier", "tracking_number", unique=True),
    )

    id: str = SQLField(primary_key=True, max_length=64)
    order_id: str = SQLField(index=True, max_length=64)
    warehouse_id: str = SQLField(max_length=64)
    status: str = SQLField(max_length=20, index=True)
    lines: list[dict[str, Any]] = SQLField(sa_column=Column(JSON, nullable=False))
    allocated_at: datetime = utc_column(nullable=False)
    ship_by: datetime = utc_column(nullable=False, index=True)
    original_promised_delivery_at: datetime = utc_column(nullable=False)
    promised_delivery_at: datetime = utc_column(nullable=False, index=True)
    promise_reason: str = SQLField(max_length=40)
    service_level: str = SQLField(max_length=20)
    customer_tier: str = SQLField(max_length=20)
    carrier: str | None = SQLField(default=None, sa_column=Column(String(64)))
    tracking_number: str | None = SQLField(default=None, sa_column=Column(String(128)))
    shipped_at: datetime | None = utc_column()
    shipped_lines: list[dict[str, Any]] | None = SQLField(default=None, sa_column=Column(JSON))
    carrier_status: str | None = SQLField(default=None, max_length=20)
    carrier_status_at: datetime | None = utc_column()
    carrier_estimate: datetime | None = utc_column()
    delivered_at: datetime | None = utc_column()
    delivered_lines: list[dict[str, Any]] | None = SQLField(default=None, sa_column=Column(JSON))
    signed_by: str | None = None
    cancelled_at: datetime | None = utc_column()
    late_dispatch: bool = False
    late_delivery: bool = False
    next_check_at: datetime | None = utc_column(index=True)
    """When the delay scanner must look at this shipment next; None when nothing more can
    be announced (delivered, cancelled, or escalations exhausted)."""
    parent_shipment_id: str | None = SQLField(default=None, sa_column=Column(String(64)))
    """The shipment this one is the undispatched rest of (partial dispatch)."""
    remainder_shipment_id: str | None = SQLField(default=None, sa_column=Column(String(64)))
    """Where the lines this shipment left behind at a partial dispatch went."""


class TimelineRow(ShippingTable, table=True):
    """What happened to a shipment, including what was refused (a cancel after dispatch)."""

    __tablename__ = "shipment_timeline"

    id: int | None = SQLField(default=None, primary_key=True)
    shipment_id: str = SQLField(index=True, max_length=64)
    at: datetime = utc_column(nullable=False)
    kind: str = SQLField(max_length=40)
    detail: dict[str, Any] = SQLField(sa_column=Column(JSON, nullable=False))


class CarrierEventRow(ShippingTable, table=True):
    """Every tracking event a carrier sent, keyed by the carrier's event id (replays are no-ops)."""

    __tablename__ = "carrier_events"

    carrier: str = SQLField(primary_key=True, max_length=64)
    event_id: str = SQLField(primary_key=True, max_length=128)
    shipment_id: str = SQLField(index=True, max_length=64)
    status: str = SQLField(max_length=20)
    occurred_at: datetime = utc_column(nullable=False)
    received_at: datetime = utc_column(nullable=False)
    applied: bool
    """False when the event was older than the shipment's latest status (recorded only)."""


class DelayNoticeRow(ShippingTable, table=True):
    """Which (shipment, stage) delays were announced, when last, and how often."""

    __tablename__ = "delay_notices"

    shipment_id: str = SQLField(primary_key=True, max_length=64)
    stage: str = SQLField(primary_key=True, max_length=20)
    first_announced_at: datetime = utc_column(nullable=False)
    last_announced_at: datetime = utc_column(nullable=False)
    announcements: int = 1


class CarrierExceptionNoticeRow(ShippingTable, table=True):
    """Which carrier exceptions were announced per (shipment, reason): repeated scans of the
    same trouble are announced again only as capped escalations or when the estimate slips."""

    __tablename__ = "carrier_exception_notices"

    shipment_id: str = SQLField(primary_key=True, max_length=64)
    reason: str = SQLField(primary_key=True, max_length=20)
    first_announced_at: datetime = utc_column(nullable=False)
    last_announced_at: datetime = utc_column(nullable=False)
    announcements: int = 1
    announced_estimate: datetime | None = utc_column()


# -- API schemas -------------------------------------------------------------------


class TimelineEntry(BaseModel):
    at: datetime
    kind: str
    detail: dict[str, Any]


class ShipmentPublic(BaseModel):
    id: str
    order_id: str
    warehouse_id: str
    status: ShipmentStatus
    lines: list[LineQuantity]
    allocated_at: datetime
    ship_by: datetime
    original_promised_delivery_at: datetime
    promised_delivery_at: datetime
    """The current promise (or estimate); see the timeline for each change and its reason."""
    promise_reason: str
    service_level: ServiceLevel
    customer_tier: CustomerTier
    carrier: str | None
    tracking_number: str | None
    shipped_at: datetime | None
    shipped_lines: list[LineQuantity] | None
    carrier_status: CarrierStatus | None
    carrier_status_at: datetime | None
    carrier_estimate: datetime | None
    delivered_at: datetime | None
    delivered_lines: list[DeliveredLine] | None
    signed_by: str | None
    cancelled_at: datetime | None
    late_dispatch: bool
    late_delivery: bool
    parent_shipment_id: str | None = None
    """Set on the pending rest of a partially dispatched shipment."""
    remainder_shipment_id: str | None = None
    """Set on a partially dispatched shipment: the pending shipment holding what stayed behind."""
    timeline: list[TimelineEntry] = []


class ShipmentList(BaseModel):
    items: list[ShipmentPublic]
    next_cursor: str | None = None
    """Pass as ``cursor`` to get the next page; absent on the last page."""


class DispatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    carrier: str = Field(min_length=1, max_length=64)
    tracking_number: str = Field(min_length=1, max_length=128)
    lines: list[LineQuantity] | None = None
    """Defaults to every line of the shipment."""
    dispatched_at: AwareDatetime | None = None
    """When the goods left (event time); defaults to now. Must not be in the future."""


class CarrierEvent(BaseModel):
    """A tracking event as a carrier posts it."""

    model_config = ConfigDict(extra="ignore")

    event_id: str = Field(min_length=1, max_length=128)
    tracking_number: str = Field(min_length=1, max_length=128)
    status: CarrierStatus
    occurred_at: AwareDatetime
    estimated_delivery_at: AwareDatetime | None = None
    lines: list[DeliveredLine] | None = None
    """delivered: what was handed over; defaults to every shipped line, undamaged."""
    signed_by: str | None = Field(default=None, max_length=200)
    reason: ExceptionReason | None = None
    """exception: why; required for that status."""
    description: str | None = Field(default=None, max_length=500)


class CarrierEventAck(BaseModel):
    event_id: str
    shipment_id: str | None
    outcome: str
    """applied, recorded (older than the latest status), or duplicate."""


class DelayNoticePublic(BaseModel):
    shipment_id: str
    stage: DelayStage
    first_announced_at: datetime
    last_announced_at: datetime
    announcements: int
