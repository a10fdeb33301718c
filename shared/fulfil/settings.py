"""Settings every service reads from its environment.

Only ``KAFKA_BOOTSTRAP_SERVERS`` and ``DATABASE_URL`` change between the embedded
default (Tansu, SQLite) and production (Apache Kafka, PostgreSQL).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


class Environment(StrEnum):
    DEV = "dev"
    TEST = "test"
    PRODUCTION = "production"


class InsecureSettings(ValueError):
    """A setting that is fine on a laptop and unsafe in production."""


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    service_name: str = "fulfil"
    environment: Environment = Environment.DEV
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    data_dir: str = ".fulfil"

    kafka_bootstrap_servers: str = DEFAULT_BOOTSTRAP
    kafka_topic: str = "order-events"
    kafka_dlq_topic: str = "order-events.dlq"
    kafka_idempotent_producer: bool = False
    """On for Apache Kafka; Tansu rejects idempotent producers."""
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_ssl_cafile: str | None = None
    """CA bundle for TLS to the brokers; the system's trust store when unset."""
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_replication_factor: int = Field(default=1, ge=1)
    """Replicas of the topics ``ensure_topics`` creates: 1 on Tansu, 3 on a production cluster."""
    consumer_group: str | None = None
    """Defaults to the service name."""
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1_000)
    """A dead member leaves the group after this long. Tansu also takes half of it to admit a joiner."""
    inbox_retention_seconds: float = Field(default=14 * 86_400, ge=3_600)
    """Applied ce_ids are forgotten after this long; keep it at least the topic's retention,
    since only an event the topic can still redeliver needs to be recognised."""
    consumer_max_attempts: int = Field(default=5, ge=1)
    consumer_batch_size: int = Field(default=500, ge=1)
    consumer_linger_ms: float = Field(default=20, ge=0)
    """How long a batch may wait for more records that are already flowing (one commit for many)."""

    database_url: str | None = None
    """Defaults to a SQLite file per service under ``data_dir``."""

    outbox_batch_size: int = Field(default=1000, ge=1)
    outbox_poll_seconds: float = Field(default=0.5, gt=0)
    outbox_retention_seconds: float = Field(default=3600, ge=0)
    log_level: str = "INFO"
    log_json: bool = True

    @model_validator(mode="after")
    def _refuse_unsafe_production_defaults(self) -> Self:
        if self.environment is not Environment.PRODUCTION:
            return self
        problems = []
        if self.database_url is None or self.database_url.startswith("sqlite"):
            problems.append("DATABASE_URL must point at PostgreSQL, not SQLite")
        if self.kafka_bootstrap_servers == DEFAULT_BOOTSTRAP:
            problems.append("KAFKA_BOOTSTRAP_SERVERS must name the production brokers")
        problems.extend(self.production_problems())
        if problems:
            raise InsecureSettings("refusing to start in production: " + "; ".join(problems))
        return self

    def production_problems(self) -> list[str]:
        """Service-specific reasons to refuse production settings; override in subclasses."""
        return []

    @property
    def group_id(self) -> str:
        return self.consumer_group or self.service_name

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir}/{self.service_name}.db"
