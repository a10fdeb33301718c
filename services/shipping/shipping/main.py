"""The shipping app: `uvicorn shipping.main:create_app --factory`."""

from __future__ import annotations

from fastapi import FastAPI
from fulfil.service import Runtime, create_service_app

from shipping.clock import Clock, SystemClock
from shipping.config import Settings
from shipping.delays import delay_scanner
from shipping.handlers import handlers_for
from shipping.models import ShippingTable
from shipping.routes import document_raw_bodies, router
from shipping.schema import upgrade_schema


def create_app(settings: Settings | None = None, *, clock: Clock | None = None) -> FastAPI:
    settings = settings or Settings()
    chosen_clock = clock or SystemClock()

    async def install_clock(runtime: Runtime) -> None:
        runtime.extras["clock"] = chosen_clock

    app = create_service_app(
        settings,
        title="fulfil shipping",
        description=(
            "Shipments per warehouse with ship-by and promised delivery times, warehouse dispatch, "
            "signed carrier tracking webhooks and delay detection."
        ),
        metadata=[ShippingTable.metadata],
        handlers=handlers_for(settings),
        routers=[router],
        background=[delay_scanner],
        on_startup=[upgrade_schema, install_clock],
    )
    document_raw_bodies(app)
    return app
