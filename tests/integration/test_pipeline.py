"""outbox -> relay -> topic -> consumer -> effect, on a real broker and a real database."""

from __future__ import annotations

import asyncio
import contextlib

from fulfil import db
from fulfil.consumer import EventConsumer
from fulfil.events import OrderCancelled, OrderReceived
from fulfil.outbox import WAKE_RELAY, OutboxRelay, add_events, pending_count
from fulfil.testing import create_topics, eventually, read_topic, settings_for

from tests.support.effects import EffectsTable, effect_counts, record_effect, record_effect_and_cancel
from tests.support.orders import order_received


async def test_events_flow_from_outbox_to_consumer_effects(
    kafka_bootstrap: str, database_url: str, topic_name: str
) -> None:
    settings = settings_for(kafka_bootstrap, database_url, topic=topic_name, service_name="pipeline")
    await create_topics(settings)
    engine = db.create_engine(settings.database)
    await db.create_tables(engine, [EffectsTable.metadata])
    sessions = db.session_factory(engine)
    relay = OutboxRelay(settings, sessions)
    sessions.configure(info={WAKE_RELAY: relay.wake})
    consumer = EventConsumer(
        settings, sessions, {OrderReceived: record_effect_and_cancel, OrderCancelled: record_effect}
    )
    tasks = [asyncio.create_task(relay.run()), asyncio.create_task(consumer.run())]
    try:
        async with sessions() as session, session.begin():
            add_events(session, [order_received(f"o-{i}") for i in range(200)], source="/test", topic=topic_name)

        # 200 received + 200 cancellations the handler emitted through the outbox.
        await eventually(lambda: consumer.stats.applied >= 400, timeout=60)
        assert await effect_counts(sessions) == (400, 400)
        assert await pending_count(sessions) == 0

        records = await read_topic(kafka_bootstrap, topic_name, expect=400)
        assert len({r.id for r in records}) == 400
        by_order: dict[str, list[str]] = {}
        for record in records:
            by_order.setdefault(record.subject, []).append(record.type)
        # Keyed by order id: each order's events are in causal order on one partition.
        assert all(types == ["order.received", "order.cancelled"] for types in by_order.values())
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks)
        await engine.dispose()
