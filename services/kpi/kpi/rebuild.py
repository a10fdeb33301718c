"""Rebuild the KPI state: forget every order and aggregate, and replay the topic from the start.

Runs in one database transaction that starts by taking the write lock (SQLite) or
exclusive locks on the kpi tables and the aggregate writers' lock (PostgreSQL), so
the live consumer's and fold's writes wait for it. The topic's end offsets are read
only once the locks are held: everything the live consumer applied before is below
them and is replayed; everything after is applied by the live consumer once the
rebuild commits. Facts are order-independent and first-write-wins, so replaying events
the consumer also saw changes nothing. The replay is folded into the aggregates before
the transaction commits, so the rebuilt state is complete at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from fulfil import db, kafka
from fulfil.codec import UndecodableRecord, decode
from fulfil.events import OrderEvent
from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from kpi import service
from kpi.config import Settings
from kpi.models import KpiTable
from kpi.service import Clock, utc_now

log = logging.getLogger(__name__)

BATCH = 2000


@dataclass
class RebuildStats:
    records: int = 0
    applied: int = 0
    undecodable: int = 0
    orders: int = 0


async def rebuild(settings: Settings, *, clock: Clock = utc_now) -> RebuildStats:
    engine = db.create_engine(settings.database)
    stats = RebuildStats()
    settle_after = int(settings.kpi_settle_after_seconds)
    try:
        await db.create_tables(engine, [KpiTable.metadata])
        sessions = db.session_factory(engine)
        async with sessions() as session, session.begin():
            connection = await session.connection()
            if db.is_sqlite(settings.database):
                await service.reset(session)  # the first write takes SQLite's write lock
            else:
                tables = ", ".join(table.name for table in service.TABLES)
                await connection.execute(text(f"LOCK TABLE {tables} IN EXCLUSIVE MODE"))
                await session.run_sync(lambda sync: service.lock_aggregates(sync.connection()))
                await service.reset(session)
            consumer = kafka.consumer(settings, group_id=None)
            await consumer.start()
            try:
                await _replay(consumer, settings.kafka_topic, session, stats, clock(), settle_after)
            finally:
                await consumer.stop()
            while await service.fold_pending_async(session):
                pass
            await service.compact_async(session, clock(), settle_after=settle_after)
            stats.orders = await service.count_orders(session)
    finally:
        await engine.dispose()
    return stats


async def _replay(
    consumer: AIOKafkaConsumer,
    topic: str,
    session: AsyncSession,
    stats: RebuildStats,
    now: datetime,
    settle_after: int,
) -> None:
    await consumer.topics()
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
    consumer.assign(partitions)
    await consumer.seek_to_beginning(*partitions)
    end = await consumer.end_offsets(partitions)
    remaining = {tp for tp in partitions if end[tp] > 0}
    while remaining:
        batches = await consumer.getmany(*remaining, timeout_ms=500, max_records=BATCH)
        events: list[OrderEvent] = []
        for tp, records in batches.items():
            for record in records:
                if record.offset >= end[tp]:
                    continue
                stats.records += 1
                try:
                    envelope = decode(record.key, record.value, record.headers)
                except UndecodableRecord as exc:
                    stats.undecodable += 1
                    log.warning("skipping undecodable record %s@%s: %s", tp, record.offset, exc)
                    continue
                events.append(envelope.data)
        if events:
            await service.apply_events_async(session, events, now=now, settle_after=settle_after)
            stats.applied += len(events)
        for tp in list(remaining):
            if await consumer.position(tp) >= end[tp]:
                remaining.discard(tp)
