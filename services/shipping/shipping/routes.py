"""HTTP API of the shipping service: shipments, warehouse dispatch, carrier webhooks."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fulfil.problems import PROBLEM_BASE, NotFound, Problem
from fulfil.service import RuntimeDep, SessionDep
from pydantic import ValidationError

from shipping import metrics, service, signing
from shipping.clock import Clock
from shipping.config import Settings
from shipping.domain import ShipmentStatus
from shipping.models import CarrierEvent, CarrierEventAck, DispatchRequest, ShipmentList, ShipmentPublic

router = APIRouter(prefix="/v1")

PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}


class SignatureInvalid(Problem):
    status = 401
    title = "Unauthorized"
    type = PROBLEM_BASE + "bad-signature"


def document_raw_bodies(app: FastAPI) -> None:
    """Put the schemas of bodies read raw (the signed webhook) into the OpenAPI components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = generate()
            schema = CarrierEvent.model_json_schema(ref_template="#/components/schemas/{model}")
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            components.update(schema.pop("$defs", {}))
            components["CarrierEvent"] = schema
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def get_settings(runtime: RuntimeDep) -> Settings:
    return cast(Settings, runtime.settings)


def get_clock(runtime: RuntimeDep) -> Clock:
    return cast(Clock, runtime.extras["clock"])


SettingsDep = Annotated[Settings, Depends(get_settings)]
ClockDep = Annotated[Clock, Depends(get_clock)]


@router.get("/shipments", tags=["shipments"], responses={400: {"description": "invalid cursor", **PROBLEM}})
async def list_shipments(
    session: SessionDep,
    order_id: Annotated[str | None, Query(max_length=64)] = None,
    status: ShipmentStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=500, description="next_cursor of the previous page")] = None,
) -> ShipmentList:
    """Shipments of an order (or by status), earliest ship-by first, one page per call."""
    return await service.list_shipments(session, order_id=order_id, status=status, limit=limit, cursor=cursor)


@router.get("/shipments/{shipment_id}", tags=["shipments"], responses={404: PROBLEM})
async def get_shipment(shipment_id: str, session: SessionDep) -> ShipmentPublic:
    """One shipment with its promises and timeline."""
    return await service.get_shipment(session, shipment_id)


@router.post(
    "/shipments/{shipment_id}/dispatch",
    tags=["warehouse"],
    responses={404: PROBLEM, 409: {"description": "cancelled, or dispatched differently", **PROBLEM}, 422: PROBLEM},
)
async def dispatch_shipment(
    shipment_id: str, request: DispatchRequest, session: SessionDep, settings: SettingsDep, clock: ClockDep
) -> ShipmentPublic:
    """The warehouse hands the shipment to a carrier: publishes order.shipped. Idempotent."""
    return await service.dispatch(session, settings, shipment_id, request, clock.now())


async def signed_body(
    carrier: str,
    request: Request,
    settings: SettingsDep,
    clock: ClockDep,
    x_carrier_timestamp: Annotated[
        str | None, Header(alias=signing.TIMESTAMP_HEADER, description="Unix seconds when the carrier signed")
    ] = None,
    x_carrier_signature: Annotated[
        str | None,
        Header(
            alias=signing.SIGNATURE_HEADER,
            description='"sha256=" + hex HMAC-SHA256 of timestamp + "." + raw body, keyed by the carrier secret',
        ),
    ] = None,
) -> bytes:
    """The raw body, once its signature is verified; nothing is parsed before that."""
    configured = settings.carriers.get(carrier)
    if configured is None:
        raise NotFound(f"unknown carrier {carrier!r}")
    body = await request.body()
    try:
        signing.verify(
            configured.secrets,
            x_carrier_timestamp,
            x_carrier_signature,
            body,
            now=clock.now(),
            tolerance=timedelta(seconds=settings.webhook_tolerance_seconds),
        )
    except signing.SignatureRejected as exc:
        metrics.CARRIER_EVENTS.labels(carrier, "bad_signature").inc()
        raise SignatureInvalid(str(exc)) from None
    return body


@router.post(
    "/carriers/{carrier}/events",
    tags=["carriers"],
    responses={
        400: {"description": "signed, but not JSON", **PROBLEM},
        401: {"description": "bad or stale signature", **PROBLEM},
        404: PROBLEM,
        422: {"description": "invalid event, or lines/times that do not fit the shipment", **PROBLEM},
    },
    # The body is read raw (to verify the signature first), so its schema is declared here.
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CarrierEvent"}}},
        }
    },
)
async def carrier_event(
    carrier: str,
    body: Annotated[bytes, Depends(signed_body)],
    session: SessionDep,
    settings: SettingsDep,
    clock: ClockDep,
) -> CarrierEventAck:
    """A carrier's signed tracking event; a replayed event id is a no-op 200."""
    try:
        event = CarrierEvent.model_validate_json(body)
        ack = await service.record_carrier_event(session, settings, carrier, event, clock.now())
    except ValidationError as exc:
        metrics.CARRIER_EVENTS.labels(carrier, "invalid").inc()
        raise RequestValidationError(exc.errors(include_url=False), body=body) from None
    except Problem:
        metrics.CARRIER_EVENTS.labels(carrier, "invalid").inc()
        raise
    metrics.CARRIER_EVENTS.labels(carrier, ack.outcome).inc()
    return ack
