"""Settings of the shipping service."""

from __future__ import annotations

from datetime import timedelta

from fulfil.events import ServiceLevel
from fulfil.settings import ServiceSettings
from pydantic import BaseModel, Field, SecretStr

from shipping.domain import DEFAULT_TRANSIT_DAYS, EscalationPolicy

DEV_CARRIER_SECRET = "dev-only-carrier-secret"


class CarrierSettings(BaseModel):
    secret: SecretStr
    """Shared secret the carrier signs its tracking webhooks with."""
    previous_secret: SecretStr | None = None
    """While a carrier rotates its secret, webhooks signed with the old one are accepted too."""

    @property
    def secrets(self) -> list[str]:
        return [s.get_secret_value() for s in (self.secret, self.previous_secret) if s is not None]

    transit_days: dict[ServiceLevel, float] = {}
    """Overrides of the service-wide transit days for this carrier."""


class Settings(ServiceSettings):
    service_name: str = "shipping"

    handling_hours: float = Field(default=24, ge=0)
    """Warehouse handling time: ship_by = allocated time + this, for a warehouse whose
    handling time order.allocated does not carry (inventory keeps it per warehouse)."""
    warehouse_handling_hours: dict[str, float] = {}
    """Per-warehouse overrides, ahead of what inventory announces (e.g. a site with a backlog)."""
    transit_days: dict[ServiceLevel, float] = dict(DEFAULT_TRANSIT_DAYS)
    carriers: dict[str, CarrierSettings] = {"simcarrier": CarrierSettings(secret=SecretStr(DEV_CARRIER_SECRET))}
    """Carriers allowed to post tracking webhooks, with their secrets (JSON in CARRIERS)."""
    default_carrier: str = "simcarrier"
    """Carrier whose transit times make the promise when a warehouse has none configured."""
    warehouse_carriers: dict[str, str] = {}
    """Warehouse -> carrier it normally ships with."""

    webhook_tolerance_seconds: int = Field(default=300, ge=1)
    """Signature timestamps further than this from now are refused (replay protection)."""
    clock_skew_seconds: int = Field(default=300, ge=0)
    """How far a carrier's or warehouse's event time may be ahead of our clock, or a carrier
    scan before the dispatch time, and still be accepted (a scan slightly before dispatch is
    clamped to the dispatch time)."""
    delay_scan_seconds: float = Field(default=5, gt=0)
    delay_escalation_hours: float = Field(default=24, gt=0)
    """A late shipment is announced again (as an escalation) only after this much longer."""
    delay_max_escalations: int = Field(default=3, ge=0)
    """After the first delay notice of a (shipment, stage) or (shipment, carrier exception
    reason), at most this many escalations; then the delay stays flagged but silent."""
    transit_grace_hours: float = Field(default=24, gt=0)
    """New estimate for a shipment late in transit without a carrier estimate: now + this."""

    time_compression: float = Field(default=1, ge=1)
    """Demo only: handling, transit, escalation and grace times, and the distance from
    placement to a requested delivery date, are divided by this, so a day of operations
    plays out in minutes (288: a day in five minutes)."""

    def production_problems(self) -> list[str]:
        problems = []
        if self.time_compression != 1:
            problems.append("TIME_COMPRESSION is for demos only")
        for name, carrier in self.carriers.items():
            if any(secret == DEV_CARRIER_SECRET or len(secret) < 16 for secret in carrier.secrets):
                problems.append(f"carrier {name!r} needs a real webhook secret (16+ characters)")
        return problems

    def handling_for(self, warehouse_id: str, announced: float | None = None) -> timedelta:
        """This service's override for the warehouse, else the handling time inventory
        announced with the allocation, else the service-wide default."""
        hours = self.warehouse_handling_hours.get(warehouse_id, announced)
        if hours is None:
            hours = self.handling_hours
        return timedelta(hours=hours) / self.time_compression

    def carrier_for(self, warehouse_id: str) -> str:
        return self.warehouse_carriers.get(warehouse_id, self.default_carrier)

    def transit_for(self, carrier: str, level: ServiceLevel) -> timedelta:
        configured = self.carriers.get(carrier)
        if configured is not None and level in configured.transit_days:
            days = configured.transit_days[level]
        else:
            days = self.transit_days.get(level, DEFAULT_TRANSIT_DAYS[level])
        return timedelta(days=days) / self.time_compression

    @property
    def escalate_after(self) -> timedelta:
        return timedelta(hours=self.delay_escalation_hours) / self.time_compression

    @property
    def escalation(self) -> EscalationPolicy:
        return EscalationPolicy(self.escalate_after, self.delay_max_escalations)

    @property
    def clock_skew(self) -> timedelta:
        return timedelta(seconds=self.clock_skew_seconds)

    @property
    def transit_grace(self) -> timedelta:
        return timedelta(hours=self.transit_grace_hours) / self.time_compression
