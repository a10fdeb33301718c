"""A record a consumer cannot apply lands in the DLQ with its reasons; the records after
it are still applied; once the cause is fixed, a redrive applies it."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from fulfil import db
from fulfil.cli.dlq import read_dead_letters, redrive_dead_letters
from fulfil.codec import Envelope, KafkaRecord
from fulfil.consumer import EventConsumer
from fulfil.events import OrderReceived
from fulfil.outbox import WAKE_RELAY, OutboxRelay, add_events, add_record
from fulfil.testing import create_topics, eventually, settings_for
from sqlmodel.ext.asyncio.session import AsyncSession

from tests.support.effects import EffectsTable, effect_counts, record_effect
from tests.support.orders import order_received


async def test_poison_and_malformed_records_are_dead_lettered_and_redriven(
    kafka_bootstrap: str, sqlite_url: str, topic_name: str, tmp_path: Path
) -> None:
    settings = settings_for(
        kafka_bootstrap, sqlite_url, topic=topic_name, service_name="dlq-test", consumer_max_attempts=2
    )
    await create_topics(settings)
    engine = db.create_engine(settings.database)
    await db.create_tables(engine, [EffectsTable.metadata])
    sessions = db.session_factory(engine)
    relay = OutboxRelay(settings, sessions)
    sessions.configure(info={WAKE_RELAY: relay.wake})
    broken = {"o-poison"}

    async def handler(event: OrderReceived, session: AsyncSession, envelope: Envelope) -> None:
        if event.order_id in broken:
            raise ValueError(f"no warehouse serves {event.order_id}")
        await record_effect(event, session, envelope)

    consumer = EventConsumer(settings, sessions, {OrderReceived: handler}, retry_base_seconds=0.01)
    tasks = [asyncio.create_task(relay.run()), asyncio.create_task(consumer.run())]
    try:
        async with sessions() as session, session.begin():
            # All keyed to one order id: one partition, so "after" really is after.
            add_events(session, [order_received("o-poison")], source="/t", topic=topic_name)
            add_record(
                session,
                event_id="garbage",
                topic=topic_name,
                record=KafkaRecord(b"o-poison", b"\x00not an event", [("ce_type", b"order.received")]),
            )
            add_events(session, [order_received(f"o-{i}") for i in range(20)], source="/t", topic=topic_name)

        await eventually(lambda: consumer.stats.applied >= 20, timeout=60)
        assert await effect_counts(sessions) == (20, 20)

        async def two_letters() -> bool:
            return len(await read_dead_letters(settings)) == 2

        await eventually(two_letters, timeout=30)
        letters = {letter.header("dlq_error").split(":")[0]: letter for letter in await read_dead_letters(settings)}
        assert set(letters) == {"ValueError", "UndecodableRecord"}
        poison = letters["ValueError"]
        assert poison.header("dlq_group") == settings.group_id
        assert poison.header("dlq_attempts") == "2"
        assert poison.header("dlq_topic") == topic_name
        assert poison.header("ce_subject") == "o-poison"
        assert not poison.redriven

        broken.clear()  # the cause is fixed
        assert await redrive_dead_letters(settings, tmp_path) == 2
        await eventually(lambda: consumer.stats.applied >= 21, timeout=30)
        assert await effect_counts(sessions) == (21, 21)
        # Redriven once: a second redrive finds nothing new waiting except the garbage
        # that failed again and was dead-lettered anew.
        await eventually(two_letters_plus_one(settings), timeout=30)
        assert await redrive_dead_letters(settings, tmp_path) == 1
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks)
        await engine.dispose()


def two_letters_plus_one(settings):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        letters = await read_dead_letters(settings)
        return len(letters) == 3 and sum(not letter.redriven for letter in letters) == 1

    return check
