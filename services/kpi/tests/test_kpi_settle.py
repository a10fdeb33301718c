"""Bounded state: closed orders past the settle window fold into serialized aggregates,
their rows go, the "all" KPIs do not change, and their late events are ignored."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from fulfil.testing import create_topics, eventually, running_app, settings_for
from kpi.config import Settings
from kpi.main import create_app
from kpi_scenario import NOW, delivered
from test_kpi_service import publish, shuffled_with_duplicates


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def reports(client: httpx.AsyncClient) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for by in (None, "tier", "warehouse", "carrier", "client"):
        params = {"window": "all", **({"by": by} if by else {})}
        kpis = (await client.get("/v1/kpis", params=params)).json()
        cycle = (await client.get("/v1/kpis/cycle-time", params=params)).json()
        for body in (kpis, cycle):
            body.pop("as_of")
        out[f"kpis-{by}"] = kpis
        out[f"cycle-{by}"] = cycle
    return out


def approx_floats(value: Any) -> Any:
    """Means and std of merged Welford states differ from one pass in the last bits."""
    if isinstance(value, float):
        return pytest.approx(value, rel=1e-9)
    if isinstance(value, dict):
        return {k: approx_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [approx_floats(v) for v in value]
    return value


async def test_settled_orders_keep_their_kpis_and_ignore_late_events(
    kafka_bootstrap: str, database_url: str, topic_name: str
) -> None:
    base = settings_for(kafka_bootstrap, database_url, topic=topic_name, service_name="kpi")
    settings = Settings(**{**base.model_dump(), "kpi_settle_interval_seconds": 0.1})
    await create_topics(settings)
    await publish(settings, shuffled_with_duplicates(3))
    clock = Clock(NOW)
    async with running_app(create_app(settings, clock=clock)) as client:

        async def all_applied() -> bool:
            overall = (await client.get("/v1/kpis")).json()["overall"]
            return bool(overall["orders_delivered"] == 8 and overall["orders_open"] == 4)

        await eventually(all_applied, timeout=45)
        before = await reports(client)

        clock.now = NOW + timedelta(days=9)  # every order was received more than 8 days ago

        async def settled() -> bool:
            response = await client.get("/v1/orders/O1/kpi")
            return response.status_code == 404 and "settled" in response.json()["detail"]

        await eventually(settled, timeout=15)
        for order_id in ("O8", "O11"):
            assert (await client.get(f"/v1/orders/{order_id}/kpi")).status_code == 404
        assert (await client.get("/v1/orders/O12/kpi")).json()["stage"] == "transit"  # open: kept
        assert (await client.get("/v1/open-orders")).json()["count"] == 4
        after = await reports(client)
        assert after == approx_floats(before)
        week = (await client.get("/v1/kpis", params={"window": "7d"})).json()["overall"]
        assert week["orders_received"] == 0  # settled orders are only in "all"

        # A re-emitted delivery of a settled order (new ce_id, later time) is ignored;
        # the open order O12 still moves on.
        await publish(
            settings,
            [
                (delivered("O6", "S6", [(1, "B", 2, 2)], at=10), "re-emitted"),
                (delivered("O12", "S12", [(1, "A", 1, 0)], at=25), "o12-delivered"),
            ],
        )

        async def o12_delivered() -> bool:
            return bool((await client.get("/v1/kpis")).json()["overall"]["orders_delivered"] == 9)

        await eventually(o12_delivered, timeout=30)
        overall = (await client.get("/v1/kpis")).json()["overall"]
        damage = next(k for k in overall["kpis"] if k["kpi"] == "damage_rate")
        assert (damage["numerator"], damage["denominator"]) == (1, 26)  # O12's one unit, not O6 again
        assert (await client.get("/v1/orders/O6/kpi")).status_code == 404
