"""Settings of the kpi service."""

from __future__ import annotations

from fulfil.settings import ServiceSettings
from pydantic import Field


class Settings(ServiceSettings):
    service_name: str = "kpi"
    kpi_settle_after_seconds: float = Field(default=8 * 86400, ge=7 * 86400)
    """A delivered or cancelled order received longer ago than this (event time) loses its
    per-order row (its contribution stays in the aggregates), and cohort buckets older than
    this are folded into the all-time aggregate. At least 7 days, the longest rolling
    window, so a rolling window never reads a folded bucket."""
    kpi_settle_interval_seconds: float = Field(default=30.0, gt=0)
    kpi_settled_order_retention_seconds: float = Field(default=30 * 86400, ge=0)
    """How long settled order ids are remembered so that their late events are ignored."""
