"""The order-intake app: `uvicorn order_intake.main:create_app --factory`."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from fastapi import FastAPI
from fulfil.service import Runtime, create_service_app

from order_intake import service
from order_intake.commits import GroupCommit
from order_intake.config import Settings
from order_intake.handlers import HANDLERS
from order_intake.models import IntakeTable
from order_intake.routes import INTAKE, AcceptanceClockMiddleware, IntakeContext, KnownKeys, RateLimiter, router
from order_intake.schema import upgrade_schema
from order_intake.service import Clock, system_clock

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, clock: Clock = system_clock) -> FastAPI:
    settings = settings or Settings()

    async def install(runtime: Runtime) -> None:
        runtime.extras[INTAKE] = IntakeContext(
            runtime=runtime,
            settings=settings,
            clock=clock,
            group_commit=GroupCommit(settings, runtime.sessions, max_group=settings.group_commit_max_orders),
            rate_limiter=RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst),
            known_keys=KnownKeys(settings.api_key_cache_seconds),
        )

    async def commit_accepted_orders(runtime: Runtime) -> None:
        intake: IntakeContext = runtime.extras[INTAKE]
        await intake.group_commit.run()

    async def forget_expired_idempotency_keys(runtime: Runtime) -> None:
        retention = timedelta(seconds=settings.idempotency_retention_seconds)
        while True:
            try:
                deleted = await service.forget_idempotency_keys(runtime.sessions, clock() - retention)
                if deleted:
                    log.info("forgot %d Idempotency-Keys first used over %s ago", deleted, retention)
            except Exception as exc:  # the database may be away for a while; try again next time
                log.warning("could not purge expired Idempotency-Keys: %r", exc)
            await asyncio.sleep(settings.idempotency_purge_interval_seconds)

    app = create_service_app(
        settings,
        title="fulfil order-intake",
        description=(
            "The API ERP and e-commerce systems post orders to, and each order's status timeline. "
            "Authenticate with `Authorization: Bearer <key>` (`fulfil clients create NAME`)."
        ),
        metadata=[IntakeTable.metadata],
        handlers=HANDLERS,
        routers=[router],
        on_startup=[upgrade_schema, install],
        background=[commit_accepted_orders, forget_expired_idempotency_keys],
        openapi_tags=[{"name": "orders", "description": "Create, batch-create, cancel and query orders."}],
    )
    app.add_middleware(AcceptanceClockMiddleware, clock=clock)
    return app
