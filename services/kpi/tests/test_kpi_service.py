"""The kpi app on a real broker and database: the scenario's events, shuffled and with
duplicates, go through the real consumer; the API reports the hand-computed KPIs."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest
from fulfil import kafka
from fulfil.codec import encode
from fulfil.events import OrderEvent
from fulfil.testing import create_topics, eventually, running_app, settings_for
from kpi import live as live_module
from kpi.cohorts import Window
from kpi.config import Settings
from kpi.live import LiveState, sse_messages
from kpi.main import create_app
from kpi_scenario import NOW, scenario_events
from test_kpi_domain import BREAKDOWN_KPIS, EXPECTED_BREAKDOWNS, EXPECTED_TALLIES


async def publish(settings: Settings, records: list[tuple[OrderEvent, str]]) -> None:
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for event, ce_id in records:
            _, record = encode(event, source="/test", event_id=ce_id)
            await producer.send_and_wait(
                settings.kafka_topic, key=record.key, value=record.value, headers=record.headers
            )
    finally:
        await producer.stop()


def _counts(summary: dict[str, Any]) -> tuple[int, ...]:
    return tuple(summary[k] for k in ("orders_received", "orders_cancelled", "orders_delivered", "orders_open"))


def _breakdown(group: dict[str, Any]) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    tallies = {k["kpi"]: (k["numerator"], k["denominator"]) for k in group["kpis"]}
    return _counts(group), tuple(tallies[str(kpi)] for kpi in BREAKDOWN_KPIS)


def shuffled_with_duplicates(seed: int) -> list[tuple[OrderEvent, str]]:
    """Every event once, plus redeliveries (same ce_id) and re-emissions (new ce_id), shuffled
    within each order (one order's events share a partition, so keep them together per key)."""
    rng = random.Random(seed)
    records = [(event, f"ce-{i}") for i, event in enumerate(scenario_events())]
    records += [(event, ce_id) for event, ce_id in rng.sample(records, 10)]
    records += [(event, f"again-{i}") for i, (event, _) in enumerate(rng.sample(records, 10))]
    rng.shuffle(records)
    return records


async def test_scenario_through_the_real_consumer(kafka_bootstrap: str, database_url: str, topic_name: str) -> None:
    settings = Settings(
        **settings_for(kafka_bootstrap, database_url, topic=topic_name, service_name="kpi").model_dump()
    )
    await create_topics(settings)
    await publish(settings, shuffled_with_duplicates(7))
    async with running_app(create_app(settings, clock=lambda: NOW)) as client:

        async def settled() -> dict[str, Any] | None:
            body: dict[str, Any] = (await client.get("/v1/kpis", params={"window": "all"})).json()
            overall = body["overall"]
            done = overall["orders_delivered"] == 8 and overall["orders_open"] == 4 and overall["orders_cancelled"] == 1
            tallies = {k["kpi"]: (k["numerator"], k["denominator"]) for k in overall["kpis"]}
            return body if done and tallies == {str(k): v for k, v in EXPECTED_TALLIES.items()} else None

        report = await eventually(settled, timeout=45)
        overall = report["overall"]
        assert report["cohort"].startswith("orders whose order.received event time")
        assert overall["orders_received"] == 13
        perfect = next(k for k in overall["kpis"] if k["kpi"] == "perfect_order_rate")
        assert perfect == {"kpi": "perfect_order_rate", "numerator": 5, "denominator": 8, "value": 0.625}
        assert overall["perfect_order_failures"] == {"complete": 1, "on_time": 1, "damage_free": 1, "accurate": 1}
        assert [s["sku"] for s in overall["top_stockout_skus"]] == ["F", "C"]

        hour = (await client.get("/v1/kpis", params={"window": "1h", "by": "tier"})).json()
        assert hour["overall"]["orders_received"] == 1
        assert hour["since"] == "2026-01-09T11:00:00Z"
        assert [(g["group"], g["orders_received"]) for g in hour["groups"]] == [("standard", 1)]
        day = (await client.get("/v1/kpis", params={"window": "24h"})).json()
        assert day["since"] == "2026-01-08T12:00:00Z"
        assert _counts(day["overall"]) == (1, 0, 0, 1)  # only O13, received at 99.5 h
        assert day["overall"]["open_by_stage"] == {"processing": 1, "backordered": 0, "warehouse": 0, "transit": 0}
        assert {k["kpi"]: (k["numerator"], k["denominator"]) for k in day["overall"]["kpis"]} == {
            str(kpi): (0, 1) if kpi == "backorder_rate" else (0, 0) for kpi in EXPECTED_TALLIES
        }
        for dimension, expected in EXPECTED_BREAKDOWNS.items():
            for window in ("all", "7d"):
                body = (await client.get("/v1/kpis", params={"window": window, "by": str(dimension)})).json()
                assert {g["group"]: _breakdown(g) for g in body["groups"]} == expected, (dimension, window)
        by_carrier = (await client.get("/v1/kpis", params={"window": "7d", "by": "carrier"})).json()
        rates = {
            g["group"]: next(k["value"] for k in g["kpis"] if k["kpi"] == "perfect_order_rate")
            for g in by_carrier["groups"]
        }
        assert rates == {"DHL": 0.8, "UPS": 0.5, "unassigned": None}

        cycle = (await client.get("/v1/kpis/cycle-time", params={"window": "all"})).json()
        series = {s["series"]: s for s in cycle["overall"]}
        assert series["cycle_time"]["count"] == 8
        assert series["cycle_time"]["mean_seconds"] == 31 * 3600
        for name, exact_hours in (("p50", 22), ("p95", 40), ("p99", 40)):
            value = series["cycle_time"]["percentiles_seconds"][name]
            assert abs(value - exact_hours * 3600) <= 0.01 * exact_hours * 3600, name
        assert abs(series["transit"]["percentiles_seconds"]["p95"] - 23 * 3600) <= 0.01 * 23 * 3600
        assert sum(b["count"] for b in series["cycle_time"]["buckets"]) == 8
        assert series["backorder_wait"]["count"] == 1
        grouped = (await client.get("/v1/kpis/cycle-time", params={"by": "warehouse"})).json()
        assert [g["group"] for g in grouped["groups"]] == ["WH-1", "WH-2", "unassigned"]
        day_cycle = (await client.get("/v1/kpis/cycle-time", params={"window": "24h"})).json()
        day_series = {s["series"]: s for s in day_cycle["overall"]}
        assert day_series["cycle_time"]["count"] == 0
        assert day_series["cycle_time"]["percentiles_seconds"]["p95"] is None
        assert (day_series["transmission"]["count"], day_series["transmission"]["mean_seconds"]) == (1, 360)

        backlog = (await client.get("/v1/open-orders")).json()
        assert backlog["count"] == 4
        assert backlog["count"] == overall["orders_open"] == sum(overall["open_by_stage"].values())
        assert backlog["count_by_stage"] == {
            "unreceived": 0,
            "processing": 1,
            "backordered": 1,
            "warehouse": 1,
            "transit": 1,
        }
        assert backlog["oldest"]["order_id"] in {"O9", "O10", "O12"}
        transit = (await client.get("/v1/open-orders", params={"stage": "transit"})).json()
        assert [(o["order_id"], o["age_in_stage_seconds"]) for o in transit["orders"]] == [("O12", 97 * 3600)]
        assert (await client.get("/v1/open-orders", params={"stage": "nowhere"})).status_code == 422

        short = (await client.get("/v1/orders/O11/kpi")).json()
        assert short["stage"] == "delivered"
        assert short["perfect"] is False
        assert short["criteria"]["complete"] == {"passed": False, "reason": "line 1: 3 of 4 delivered"}
        missing = await client.get("/v1/orders/nope/kpi")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/problem+json")

        async def metrics_ready() -> str | None:
            text = (await client.get("/metrics")).text
            return text if 'fulfil_kpi_ratio{criterion="perfect_order_rate"} 0.625' in text else None

        metrics = await eventually(metrics_ready, timeout=15)
        assert 'fulfil_kpi_duration_seconds_gcount{stage="cycle_time"} 8.0' in metrics
        assert 'fulfil_kpi_duration_seconds_bucket{le="+Inf",stage="cycle_time"} 8.0' in metrics
        assert 'fulfil_kpi_open_orders{stage="transit"} 1.0' in metrics
        assert 'fulfil_kpi_open_orders{stage="unreceived"} 0.0' in metrics
        assert 'fulfil_kpi_ratio_by_warehouse{criterion="perfect_order_rate",warehouse="WH-2"} 0.5' in metrics
        assert 'fulfil_kpi_denominator{criterion="perfect_order_rate"} 8.0' in metrics
        assert 'fulfil_kpi_perfect_order_failures{criterion="complete"} 1.0' in metrics
        assert 'fulfil_kpi_orders{state="cancelled"} 1.0' in metrics
        assert "O11" not in metrics

        page = await client.get("/")
        assert page.status_code == 200
        assert "EventSource" in page.text
        assert "http://" not in page.text
        assert "https://" not in page.text


async def test_sse_sends_retry_then_each_change_with_an_id() -> None:
    live = LiveState()
    messages = sse_messages(live, Window.ALL)
    assert await anext(messages) == "retry: 3000\n\n"
    pending = asyncio.ensure_future(anext(messages))
    await asyncio.sleep(0.01)
    assert not pending.done()
    await live.publish(Window.ALL, {"overall": {"orders_received": 1}})
    first = await asyncio.wait_for(pending, 1)
    lines = first.strip().split("\n")
    assert lines[:2] == ["id: 1", "event: kpi"]
    assert json.loads(lines[2].removeprefix("data: ")) == {"overall": {"orders_received": 1}}
    assert await live.publish(Window.ALL, {"overall": {"orders_received": 1}}) is False
    # Another window's change is not sent on this stream.
    await live.publish(Window.DAY, {"overall": {"orders_received": 5}})
    await live.publish(Window.ALL, {"overall": {"orders_received": 2}})
    second = await asyncio.wait_for(anext(messages), 1)
    assert second.startswith("id: 2\n")
    assert '"orders_received":2' in second
    # A client reconnecting with Last-Event-ID 2 is not sent the same summary again.
    resumed = sse_messages(live, Window.ALL, 2)
    await anext(resumed)
    again = asyncio.ensure_future(anext(resumed))
    await asyncio.sleep(0.01)
    assert not again.done()
    again.cancel()
    await messages.aclose()


def test_kpi_parameters_are_closed_enumerations() -> None:
    schema = create_app(Settings()).openapi()
    params = {p["name"]: p for p in schema["paths"]["/v1/kpis"]["get"]["parameters"]}
    assert params["window"]["schema"]["$ref"].endswith("/Window")
    assert schema["components"]["schemas"]["Window"]["enum"] == ["1h", "24h", "7d", "all"]
    assert schema["components"]["schemas"]["Dimension"]["enum"] == ["tier", "warehouse", "carrier", "client"]


async def test_sse_keeps_the_connection_alive_between_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live_module, "KEEP_ALIVE_SECONDS", 0.05)
    messages = sse_messages(LiveState())
    assert await anext(messages) == "retry: 3000\n\n"
    assert await asyncio.wait_for(anext(messages), 1) == ": keep-alive\n\n"
    await messages.aclose()


def test_dev_hook_points_at_the_dashboard() -> None:
    from pathlib import Path

    from kpi.dev import hook
    from rich.console import Console

    console = Console(record=True, width=200)
    hook(urls={"kpi": "http://127.0.0.1:9999"}, data_dir=Path("."), console=console)
    assert "http://127.0.0.1:9999/" in console.export_text()
