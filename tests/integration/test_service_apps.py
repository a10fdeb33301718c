"""Each of the five services starts with its database, relay and consumer, and answers
/healthz, /readyz, /metrics and /docs."""

from __future__ import annotations

import importlib

import pytest
from fulfil.testing import create_topics, eventually, running_app, settings_for

SERVICES = ["order_intake", "inventory", "shipping", "notifications", "kpi"]


@pytest.mark.parametrize("package", SERVICES)
async def test_service_is_alive_ready_and_documented(
    package: str, kafka_bootstrap: str, sqlite_url: str, topic_name: str
) -> None:
    main = importlib.import_module(f"{package}.main")
    config = importlib.import_module(f"{package}.config")
    base = settings_for(kafka_bootstrap, sqlite_url, topic=topic_name, service_name=package.replace("_", "-"))
    settings = config.Settings(**base.model_dump())
    await create_topics(settings)
    app = main.create_app(settings)
    async with running_app(app) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}

        last: list[str] = []

        async def ready() -> bool:
            response = await client.get("/readyz")
            last[:] = [response.text]
            return response.status_code == 200

        try:
            await eventually(ready, timeout=30)
        except AssertionError as exc:
            runtime = app.state.runtime
            consumer = runtime.consumer
            state = {
                "relay producer": runtime.relay.producer is not None,
                "consumer broker_ok": consumer.broker_ok if consumer else None,
                "consumer stats": consumer.stats if consumer else None,
            }
            raise AssertionError(f"never ready; last /readyz said {last}; {state}") from exc
        metrics = (await client.get("/metrics")).text
        # Samples of this service's own relay and consumer, not just the HELP lines every import prints.
        assert f'fulfil_outbox_backlog_rows{{service="{settings.service_name}"}} 0.0' in metrics
        assert f'fulfil_events_duplicate_total{{group="{settings.group_id}"}}' in metrics
        assert (await client.get("/docs")).status_code == 200
        assert (await client.get("/openapi.json")).json()["info"]["title"] == f"fulfil {package.replace('_', '-')}"


async def test_readyz_says_unavailable_with_retry_after_when_the_broker_is_unreachable(
    sqlite_url: str, topic_name: str
) -> None:
    from kpi.config import Settings
    from kpi.main import create_app

    base = settings_for("127.0.0.1:1", sqlite_url, topic=topic_name, service_name="kpi")
    async with running_app(create_app(Settings(**base.model_dump()))) as client:
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["checks"] == {"database": True, "broker": False}


async def test_readyz_says_unavailable_with_retry_after_when_the_database_goes_away(
    kafka_bootstrap: str, postgres_url: str, topic_name: str
) -> None:
    import asyncpg
    from fulfil.testing import POSTGRES_ADMIN_URL
    from kpi.config import Settings
    from kpi.main import create_app

    base = settings_for(kafka_bootstrap, postgres_url, topic=topic_name, service_name="kpi")
    settings = Settings(**base.model_dump())
    await create_topics(settings)
    async with running_app(create_app(settings)) as client:

        async def ready() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await eventually(ready, timeout=30)
        # The database is dropped under the running service (its connections terminated).
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            name = postgres_url.rsplit("/", 1)[1]
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await admin.close()
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["checks"]["database"] is False
