"""The kpi service's tables and API schemas (on its own registry)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel
from sqlalchemy import BigInteger, Column, DateTime, Index, Text
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel


class KpiTable(SQLModel, registry=registry()):
    pass


class OrderRow(KpiTable, table=True):
    """One order that is open or inside the settle window: its facts (domain.OrderFacts)
    and what it currently adds to the aggregates (domain.Contribution), as JSON, with the
    columns the backlog and settling filter on. Times are UTC."""

    __tablename__ = "kpi_orders"
    # The backlog (by stage, oldest first) and settling (closed, received long ago) read through it.
    __table_args__ = (Index("ix_kpi_orders_stage_received", "stage", "received_at"),)

    order_id: str = Field(primary_key=True, max_length=64)
    received_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    """Event time of order.received: the cohort the order counts in."""
    stage: str = Field(max_length=20)
    stage_since: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    facts: str = Field(sa_column=Column(Text, nullable=False))
    contribution: str = Field(sa_column=Column(Text, nullable=False))


class AggregateRow(KpiTable, table=True):
    """The counters (JSON) of one part of one cohort bucket, overall or for one group.

    ``level`` is 1m, 1h or 6h with ``start`` the bucket's first second (UTC epoch), or
    "all" with ``start`` 0 for every cohort older than the settle window (see
    kpi.cohorts). ``dimension`` and ``group`` are "" for all orders. ``key`` joins the
    five, so that a fold looks its rows up with one indexed IN list."""

    __tablename__ = "kpi_aggregates"
    __table_args__ = (Index("ix_kpi_aggregates_window", "level", "dimension", "part", "start"),)

    key: str = Field(sa_column=Column(Text, primary_key=True))
    level: str = Field(max_length=8)
    dimension: str = Field(max_length=20)
    part: str = Field(max_length=40)
    start: int = Field(sa_column=Column(BigInteger, nullable=False))
    group: str = Field(sa_column=Column(Text, nullable=False))
    counters: str = Field(sa_column=Column(Text, nullable=False))


class PendingChangeRow(KpiTable, table=True):
    """Changes of contributions applied with a consumer batch and not yet added to the
    aggregates (the fold adds many batches at once, so a busy bucket is written once)."""

    __tablename__ = "kpi_pending_changes"

    id: int | None = Field(default=None, primary_key=True)
    changes: str = Field(sa_column=Column(Text, nullable=False))


class SettledOrderRow(KpiTable, table=True):
    """A settled order: its row is gone, its contribution stays in the aggregates, and
    its later events (re-emissions, very late deliveries) are ignored."""

    __tablename__ = "kpi_settled_orders"

    order_id: str = Field(primary_key=True, max_length=64)
    settled_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False, index=True))


# -- API schemas -------------------------------------------------------------------


class KpiValue(BaseModel):
    kpi: str
    numerator: int
    denominator: int
    value: float | None
    """numerator / denominator; null when the denominator is zero."""


class StockoutSku(BaseModel):
    sku: str
    backordered_lines: int
    ordered_lines: int
    frequency: float


class KpiSummary(BaseModel):
    orders_received: int
    orders_cancelled: int
    orders_delivered: int
    orders_open: int
    kpis: list[KpiValue]
    perfect_order_failures: dict[str, int]
    """Delivered orders failing each criterion (one order can fail several)."""
    open_by_stage: dict[str, int]
    top_stockout_skus: list[StockoutSku]


class KpiGroup(KpiSummary):
    group: str


class KpiReport(BaseModel):
    window: str
    cohort: str
    since: datetime | None
    """The first receipt time the window counts (its start on the bucket grid); null for all."""
    as_of: datetime
    overall: KpiSummary
    by: str | None = None
    groups: list[KpiGroup] = []


class HistogramBucket(BaseModel):
    le: float | None
    """Upper bound in seconds (inclusive); null for +Inf."""
    count: int


class SeriesDistribution(BaseModel):
    series: str
    count: int
    mean_seconds: float | None
    std_seconds: float | None
    percentiles_seconds: dict[str, float | None]
    buckets: list[HistogramBucket]


class CycleTimeGroup(BaseModel):
    group: str
    series: list[SeriesDistribution]


class CycleTimeReport(BaseModel):
    window: str
    cohort: str
    since: datetime | None
    as_of: datetime
    relative_accuracy: float
    overall: list[SeriesDistribution]
    by: str | None = None
    groups: list[CycleTimeGroup] = []


class OpenOrder(BaseModel):
    order_id: str
    stage: str
    stage_since: datetime | None
    age_in_stage_seconds: float | None
    received_at: datetime | None
    age_seconds: float | None


class OpenOrders(BaseModel):
    as_of: datetime
    count: int
    count_by_stage: dict[str, int]
    oldest: OpenOrder | None
    orders: list[OpenOrder]


class CriterionOutcome(BaseModel):
    passed: bool
    reason: str


class OrderKpi(BaseModel):
    order_id: str
    stage: str
    stage_since: datetime | None
    received_at: datetime | None
    cancelled: bool
    backordered: bool
    perfect: bool | None
    criteria: dict[str, CriterionOutcome]
    contributions: list[KpiValue]
    durations_seconds: dict[str, list[float]]
    groups: dict[str, list[str]]
    notes: list[str]
    stage_times: dict[str, datetime | None]
