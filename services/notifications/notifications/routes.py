"""HTTP API of the notifications service: preferences and the delivery log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from fulfil.service import RuntimeDep, SessionDep
from pydantic import BaseModel

from notifications import service
from notifications.config import Settings
from notifications.domain import DeliveryStatus
from notifications.mailsink import DevMailSink
from notifications.models import AttemptOut, Delivery, DeliveryAttempt, DeliveryOut, PreferencesIn, PreferencesOut

router = APIRouter(prefix="/v1")
dev_router = APIRouter(prefix="/v1/dev", tags=["dev"])
"""Mounted only with ENVIRONMENT=dev and no SMTP_URL (the service runs its own mail sink)."""

CustomerId = Annotated[str, Path(min_length=1, max_length=100)]


@router.put("/customers/{customer_id}/preferences", tags=["preferences"])
async def put_preferences(
    customer_id: CustomerId, body: PreferencesIn, session: SessionDep, runtime: RuntimeDep
) -> PreferencesOut:
    """Set how a customer hears from us; a new webhook URL returns its signing secret, once."""
    settings = runtime.settings
    assert isinstance(settings, Settings)
    out = await service.put_preferences(
        session, customer_id, body, now=runtime.extras["clock"](), allow_loopback=settings.allow_loopback_webhooks
    )
    await session.commit()
    return out


@router.get("/customers/{customer_id}/preferences", tags=["preferences"])
async def get_preferences(customer_id: CustomerId, session: SessionDep) -> PreferencesOut:
    """A customer's notification preferences (never the signing secret)."""
    return await service.get_preferences(session, customer_id)


@router.get("/deliveries", tags=["deliveries"])
async def list_deliveries(
    session: SessionDep,
    order_id: str | None = None,
    customer_id: str | None = None,
    status: DeliveryStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[DeliveryOut]:
    """Deliveries with every attempt (status code, error), oldest event first."""
    rows = await service.list_deliveries(
        session, order_id=order_id, customer_id=customer_id, status=status, limit=limit
    )
    return [delivery_out(delivery, attempts) for delivery, attempts in rows]


@router.get("/deliveries/{delivery_id}", tags=["deliveries"])
async def get_delivery(delivery_id: str, session: SessionDep) -> DeliveryOut:
    """One delivery with its attempts."""
    return delivery_out(*await service.get_delivery(session, delivery_id))


@router.post("/deliveries/{delivery_id}/retry", status_code=202, tags=["deliveries"])
async def retry_delivery(delivery_id: str, session: SessionDep, runtime: RuntimeDep, response: Response) -> DeliveryOut:
    """Send a failed delivery again (same webhook-id), with a fresh round of attempts."""
    delivery = await service.retry_delivery(session, delivery_id, now=runtime.extras["clock"]())
    await session.commit()
    worker = runtime.extras.get("worker")
    if worker is not None:
        worker.wake()
    response.headers["Location"] = f"/v1/deliveries/{delivery_id}"
    return delivery_out(*await service.get_delivery(session, delivery.id))


def delivery_out(delivery: Delivery, attempts: list[DeliveryAttempt]) -> DeliveryOut:
    waiting = delivery.status in (DeliveryStatus.PENDING, DeliveryStatus.SENDING)
    return DeliveryOut.model_validate(
        {
            **delivery.model_dump(exclude={"payload", "text_body", "html_body", "claim", "lease_until"}),
            "next_attempt_at": delivery.next_attempt_at if waiting else None,
            "attempts": [AttemptOut.model_validate(a.model_dump()) for a in attempts],
        }
    )


class MailboxMessage(BaseModel):
    subject: str
    to: list[str]
    text: str
    html: str
    received_at: datetime
    mail_from: str
    message_id: str | None


@dev_router.get("/mailbox")
async def dev_mailbox(runtime: RuntimeDep, limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[MailboxMessage]:
    """The email the dev mail sink caught, newest first (dev only; kept in memory)."""
    sink: DevMailSink = runtime.extras["mail_sink"]
    newest = list(sink.messages)[-limit:][::-1]
    return [MailboxMessage.model_validate(m, from_attributes=True) for m in newest]
