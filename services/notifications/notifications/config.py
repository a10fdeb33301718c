"""Settings of the notifications service."""

from __future__ import annotations

from typing import Self

from fulfil.settings import Environment, ServiceSettings
from pydantic import Field, model_validator

from notifications.domain import retry_span


class Settings(ServiceSettings):
    service_name: str = "notifications"
    port: int = 8004

    smtp_url: str | None = None
    """smtp://[user:password@]host:port (STARTTLS when offered) or smtps:// for implicit TLS.
    Unset in dev: the service runs its own mail sink (see ``GET /v1/dev/mailbox``)."""
    mail_from: str = "fulfil <notifications@fulfil.local>"
    smtp_timeout_seconds: float = Field(default=30.0, gt=0)
    """Overall deadline of one email attempt (connect, TLS, every command)."""
    dev_mail_sink_port: int = Field(default=0, ge=0, le=65535)
    """Loopback port of the dev mail sink; 0 picks a free one."""

    webhook_timeout_seconds: float = Field(default=15.0, gt=0)
    """Overall deadline of one webhook attempt, from connect to the last byte of the answer."""
    endpoint_disable_after_seconds: float = Field(default=2 * 86_400, gt=0)
    """A webhook endpoint that has failed every attempt for this long (across deliveries) is
    disabled and its customer emailed. At most the retry schedule's span, so that even a
    single failing delivery gets there before its attempts run out."""
    retry_after_cap_seconds: float = Field(default=86_400, gt=0)
    """A receiver's Retry-After is honoured up to this long."""
    delivery_poll_seconds: float = Field(default=0.2, gt=0)
    """How often the worker looks for due deliveries when nothing wakes it (retries coming due)."""
    delivery_batch_size: int = Field(default=200, ge=1)
    delivery_concurrency: int = Field(default=32, ge=1)
    """Attempts in flight at once; a slow receiver holds one slot, never the others."""
    delivery_lease_seconds: float = Field(default=60.0, gt=0)
    """A claimed delivery whose sender died is picked up again after this long (same webhook-id)."""

    @property
    def allow_loopback_webhooks(self) -> bool:
        """Plain-http loopback receivers are for laptops and tests only."""
        return self.environment in (Environment.DEV, Environment.TEST)

    @property
    def dev_mail_sink(self) -> bool:
        """In dev without SMTP_URL the service catches its own email on loopback."""
        return self.environment is Environment.DEV and self.smtp_url is None

    @model_validator(mode="after")
    def _coherent_delivery_timing(self) -> Self:
        longest_attempt = max(self.webhook_timeout_seconds, self.smtp_timeout_seconds)
        if self.delivery_lease_seconds <= longest_attempt:
            raise ValueError(
                f"DELIVERY_LEASE_SECONDS ({self.delivery_lease_seconds:g}) must outlast an attempt "
                f"({longest_attempt:g} s), or a slow send could be claimed and sent again meanwhile"
            )
        span = retry_span(jitter=-1.0).total_seconds()
        if self.endpoint_disable_after_seconds > span:
            raise ValueError(
                f"ENDPOINT_DISABLE_AFTER_SECONDS ({self.endpoint_disable_after_seconds:g}) is longer than the "
                f"retry schedule ({span:g} s at the shortest): a failing delivery would give up before it"
            )
        return self

    def production_problems(self) -> list[str]:
        problems = []
        if self.smtp_url is None:
            problems.append("SMTP_URL must name the production mail relay")
        elif self.smtp_url.startswith(("smtp://127.0.0.1", "smtp://localhost")):
            problems.append("SMTP_URL must name the production mail relay, not a local sink")
        return problems
