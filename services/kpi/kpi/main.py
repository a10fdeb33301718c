"""The kpi app: `uvicorn kpi.main:create_app --factory`."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

from fastapi import FastAPI
from fulfil.service import Runtime, create_service_app

from kpi import service
from kpi.config import Settings
from kpi.handlers import FOLD_SECONDS, BatchIngest
from kpi.live import COLLECTOR, ORDERS_SETTLED, LiveState, refresh_loop
from kpi.models import KpiTable
from kpi.routes import pages, router
from kpi.service import Clock, utc_now

log = logging.getLogger(__name__)

COMPACT_SECONDS = 60.0


def _settings(runtime: Runtime) -> Settings:
    settings = runtime.settings
    assert isinstance(settings, Settings)
    return settings


async def fold_loop(runtime: Runtime) -> None:
    """Fold the journal into the aggregates when the consumer has not done so lately (no
    traffic); now and then fold old buckets into the all-time aggregate and drop fine
    buckets no window reads any more."""
    settle_after = int(_settings(runtime).kpi_settle_after_seconds)
    clock: Clock = runtime.extras["clock"]
    live: LiveState = runtime.extras["live"]
    ingest: BatchIngest = runtime.extras["ingest"]
    next_compaction = 0.0
    while True:
        try:
            while ingest.fold_due():
                async with runtime.sessions() as session, session.begin():
                    folded = await service.fold_pending_async(session)
                ingest.folded_at = time.monotonic()
                if not folded:
                    break
                live.aggregates_changed.set()
            if time.monotonic() >= next_compaction:
                async with runtime.sessions() as session, session.begin():
                    await service.compact_async(session, clock(), settle_after=settle_after)
                next_compaction = time.monotonic() + COMPACT_SECONDS
        except Exception as exc:  # the next round tries again; nothing is lost
            log.warning("folding KPI changes failed: %r", exc)
        await asyncio.sleep(FOLD_SECONDS)


async def settle_loop(runtime: Runtime) -> None:
    """Keep per-order state bounded: drop the rows of closed orders past the settle window."""
    settings = _settings(runtime)
    clock: Clock = runtime.extras["clock"]
    while True:
        try:
            while True:
                async with runtime.sessions() as session, session.begin():
                    settled = await service.settle(
                        session,
                        clock(),
                        settle_after=timedelta(seconds=settings.kpi_settle_after_seconds),
                        retention=timedelta(seconds=settings.kpi_settled_order_retention_seconds),
                    )
                ORDERS_SETTLED.inc(settled)
                if settled:
                    log.info("settled %d orders", settled)
                else:
                    break
        except Exception as exc:  # the next round tries again
            log.warning("settling failed: %r", exc)
        await asyncio.sleep(settings.kpi_settle_interval_seconds)


def create_app(settings: Settings | None = None, *, clock: Clock = utc_now) -> FastAPI:
    settings = settings or Settings()
    ingest = BatchIngest(clock, timedelta(seconds=settings.kpi_settle_after_seconds))

    async def build_live_state(runtime: Runtime) -> None:
        live = LiveState()
        runtime.extras["clock"] = clock
        runtime.extras["live"] = live
        runtime.extras["ingest"] = ingest
        COLLECTOR.live = live

    return create_service_app(
        settings,
        title="fulfil kpi",
        description="KPI service of fulfil: order-cycle and accuracy metrics by event time.",
        metadata=[KpiTable.metadata],
        handlers=ingest.handlers(),
        routers=[router, pages],
        background=[fold_loop, refresh_loop, settle_loop],
        on_startup=[build_live_state],
    )
