from __future__ import annotations

import pytest
from fulfil.settings import Environment, ServiceSettings
from pydantic import ValidationError


def test_defaults_are_the_embedded_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "ENVIRONMENT", "SERVICE_NAME"):
        monkeypatch.delenv(name, raising=False)
    settings = ServiceSettings(service_name="inventory")
    assert settings.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert settings.database == "sqlite+aiosqlite:///.fulfil/inventory.db"
    assert settings.group_id == "inventory"
    assert settings.kafka_idempotent_producer is False


def test_environment_variables_configure_a_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka-1:9092,kafka-2:9092")
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://u@db/inventory")
    monkeypatch.setenv("KAFKA_IDEMPOTENT_PRODUCER", "true")
    settings = ServiceSettings()
    assert settings.kafka_bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert settings.database == "postgresql+asyncpg://u@db/inventory"
    assert settings.kafka_idempotent_producer is True


def test_production_refuses_sqlite_and_the_local_broker() -> None:
    with pytest.raises(ValidationError) as refused:
        ServiceSettings(environment=Environment.PRODUCTION)
    assert "DATABASE_URL must point at PostgreSQL" in str(refused.value)
    assert "KAFKA_BOOTSTRAP_SERVERS" in str(refused.value)


def test_production_accepts_postgres_and_real_brokers() -> None:
    settings = ServiceSettings(
        environment=Environment.PRODUCTION,
        database_url="postgresql+asyncpg://u@db/kpi",
        kafka_bootstrap_servers="kafka:9092",
    )
    assert settings.environment is Environment.PRODUCTION


def test_services_add_their_own_production_checks() -> None:
    class Strict(ServiceSettings):
        api_secret: str = "dev-secret"

        def production_problems(self) -> list[str]:
            return ["API_SECRET must be set"] if self.api_secret == "dev-secret" else []

    with pytest.raises(ValidationError, match="API_SECRET"):
        Strict(
            environment=Environment.PRODUCTION,
            database_url="postgresql+asyncpg://db/x",
            kafka_bootstrap_servers="k:9092",
        )


def test_managed_kafka_gets_tls_and_sasl_options() -> None:
    import ssl

    from fulfil.kafka import connection_options

    settings = ServiceSettings(
        kafka_bootstrap_servers="broker.example:9096",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="fulfil",
        kafka_sasl_password="s3cret",
    )
    options = connection_options(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert (options["sasl_mechanism"], options["sasl_plain_username"], options["sasl_plain_password"]) == (
        "SCRAM-SHA-512",
        "fulfil",
        "s3cret",
    )
    assert "s3cret" not in repr(settings)
    assert "ssl_context" not in connection_options(ServiceSettings())
