"""The live stream over real HTTP: a dashboard client connected before events arrive
receives the summary once the consumer has applied them, with an id."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import httpx
import uvicorn
from fulfil.broker import free_port
from fulfil.testing import create_topics, settings_for
from kpi.config import Settings
from kpi.main import create_app
from kpi_scenario import NOW
from test_kpi_service import publish, shuffled_with_duplicates


async def test_stream_pushes_the_summary_after_events_are_applied(
    kafka_bootstrap: str, sqlite_url: str, topic_name: str
) -> None:
    settings = Settings(**settings_for(kafka_bootstrap, sqlite_url, topic=topic_name, service_name="kpi").model_dump())
    await create_topics(settings)
    port = free_port()
    config = uvicorn.Config(create_app(settings, clock=lambda: NOW), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            page = await client.get("/")
            assert page.headers["content-type"].startswith("text/html")
            async with client.stream("GET", "/v1/stream") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                await publish(settings, shuffled_with_duplicates(5))
                summary = await asyncio.wait_for(_summary_where(stream, _all_applied), 30)
            async with client.stream("GET", "/v1/stream", params={"window": "24h"}) as stream:
                day = await asyncio.wait_for(_summary_where(stream, lambda s: True), 30)
            overall = (await client.get("/v1/kpis")).json()["overall"]
        assert summary["window"] == "all"
        assert summary["overall"] == overall
        assert summary["overall"]["open_by_stage"] == {"processing": 1, "backordered": 1, "warehouse": 1, "transit": 1}
        assert summary["oldest_open"]["order_id"] in {"O9", "O10", "O12"}
        assert [g["group"] for g in summary["by_carrier"]] == ["DHL", "UPS", "unassigned"]
        assert day["window"] == "24h"
        assert day["since"] == "2026-01-08T12:00:00+00:00"
        assert day["overall"]["orders_received"] == 1  # only O13 was received in the last 24 h
        assert day["overall"]["open_by_stage"] == {"processing": 1, "backordered": 0, "warehouse": 0, "transit": 0}
        assert day["oldest_open"]["order_id"] == "O13"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(serving, 10)


def _all_applied(summary: dict[str, Any]) -> bool:
    overall = summary["overall"]
    return bool(overall["orders_delivered"] == 8 and overall["orders_open"] == 4)


async def _summary_where(stream: httpx.Response, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    event_id: str | None = None
    retry_seen = False
    async for line in stream.aiter_lines():
        if line.startswith("retry: "):
            retry_seen = True
        elif line.startswith("id: "):
            event_id = line.removeprefix("id: ")
        elif line.startswith("data: "):
            summary: dict[str, Any] = json.loads(line.removeprefix("data: "))
            assert retry_seen
            assert event_id is not None
            assert event_id.isdigit()
            if wanted(summary):
                return summary
    raise AssertionError("stream ended")
