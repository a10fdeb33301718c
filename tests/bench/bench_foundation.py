"""Outbox relay and consumer loop throughput against raw aiokafka on the same broker.

python -m tests.bench bench_foundation        (N events; BENCH_EVENTS to change)
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from fulfil import db
from fulfil.broker import EmbeddedBroker, free_port
from fulfil.codec import Envelope, encode
from fulfil.consumer import EventConsumer
from fulfil.events import OrderReceived
from fulfil.outbox import OutboxRelay, add_events, pending_count
from fulfil.testing import POSTGRES_ADMIN_URL, create_topics, postgres_unreachable_reason, settings_for

from tests.support.orders import order_received

EVENTS = int(os.environ.get("BENCH_EVENTS", "20000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))


async def raw_produce(bootstrap: str, topic: str, events: list[OrderReceived]) -> float:
    records = [encode(event, source="/bench")[1] for event in events]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2, max_batch_size=1_048_576)
    await producer.start()
    started = time.perf_counter()
    deliveries = [await producer.send(topic, value=r.value, key=r.key, headers=r.headers) for r in records]
    await asyncio.gather(*deliveries)
    elapsed = time.perf_counter() - started
    await producer.stop()
    return len(records) / elapsed


async def relay_publish(bootstrap: str, topic: str, events: list[OrderReceived], database_url: str) -> float:
    settings = settings_for(bootstrap, database_url, topic=topic)
    engine = db.create_engine(settings.database)
    await db.create_tables(engine, [])
    sessions = db.session_factory(engine)
    async with sessions() as session, session.begin():
        add_events(session, events, source="/bench", topic=topic)
    relay = OutboxRelay(settings, sessions)
    relay.producer = await relay._start_producer()
    started = time.perf_counter()
    while await relay.publish_pending():
        pass
    elapsed = time.perf_counter() - started
    assert await pending_count(sessions) == 0
    await relay.producer.stop()
    await engine.dispose()
    return len(events) / elapsed


async def raw_consume(bootstrap: str, topic: str, expect: int) -> float:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"raw-{uuid.uuid4().hex}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=3000,
        heartbeat_interval_ms=750,
    )
    await consumer.start()
    seen = 0
    started = None
    while seen < expect:
        batches = await consumer.getmany(timeout_ms=500, max_records=500)
        if batches and started is None:
            started = time.perf_counter()
        for records in batches.values():
            seen += len(records)
        if batches:
            await consumer.commit()
    assert started is not None
    elapsed = time.perf_counter() - started
    await consumer.stop()
    return seen / elapsed


async def consumer_loop(bootstrap: str, topic: str, expect: int, database_url: str) -> float:
    settings = settings_for(
        bootstrap,
        database_url,
        topic=topic,
        consumer_group=f"loop-{uuid.uuid4().hex}",
    )
    engine = db.create_engine(settings.database)
    await db.create_tables(engine, [])
    first_record: list[float] = []

    async def no_op(event: OrderReceived, session: object, envelope: Envelope) -> None:
        if not first_record:
            first_record.append(time.perf_counter())

    consumer = EventConsumer(settings, db.session_factory(engine), {OrderReceived: no_op})
    task = asyncio.create_task(consumer.run())
    while consumer.stats.applied < expect:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - first_record[0]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await engine.dispose()
    return expect / elapsed


async def fresh_database(kind: str, directory: str) -> str:
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{directory}/{uuid.uuid4().hex}.db"
    import asyncpg

    name = f"fulfil_bench_{uuid.uuid4().hex[:10]}"
    connection = await asyncpg.connect(POSTGRES_ADMIN_URL.replace("+asyncpg", ""))
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return POSTGRES_ADMIN_URL.rpartition("/")[0] + "/" + name


async def backends() -> list[str]:
    wanted = os.environ.get("BENCH_DATABASES", "sqlite,postgresql").split(",")
    if "postgresql" in wanted and await postgres_unreachable_reason() is not None:
        print(f"PostgreSQL does not answer at {POSTGRES_ADMIN_URL}: benchmarking SQLite only")
        wanted.remove("postgresql")
    return wanted


async def run() -> None:
    broker = EmbeddedBroker("127.0.0.1", free_port())
    broker.start()
    try:
        with tempfile.TemporaryDirectory() as directory:
            for kind in await backends():
                await run_backend(broker.bootstrap_servers, kind, directory)
    finally:
        broker.stop()


async def run_backend(bootstrap: str, kind: str, directory: str) -> None:
    results: dict[str, list[float]] = {"raw produce": [], "relay": [], "raw consume": [], "consumer loop": []}
    for _ in range(ROUNDS):
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        await create_topics(settings_for(bootstrap, "sqlite://", topic=topic))
        events = [order_received(f"o-{i % 2000}") for i in range(EVENTS)]
        results["raw produce"].append(await raw_produce(bootstrap, topic, events))
        results["relay"].append(await relay_publish(bootstrap, topic, events, await fresh_database(kind, directory)))
        # The topic now holds 2 x EVENTS records; both consumers read all of them.
        results["raw consume"].append(await raw_consume(bootstrap, topic, 2 * EVENTS))
        database = await fresh_database(kind, directory)
        results["consumer loop"].append(await consumer_loop(bootstrap, topic, 2 * EVENTS, database))
    best = {name: max(values) for name, values in results.items()}
    print(f"{kind}: {EVENTS} events published, {2 * EVENTS} consumed per round; best of {ROUNDS} rounds")
    for name, value in best.items():
        rounds = ", ".join(f"{v:,.0f}" for v in results[name])
        print(f"  {name:<14} {value:>10,.0f} events/s   (all rounds: {rounds})")
    print(f"  relay / raw produce    = {best['relay'] / best['raw produce']:.0%}   (aim >= 50%)")
    print(f"  consumer / raw consume = {best['consumer loop'] / best['raw consume']:.0%}   (aim >= 30%)")
