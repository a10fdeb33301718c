"""Event handlers of the shipping service: one async function per consumed event type.

They need the service's settings (handling and transit times), so they are built per
app by ``handlers_for(settings)`` rather than at import time.
"""

from __future__ import annotations

from fulfil.codec import Envelope
from fulfil.consumer import Handlers
from fulfil.events import OrderAllocated, OrderCancelled, OrderEvent, OrderReceived
from sqlmodel.ext.asyncio.session import AsyncSession

from shipping import service
from shipping.config import Settings


def handlers_for(settings: Settings) -> Handlers:
    async def on_order_received(event: OrderReceived, session: AsyncSession, envelope: Envelope) -> None:
        """Keep the service level, requested date and customer tier the promise depends on."""
        await service.record_order_terms(session, settings, event)

    async def on_order_allocated(
        event: OrderAllocated, session: AsyncSession, envelope: Envelope
    ) -> list[OrderEvent] | None:
        """One pending shipment per warehouse, with its ship-by and promised delivery time."""
        await service.create_shipments(session, settings, event, event_id=envelope.id)
        return None

    async def on_order_cancelled(event: OrderCancelled, session: AsyncSession, envelope: Envelope) -> None:
        """Pending shipments are cancelled; dispatched ones cannot be (recorded)."""
        await service.cancel_order(session, event)

    return {
        OrderReceived: on_order_received,
        OrderAllocated: on_order_allocated,
        OrderCancelled: on_order_cancelled,
    }
