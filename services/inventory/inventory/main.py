"""The inventory app: `uvicorn inventory.main:create_app --factory`."""

from __future__ import annotations

from fastapi import FastAPI
from fulfil.service import Runtime, create_service_app

from inventory.config import Settings
from inventory.handlers import handlers_for, system_clock
from inventory.models import InventoryTable
from inventory.routes import router
from inventory.service import Clock


def create_app(settings: Settings | None = None, *, clock: Clock = system_clock) -> FastAPI:
    settings = settings or Settings()

    async def keep_clock(runtime: Runtime) -> None:
        runtime.extras["clock"] = clock

    return create_service_app(
        settings,
        title="fulfil inventory",
        description="Stock across warehouses, allocation of orders, and the backorder queue.",
        metadata=[InventoryTable.metadata],
        handlers=handlers_for(clock),
        routers=[router],
        on_startup=[keep_clock],
    )
