"""`fulfil kpi rebuild` replays the topic from the start; the result equals the live state,
and the live consumer carries on afterwards."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fulfil import db
from fulfil.testing import create_topics, eventually, running_app, settings_for
from kpi.cli import app as kpi_cli
from kpi.config import Settings
from kpi.main import create_app
from kpi.service import AGGREGATES, ORDERS
from kpi_scenario import NOW, delivered, scenario_events
from sqlalchemy import delete
from test_kpi_service import publish, shuffled_with_duplicates
from typer.testing import CliRunner


async def snapshot(client: httpx.AsyncClient) -> dict[str, Any]:
    kpis = (await client.get("/v1/kpis", params={"by": "warehouse"})).json()
    cycle = (await client.get("/v1/kpis/cycle-time", params={"by": "tier"})).json()
    orders = {e.order_id for e in scenario_events()}
    explained = {o: (await client.get(f"/v1/orders/{o}/kpi")).json() for o in sorted(orders)}
    backlog = (await client.get("/v1/open-orders")).json()
    return {"kpis": kpis, "cycle": cycle, "orders": explained, "backlog": backlog}


async def test_rebuild_replays_the_topic_into_the_same_state(
    kafka_bootstrap: str, database_url: str, topic_name: str
) -> None:
    settings = Settings(
        **settings_for(kafka_bootstrap, database_url, topic=topic_name, service_name="kpi").model_dump()
    )
    await create_topics(settings)
    await publish(settings, shuffled_with_duplicates(11))
    async with running_app(create_app(settings, clock=lambda: NOW)) as client:

        async def all_applied() -> bool:
            overall = (await client.get("/v1/kpis")).json()["overall"]
            return bool(overall["orders_delivered"] == 8 and overall["orders_open"] == 4)

        await eventually(all_applied, timeout=45)
        await asyncio.sleep(0.5)  # let the consumer drain the last duplicates
        live = await snapshot(client)

        engine = db.create_engine(settings.database)
        async with db.session_factory(engine)() as session, session.begin():
            connection = await session.connection()
            await connection.execute(delete(ORDERS).where(ORDERS.c.order_id.in_(["O1", "O3"])))
            await connection.execute(delete(AGGREGATES).where(AGGREGATES.c.dimension == "warehouse"))
        await engine.dispose()
        assert (await snapshot(client)) != live

        env = {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "KAFKA_TOPIC": topic_name,
            "DATABASE_URL": database_url,
            "LOG_JSON": "false",
        }
        result = await asyncio.to_thread(CliRunner().invoke, kpi_cli, ["rebuild"], env=env)
        assert result.exit_code == 0, result.output
        assert "orders" in result.output
        assert "0 undecodable" in result.output
        assert await snapshot(client) == live

        # The live consumer continues after the rebuild: O12 is delivered now.
        await publish(settings, [(delivered("O12", "S12", [(1, "A", 1, 0)], at=25), "late-delivery")])

        async def o12_delivered() -> bool:
            return bool((await client.get("/v1/orders/O12/kpi")).json()["stage"] == "delivered")

        await eventually(o12_delivered, timeout=30)

        async def nine_delivered() -> bool:  # the aggregates follow within a fold interval
            return bool((await client.get("/v1/kpis")).json()["overall"]["orders_delivered"] == 9)

        await eventually(nine_delivered, timeout=10)
