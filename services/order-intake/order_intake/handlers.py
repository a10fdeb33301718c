"""Event handlers of order-intake: every order event goes into the order's timeline."""

from __future__ import annotations

from fulfil.codec import Envelope
from fulfil.consumer import Handlers
from fulfil.events import (
    OrderAllocated,
    OrderBackordered,
    OrderCancelled,
    OrderDelayed,
    OrderDelivered,
    OrderEvent,
    OrderReceived,
    OrderShipped,
)
from sqlmodel.ext.asyncio.session import AsyncSession

from order_intake import service


async def on_order_event(event: OrderEvent, session: AsyncSession, envelope: Envelope) -> None:
    """Record what happened in the order's timeline and re-derive its status (idempotent by ce_id)."""
    await service.apply_event(session, event, envelope.id)


HANDLERS: Handlers = {
    event_type: on_order_event
    for event_type in (
        OrderReceived,
        OrderAllocated,
        OrderBackordered,
        OrderShipped,
        OrderDelivered,
        OrderDelayed,
        OrderCancelled,
    )
}
