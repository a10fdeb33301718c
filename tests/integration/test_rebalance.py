"""A second member joins the group mid-stream and a first one leaves: partitions move,
nothing is lost and nothing is applied twice."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from fulfil import db
from fulfil.codec import Envelope
from fulfil.consumer import EventConsumer
from fulfil.events import OrderReceived
from fulfil.outbox import OutboxRelay, add_events
from fulfil.testing import create_topics, eventually, settings_for
from sqlmodel.ext.asyncio.session import AsyncSession

from tests.support.effects import EffectsTable, effect_counts, record_effect
from tests.support.orders import order_received

pytestmark = pytest.mark.slow

EVENTS = 3_000


async def slow_effect(event: OrderReceived, session: AsyncSession, envelope: Envelope) -> None:
    await asyncio.sleep(0.0005)
    await record_effect(event, session, envelope)


async def test_members_joining_and_leaving_apply_every_event_once(
    kafka_bootstrap: str, tmp_path: Path, topic_name: str
) -> None:
    settings = settings_for(
        kafka_bootstrap, f"sqlite+aiosqlite:///{tmp_path}/g.db", topic=topic_name, consumer_batch_size=100
    )
    await create_topics(settings)
    engine = db.create_engine(settings.database)
    await db.create_tables(engine, [EffectsTable.metadata])
    sessions = db.session_factory(engine)
    async with sessions() as session, session.begin():
        add_events(session, [order_received(f"o-{i % 500}") for i in range(EVENTS)], source="/t", topic=topic_name)
    relay = asyncio.create_task(OutboxRelay(settings, sessions).run())
    first = EventConsumer(settings, sessions, {OrderReceived: slow_effect})
    second = EventConsumer(settings, sessions, {OrderReceived: slow_effect})
    first_task = asyncio.create_task(first.run())
    tasks = [relay, first_task]
    try:
        await eventually(lambda: first.stats.applied >= 300, timeout=60)
        tasks.append(asyncio.create_task(second.run()))  # rebalance: partitions are split
        await eventually(lambda: second.stats.applied >= 100, timeout=60)
        first_task.cancel()  # leaves the group: its partitions move to the second member
        with contextlib.suppress(asyncio.CancelledError):
            await first_task

        async def all_applied() -> bool:
            return (await effect_counts(sessions))[0] >= EVENTS

        await eventually(all_applied, timeout=120)
        await asyncio.sleep(1)
        assert await effect_counts(sessions) == (EVENTS, EVENTS)
        assert first.stats.applied + second.stats.applied == EVENTS
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        await engine.dispose()
