"""HTTP API of the kpi service: KPI reports, cycle-time distributions, backlog, one order."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import HTMLResponse, StreamingResponse
from fulfil.problems import NotFound
from fulfil.service import RuntimeDep, SessionDep

from kpi import service
from kpi.cohorts import Window
from kpi.domain import OPEN_STAGES, Dimension, Stage
from kpi.live import LiveState, sse_messages
from kpi.models import CycleTimeReport, KpiReport, OpenOrders, OrderKpi
from kpi.service import Clock

router = APIRouter(prefix="/v1", tags=["kpi"])
pages = APIRouter(tags=["dashboard"])

DASHBOARD = Path(__file__).with_name("dashboard.html")


def _clock(runtime: RuntimeDep) -> Clock:
    clock: Clock = runtime.extras["clock"]
    return clock


@router.get("/kpis")
async def get_kpis(
    session: SessionDep,
    runtime: RuntimeDep,
    window: Window = Window.ALL,
    by: Dimension | None = None,
) -> KpiReport:
    """Every KPI with numerator, denominator and value, for a cohort window, optionally by dimension."""
    return await service.kpi_report(session, window, by, _clock(runtime)())


@router.get("/kpis/cycle-time")
async def get_cycle_time(
    session: SessionDep,
    runtime: RuntimeDep,
    window: Window = Window.ALL,
    by: Dimension | None = None,
) -> CycleTimeReport:
    """Cycle time and stage distributions: histogram, p50/p90/p95/p99, mean and std."""
    return await service.cycle_time_report(session, window, by, _clock(runtime)())


@router.get("/open-orders")
async def get_open_orders(
    session: SessionDep,
    runtime: RuntimeDep,
    stage: Stage | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> OpenOrders:
    """The backlog: open orders oldest first, with their age overall and in their stage."""
    if stage is not None and stage not in OPEN_STAGES:
        return OpenOrders(as_of=_clock(runtime)(), count=0, count_by_stage={str(stage): 0}, oldest=None, orders=[])
    return await service.open_orders(session, [stage] if stage else OPEN_STAGES, _clock(runtime)(), limit)


@router.get("/orders/{order_id}/kpi")
async def get_order_kpi(order_id: str, session: SessionDep) -> OrderKpi:
    """How one order scored on each criterion, and why."""
    facts = await service.load_facts(session, order_id)
    if facts is None:
        settled_at = await service.settled_at(session, order_id)
        if settled_at is not None:
            raise NotFound(f"order {order_id} was settled at {settled_at.isoformat()}: its KPIs are in the aggregates")
        raise NotFound(f"no events seen for order {order_id}")
    return service.order_kpi(facts)


@router.get("/stream", response_class=StreamingResponse)
async def stream(
    runtime: RuntimeDep, window: Window = Window.ALL, last_event_id: Annotated[str | None, Header()] = None
) -> StreamingResponse:
    """Server-Sent Events: the window's live KPI summary whenever it changes (at most every second)."""
    live: LiveState = runtime.extras["live"]
    last = int(last_event_id) if last_event_id and last_event_id.isdigit() else None
    return StreamingResponse(
        sse_messages(live, window, last),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@pages.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    """The ops dashboard (self-contained, live from /v1/stream)."""
    return HTMLResponse(DASHBOARD.read_text(encoding="utf-8"))
