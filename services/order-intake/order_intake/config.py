"""Settings of the order-intake service."""

from __future__ import annotations

from fulfil.settings import ServiceSettings
from pydantic import Field


class Settings(ServiceSettings):
    service_name: str = "order-intake"
    rate_limit_per_second: float = Field(default=1000.0, gt=0)
    """Requests per second each client may sustain (token bucket refill rate)."""
    rate_limit_burst: int = Field(default=5000, ge=1)
    """Requests a client may send at once before being throttled (bucket size)."""
    api_key_cache_seconds: float = Field(default=5.0, ge=0)
    """A valid API key is remembered this long per process (0: look every key up); a rotated
    key keeps working this long."""
    idempotency_retention_seconds: float = Field(default=86_400.0, gt=0)
    """An Idempotency-Key is forgotten this long after its first use (the IETF draft suggests
    24 hours). A retry after that is still no duplicate: external_ref stays unique per client."""
    idempotency_purge_interval_seconds: float = Field(default=600.0, gt=0)
    """How often expired Idempotency-Keys are deleted."""
    group_commit_max_orders: int = Field(default=500, ge=1)
    """At most this many concurrently accepted orders are committed in one transaction."""
