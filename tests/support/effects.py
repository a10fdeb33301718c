"""A stand-in service for platform tests: each applied event leaves one effect row.

Effect rows have no unique constraint on purpose, so applying an event twice would be
visible as two rows: the tests count rows per ce_id.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fulfil.codec import Envelope
from fulfil.consumer import Handlers
from fulfil.db import SessionFactory
from fulfil.events import OrderCancelled, OrderEvent, OrderReceived
from sqlalchemy import func
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession


class EffectsTable(SQLModel, registry=registry()):
    pass


class Effect(EffectsTable, table=True):
    __tablename__ = "effect"

    id: int | None = Field(default=None, primary_key=True)
    ce_id: str = Field(index=True)
    order_id: str
    event_type: str


async def record_effect(event: OrderEvent, session: AsyncSession, envelope: Envelope) -> None:
    session.add(Effect(ce_id=envelope.id, order_id=event.order_id, event_type=event.type))


async def record_effect_and_cancel(event: OrderReceived, session: AsyncSession, envelope: Envelope) -> list[OrderEvent]:
    """Applies the event and emits a follow-up, to prove emitted events travel via the outbox."""
    await record_effect(event, session, envelope)
    return [OrderCancelled(order_id=event.order_id, occurred_at=datetime.now(UTC), reason="follow-up")]


EFFECT_HANDLERS: Handlers = {OrderReceived: record_effect, OrderCancelled: record_effect}


async def effect_counts(sessions: SessionFactory) -> tuple[int, int]:
    """(rows, distinct ce_ids)."""
    from fulfil import db

    engine = sessions.kw["bind"]
    url = engine.url.render_as_string(hide_password=False)
    reader = db.read_engine(url, engine)
    try:
        async with db.session_factory(reader)() as session:
            rows = (await session.exec(select(func.count()).select_from(Effect))).one()  # type: ignore[call-overload]
            distinct = (await session.exec(select(func.count(func.distinct(Effect.ce_id))))).one()  # type: ignore[call-overload]
    finally:
        if reader is not engine:
            await reader.dispose()
    return int(rows), int(distinct)
