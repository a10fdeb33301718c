"""Event handlers of the inventory service: one async function per consumed event type."""

from __future__ import annotations

from datetime import UTC, datetime

from fulfil.codec import Envelope
from fulfil.consumer import Handlers
from fulfil.events import OrderCancelled, OrderEvent, OrderReceived, OrderShipped
from sqlmodel.ext.asyncio.session import AsyncSession

from inventory import service
from inventory.service import Clock


def system_clock() -> datetime:
    return datetime.now(UTC)


def handlers_for(clock: Clock = system_clock) -> Handlers:
    """The handlers, with the clock that stamps the events they emit."""

    def stamp(event: OrderEvent) -> datetime:
        # Never before the cause, even if this host's clock lags the producer's.
        return max(clock(), event.occurred_at)

    async def on_order_received(event: OrderReceived, session: AsyncSession, envelope: Envelope) -> list[OrderEvent]:
        """Reserve stock for each line; what cannot be covered is backordered."""
        return await service.allocate_order(session, event, at=stamp(event))

    async def on_order_cancelled(event: OrderCancelled, session: AsyncSession, envelope: Envelope) -> list[OrderEvent]:
        """Release the order's stock and backorders; the queue gets the units."""
        return await service.cancel_order(session, event, at=stamp(event))

    async def on_order_shipped(event: OrderShipped, session: AsyncSession, envelope: Envelope) -> None:
        """Reserved units leave stock."""
        await service.record_shipment(session, event)

    return {OrderReceived: on_order_received, OrderCancelled: on_order_cancelled, OrderShipped: on_order_shipped}


HANDLERS: Handlers = handlers_for()
