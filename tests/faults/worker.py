"""A process to kill: runs the real consumer loop or the real outbox relay until SIGKILL.

python -m tests.faults.worker consume|relay BOOTSTRAP TOPIC DATABASE_URL
"""

from __future__ import annotations

import asyncio
import os
import sys

from fulfil import db
from fulfil.codec import Envelope
from fulfil.consumer import EventConsumer
from fulfil.events import OrderEvent, OrderReceived
from fulfil.outbox import OutboxRelay
from fulfil.testing import settings_for
from sqlmodel.ext.asyncio.session import AsyncSession

from tests.support.effects import EffectsTable, record_effect

EFFECT_DELAY = float(os.environ.get("EFFECT_DELAY", "0"))


async def slow_effect(event: OrderEvent, session: AsyncSession, envelope: Envelope) -> None:
    # Slow enough that a kill lands in the middle of the stream.
    await asyncio.sleep(EFFECT_DELAY)
    await record_effect(event, session, envelope)


async def main(role: str, bootstrap: str, topic: str, database_url: str) -> None:
    settings = settings_for(
        bootstrap,
        database_url,
        topic=topic,
        service_name="fault-worker",
        outbox_batch_size=int(os.environ.get("OUTBOX_BATCH_SIZE", "1000")),
        consumer_batch_size=int(os.environ.get("CONSUMER_BATCH_SIZE", "100")),
    )
    engine = db.create_engine(settings.database)
    await db.create_tables(engine, [EffectsTable.metadata])
    sessions = db.session_factory(engine)
    if role == "consume":
        await EventConsumer(settings, sessions, {OrderReceived: slow_effect}).run()
    else:
        await OutboxRelay(settings, sessions, lease_seconds=2).run()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
