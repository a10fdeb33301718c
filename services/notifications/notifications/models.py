"""Tables of the notifications service and its API schemas."""

from __future__ import annotations

from datetime import UTC, datetime, time
from typing import Any

from fulfil.events import CustomerTier, Locale, ServiceLevel
from pydantic import BaseModel, ConfigDict
from pydantic import Field as PydanticField
from sqlalchemy import JSON, Column, DateTime, Index, Text, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import registry
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from notifications.domain import Channel, DeliveryStatus, EndpointStatus, NoticeType


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on SQLite (which drops the offset) as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_column(*, nullable: bool = False, index: bool = False) -> Any:
    return Field(sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


class NotificationsTable(SQLModel, registry=registry()):
    pass


class CustomerProfile(NotificationsTable, table=True):
    """What order.received told us about a customer (contact, locale, tier)."""

    __tablename__ = "customer_profile"

    customer_id: str = Field(primary_key=True, max_length=100)
    email: str | None = Field(default=None, max_length=320)
    locale: str = Field(default=Locale.EN, max_length=16)
    tier: str = Field(default=CustomerTier.STANDARD, max_length=16)
    updated_at: datetime = utc_column()


class OrderCopy(NotificationsTable, table=True):
    """The order facts later notices need (whose order, how fast, what was ordered)."""

    __tablename__ = "order_copy"

    order_id: str = Field(primary_key=True, max_length=64)
    customer_id: str = Field(index=True, max_length=100)
    client: str = Field(max_length=100)
    external_ref: str = Field(max_length=200)
    service_level: str = Field(default=ServiceLevel.STANDARD, max_length=16)
    locale: str = Field(default=Locale.EN, max_length=16)
    email: str | None = Field(default=None, max_length=320)
    lines: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    allow_partial: bool = True
    """False: ship-complete, the whole order waits for its backordered lines."""
    placed_at: datetime = utc_column()


class Preferences(NotificationsTable, table=True):
    """A customer's own choices, overriding what their orders say."""

    __tablename__ = "preferences"

    customer_id: str = Field(primary_key=True, max_length=100)
    locale: str | None = Field(default=None, max_length=16)
    """None: each order's locale."""
    email: str | None = Field(default=None, max_length=320)
    """None: the email address the orders give (unless email is switched off)."""
    email_enabled: bool = True
    events: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    quiet_start: time | None = None
    quiet_end: time | None = None
    quiet_timezone: str | None = Field(default=None, max_length=64)
    updated_at: datetime = utc_column()


class WebhookEndpoint(NotificationsTable, table=True):
    """A customer's webhook receiver and its signing secret (one per customer)."""

    __tablename__ = "webhook_endpoint"

    customer_id: str = Field(primary_key=True, max_length=100)
    url: str = Field(max_length=2000)
    secret: str = Field(max_length=200)
    status: str = Field(default=EndpointStatus.ACTIVE, max_length=16)
    failing_since: datetime | None = utc_column(nullable=True)
    disabled_at: datetime | None = utc_column(nullable=True)
    disabled_reason: str | None = Field(default=None, max_length=500)
    created_at: datetime = utc_column()


class Delivery(NotificationsTable, table=True):
    """One notice to one customer on one channel: the durable delivery queue."""

    __tablename__ = "delivery"
    __table_args__ = (
        UniqueConstraint("ce_id", "customer_id", "channel", name="uq_delivery_event_customer_channel"),
        Index("ix_delivery_due", "status", "next_attempt_at"),
    )

    id: str = Field(primary_key=True, max_length=36)
    """Also the webhook-id: stable across retries, so receivers can drop duplicates."""
    ce_id: str = Field(max_length=200)
    order_id: str | None = Field(default=None, index=True, max_length=64)
    customer_id: str = Field(index=True, max_length=100)
    channel: str = Field(max_length=16)
    notice: str = Field(max_length=40)
    locale: str = Field(max_length=16)
    recipient: str = Field(max_length=2000)
    """The email address, or the webhook URL at the time the notice was queued."""
    subject: str = Field(sa_column=Column(Text, nullable=False))
    text_body: str = Field(sa_column=Column(Text, nullable=False))
    html_body: str = Field(sa_column=Column(Text, nullable=False))
    payload: str = Field(sa_column=Column(Text, nullable=False))
    """The webhook body, serialised once, so every resend is byte-identical."""
    status: str = Field(default=DeliveryStatus.PENDING, max_length=16)
    attempts_made: int = 0
    """Attempts in the current round (a manual retry starts a new round)."""
    next_attempt_at: datetime = utc_column()
    lease_until: datetime | None = utc_column(nullable=True)
    claim: str | None = Field(default=None, max_length=36)
    occurred_at: datetime = utc_column()
    """When the event happened in the world (for latency: occurred_at to delivered_at)."""
    created_at: datetime = utc_column()
    """When this row was written."""
    delivered_at: datetime | None = utc_column(nullable=True)
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class DeliveryAttempt(NotificationsTable, table=True):
    __tablename__ = "delivery_attempt"

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: str = Field(index=True, max_length=36)
    number: int
    started_at: datetime = utc_column()
    finished_at: datetime = utc_column()
    status_code: int | None = None
    outcome: str = Field(max_length=20)
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


# -- API schemas ------------------------------------------------------------------------


class QuietHoursIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: time
    end: time
    timezone: str = "UTC"


class PreferencesIn(BaseModel):
    """Every field is optional. An absent field keeps what was stored (on a first PUT: the
    default, which follows the customer's orders); an explicit null switches a channel off
    (``email``, ``webhook_url``, ``quiet_hours``) or returns to the default (``locale``:
    each order's locale; ``events``: every notice)."""

    model_config = ConfigDict(extra="forbid")

    locale: Locale | None = None
    email: str | None = PydanticField(default=None, max_length=320, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
    webhook_url: str | None = PydanticField(default=None, max_length=2000)
    events: list[NoticeType] | None = None
    quiet_hours: QuietHoursIn | None = None


class PreferencesOut(BaseModel):
    customer_id: str
    locale: Locale | None
    """None: each order's locale."""
    email: str | None
    """The address the customer gave us; None with ``email_enabled``: the orders' address."""
    email_enabled: bool
    webhook_url: str | None
    webhook_status: EndpointStatus | None
    events: list[NoticeType]
    quiet_hours: QuietHoursIn | None
    webhook_secret: str | None = None
    """Only in the response that created (or rotated) the webhook subscription: keep it."""
    updated_at: datetime


class AttemptOut(BaseModel):
    number: int
    started_at: datetime
    finished_at: datetime
    status_code: int | None
    outcome: str
    error: str | None


class DeliveryOut(BaseModel):
    id: str
    ce_id: str
    order_id: str | None
    customer_id: str
    channel: Channel
    notice: NoticeType
    locale: str
    recipient: str
    subject: str
    status: DeliveryStatus
    attempts_made: int
    next_attempt_at: datetime | None
    occurred_at: datetime
    created_at: datetime
    delivered_at: datetime | None
    last_error: str | None
    attempts: list[AttemptOut]
