"""Event handlers of the notifications service: every order event; those that matter to
the customer queue one delivery per channel, in the consumer's transaction."""

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

from notifications import service
from notifications.domain import NoticeType


async def on_order_received(event: OrderReceived, session: AsyncSession, envelope: Envelope) -> None:
    """Copy the customer's contact, locale and tier; confirm the order."""
    await service.record_order(session, event)
    await service.queue_notices(session, envelope, NoticeType.RECEIVED)


async def on_order_allocated(event: OrderAllocated, session: AsyncSession, envelope: Envelope) -> None:
    """Stock reserved is internal progress: the customer hears when it ships."""


async def on_customer_notice(event: OrderEvent, session: AsyncSession, envelope: Envelope) -> None:
    """Backordered, shipped, delayed, delivered, cancelled: tell the customer."""
    await service.queue_notices(session, envelope, NoticeType(event.type))


HANDLERS: Handlers = {
    OrderReceived: on_order_received,
    OrderAllocated: on_order_allocated,
    OrderBackordered: on_customer_notice,
    OrderShipped: on_customer_notice,
    OrderDelayed: on_customer_notice,
    OrderDelivered: on_customer_notice,
    OrderCancelled: on_customer_notice,
}
