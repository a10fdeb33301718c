"""Settings of the inventory service."""

from __future__ import annotations

from fulfil.settings import ServiceSettings
from pydantic import Field


class Settings(ServiceSettings):
    service_name: str = "inventory"
    consumer_batch_size: int = Field(default=100, ge=1)
    """Smaller than the platform's: a batch holds its stock-row locks until it commits."""
