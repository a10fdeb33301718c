"""Kill -9 in the middle of a stream, restart, count: nothing lost, nothing applied twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from fulfil import db
from fulfil.consumer import EventConsumer
from fulfil.events import OrderReceived
from fulfil.outbox import OutboxRelay, OutboxRow, add_events
from fulfil.testing import create_topics, eventually, read_topic, settings_for
from sqlmodel import func, select

from tests.support.effects import EffectsTable, effect_counts, record_effect
from tests.support.orders import order_received

REPO = Path(__file__).resolve().parents[2]
EVENTS = 2_500

pytestmark = pytest.mark.slow


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []

    def start(*args: str, **env: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.worker", *args],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


async def open_db(url: str) -> tuple[db.AsyncEngine, db.SessionFactory]:  # type: ignore[name-defined]
    engine = db.create_engine(url)
    await db.create_tables(engine, [EffectsTable.metadata])
    return engine, db.session_factory(engine)


@contextlib.asynccontextmanager
async def background(*coroutines: object) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(c) for c in coroutines]  # type: ignore[arg-type]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks)


def kill(process: subprocess.Popen[bytes]) -> None:
    assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
    process.send_signal(signal.SIGKILL)
    process.wait()


async def test_a_consumer_killed_mid_stream_applies_every_event_exactly_once(
    kafka_bootstrap: str, tmp_path: Path, topic_name: str, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    producer_settings = settings_for(kafka_bootstrap, f"sqlite+aiosqlite:///{tmp_path}/producer.db", topic=topic_name)
    await create_topics(producer_settings)
    producer_engine, producer_sessions = await open_db(producer_settings.database)
    async with producer_sessions() as session, session.begin():
        add_events(session, [order_received(f"o-{i % 300}") for i in range(EVENTS)], source="/t", topic=topic_name)
    async with background(OutboxRelay(producer_settings, producer_sessions).run()):
        assert len(await read_topic(kafka_bootstrap, topic_name, expect=EVENTS)) == EVENTS

    consumer_db = f"sqlite+aiosqlite:///{tmp_path}/consumer.db"
    engine, sessions = await open_db(consumer_db)
    kills = 0
    try:
        for _ in range(2):  # two kills, at different points of the stream
            worker = spawn("consume", kafka_bootstrap, topic_name, consumer_db, EFFECT_DELAY="0.001")
            floor = (await effect_counts(sessions))[0] + 200

            async def progressed(floor: int = floor) -> bool:
                return (await effect_counts(sessions))[0] >= floor

            await eventually(progressed, timeout=60, interval=0.01)
            assert (await effect_counts(sessions))[0] < EVENTS, "stream finished before the kill"
            kill(worker)
            kills += 1
        spawn("consume", kafka_bootstrap, topic_name, consumer_db)

        async def all_applied() -> bool:
            return (await effect_counts(sessions))[0] >= EVENTS

        await eventually(all_applied, timeout=120, interval=0.1)
        await asyncio.sleep(1.0)  # anything applied twice would show up now
        assert await effect_counts(sessions) == (EVENTS, EVENTS)
        assert kills == 2
    finally:
        await engine.dispose()
        await producer_engine.dispose()


async def test_a_relay_killed_mid_publish_loses_nothing_and_consumers_apply_once(
    kafka_bootstrap: str, tmp_path: Path, topic_name: str, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    outbox_db = f"sqlite+aiosqlite:///{tmp_path}/outbox.db"
    settings = settings_for(kafka_bootstrap, outbox_db, topic=topic_name)
    await create_topics(settings)
    engine, sessions = await open_db(outbox_db)

    reads = db.session_factory(db.read_engine(outbox_db, engine))

    async def sent_rows() -> int:
        async with reads() as session:
            return int((await session.exec(select(func.count()).where(OutboxRow.sent_at.is_not(None)))).one())  # type: ignore[union-attr]

    try:
        async with sessions() as session, session.begin():
            add_events(session, [order_received(f"o-{i % 300}") for i in range(EVENTS)], source="/t", topic=topic_name)
        relay = spawn("relay", kafka_bootstrap, topic_name, outbox_db, OUTBOX_BATCH_SIZE="20")

        async def some_sent() -> bool:
            return await sent_rows() >= 300

        await eventually(some_sent, timeout=60, interval=0.005)
        assert await sent_rows() < EVENTS, "relay finished before the kill"
        kill(relay)
        spawn("relay", kafka_bootstrap, topic_name, outbox_db, OUTBOX_BATCH_SIZE="500")

        async def all_sent() -> bool:
            return await sent_rows() == EVENTS

        await eventually(all_sent, timeout=120, interval=0.1)
        published = await read_topic(kafka_bootstrap, topic_name, expect=EVENTS)
        assert len({record.id for record in published}) == EVENTS  # at least once each

        consumer_settings = settings_for(kafka_bootstrap, f"sqlite+aiosqlite:///{tmp_path}/c.db", topic=topic_name)
        consumer_engine, consumer_sessions = await open_db(consumer_settings.database)
        consumer = EventConsumer(consumer_settings, consumer_sessions, {OrderReceived: record_effect})
        async with background(consumer.run()):
            await eventually(lambda: consumer.stats.applied + consumer.stats.duplicates >= len(published), timeout=60)
        assert await effect_counts(consumer_sessions) == (EVENTS, EVENTS)
        await consumer_engine.dispose()
    finally:
        await engine.dispose()
