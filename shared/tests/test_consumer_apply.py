"""The consumer's apply step on real SQLite and PostgreSQL databases, fed records directly (no broker)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from fulfil import db
from fulfil.codec import Envelope, KafkaRecord
from fulfil.consumer import AppliedEvent, EventConsumer
from fulfil.events import OrderCancelled, OrderReceived
from fulfil.outbox import OutboxRow, unpack_headers
from fulfil.settings import ServiceSettings
from fulfil.testing import as_consumed, consumed_records
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from tests.support.effects import Effect, EffectsTable, effect_counts, record_effect
from tests.support.orders import order_received


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[db.SessionFactory]:
    engine = db.create_engine(database_url)
    await db.create_tables(engine, [EffectsTable.metadata])
    yield db.session_factory(engine)
    await engine.dispose()


def consumer_for(sessions: db.SessionFactory, handlers: dict, attempts: int = 3) -> EventConsumer:  # type: ignore[type-arg]
    settings = ServiceSettings(service_name="t", consumer_max_attempts=attempts)
    return EventConsumer(settings, sessions, handlers, retry_base_seconds=0.001)


async def dead_letters(sessions: db.SessionFactory) -> list[OutboxRow]:
    async with sessions() as session:
        return list((await session.exec(select(OutboxRow).where(OutboxRow.topic == "order-events.dlq"))).all())


async def test_a_redelivered_batch_is_applied_once(sessions: db.SessionFactory) -> None:
    records = consumed_records([order_received(f"o-{i}") for i in range(50)])
    consumer = consumer_for(sessions, {OrderReceived: record_effect})
    await consumer.apply(records)
    await consumer.apply(records)  # redelivery after a crash before the offset commit
    await consumer.apply(records[:10] + records[:10])
    assert await effect_counts(sessions) == (50, 50)
    assert consumer.stats.applied == 50
    assert consumer.stats.duplicates == 70


async def test_a_failing_record_is_retried_then_dead_lettered_and_the_rest_applied(sessions: db.SessionFactory) -> None:
    calls: dict[str, int] = {}

    async def fussy(event: OrderReceived, session: AsyncSession, envelope: Envelope) -> None:
        calls[event.order_id] = calls.get(event.order_id, 0) + 1
        if event.order_id == "o-3":
            raise ValueError("cannot apply o-3")
        await record_effect(event, session, envelope)

    records = consumed_records([order_received(f"o-{i}") for i in range(6)])
    consumer = consumer_for(sessions, {OrderReceived: fussy}, attempts=3)
    await consumer.apply(records)

    assert await effect_counts(sessions) == (5, 5)
    assert calls["o-3"] == 3  # first pass + 2 retries alone
    [letter] = await dead_letters(sessions)
    headers = dict(unpack_headers(letter.headers))
    assert headers["dlq_group"] == b"t"
    assert headers["dlq_attempts"] == b"3"
    assert headers["dlq_error"] == b"ValueError: cannot apply o-3"
    assert headers["dlq_offset"] == b"3"
    assert headers["ce_subject"] == b"o-3"
    assert letter.value == records[3].value
    async with sessions() as session:
        applied = (await session.exec(select(AppliedEvent.ce_id))).all()
    assert len(applied) == 5  # the dead letter is not marked applied: a redrive applies it


async def test_a_record_that_fails_once_is_applied_on_retry_in_order(sessions: db.SessionFactory) -> None:
    failed_once: set[str] = set()

    async def flaky(event: OrderReceived, session: AsyncSession, envelope: Envelope) -> None:
        if event.order_id == "o-1" and "o-1" not in failed_once:
            failed_once.add("o-1")
            raise RuntimeError("blip")
        await record_effect(event, session, envelope)

    consumer = consumer_for(sessions, {OrderReceived: flaky})
    await consumer.apply(consumed_records([order_received(f"o-{i}") for i in range(4)]))
    async with sessions() as session:
        order = (await session.exec(select(Effect.order_id).order_by(Effect.id))).all()  # type: ignore[arg-type]
    assert order == ["o-0", "o-1", "o-2", "o-3"]
    assert await dead_letters(sessions) == []


async def test_undecodable_records_go_straight_to_the_dlq(sessions: db.SessionFactory) -> None:
    good = consumed_records([order_received("o-0"), order_received("o-2")])
    garbage = as_consumed(KafkaRecord(b"o-1", b"{not json", [("ce_type", b"order.received")]), 1)
    consumer = consumer_for(sessions, {OrderReceived: record_effect})
    await consumer.apply([good[0], garbage, good[1]])
    assert await effect_counts(sessions) == (2, 2)
    [letter] = await dead_letters(sessions)
    assert dict(unpack_headers(letter.headers))["dlq_attempts"] == b"1"
    assert b"missing CloudEvents attributes" in dict(unpack_headers(letter.headers))["dlq_error"]


async def test_events_without_a_handler_are_passed_over(sessions: db.SessionFactory) -> None:
    cancelled = OrderCancelled(order_id="o-1", occurred_at=order_received("o-1").occurred_at, reason="x")
    consumer = consumer_for(sessions, {OrderReceived: record_effect})
    await consumer.apply(consumed_records([cancelled, order_received("o-2")]))
    assert await effect_counts(sessions) == (1, 1)


async def test_a_database_outage_is_not_a_poison_record(sessions: db.SessionFactory) -> None:
    async def database_down(event: OrderReceived, session: AsyncSession, envelope: Envelope) -> None:
        raise OperationalError("SELECT 1", {}, Exception("database is locked"))

    consumer = consumer_for(sessions, {OrderReceived: database_down})
    with pytest.raises(OperationalError):
        await consumer.apply(consumed_records([order_received("o-1")]))
    assert await dead_letters(sessions) == []


async def test_applied_ids_older_than_the_retention_are_forgotten(sessions: db.SessionFactory) -> None:
    consumer = consumer_for(sessions, {OrderReceived: record_effect})
    await consumer.apply(consumed_records([order_received(f"o-{i}") for i in range(5)]))
    async with sessions() as session, session.begin():
        old = (await session.exec(select(AppliedEvent).limit(2))).all()
        for entry in old:
            entry.applied_at = entry.applied_at - timedelta(days=30)
    assert await consumer.forget_old_applied_events() == 2
    async with sessions() as session:
        assert len((await session.exec(select(AppliedEvent))).all()) == 3


@pytest.mark.parametrize("sqlstate", ["40P01", "40001"])
async def test_deadlocks_and_serialization_failures_are_retried_not_dead_lettered(
    sessions: db.SessionFactory, sqlstate: str
) -> None:
    class PostgresError(Exception):
        def __init__(self) -> None:
            super().__init__("deadlock detected")
            self.sqlstate = sqlstate

    async def deadlocked(event: OrderReceived, session: AsyncSession, envelope: Envelope) -> None:
        raise DBAPIError("UPDATE stock", {}, PostgresError())

    consumer = consumer_for(sessions, {OrderReceived: deadlocked})
    with pytest.raises(DBAPIError):
        await consumer.apply(consumed_records([order_received("o-1")]))
    assert await dead_letters(sessions) == []


async def test_a_batch_retried_after_a_deadlock_counts_its_duplicates_once(sessions: db.SessionFactory) -> None:
    records = consumed_records([order_received(f"o-{i}") for i in range(11)])
    deadlocks = ["o-10"]

    class PostgresError(Exception):
        sqlstate = "40P01"

    async def deadlocked_once(event: OrderReceived, session: AsyncSession, envelope: Envelope) -> None:
        if event.order_id in deadlocks:
            deadlocks.remove(event.order_id)
            raise DBAPIError("UPDATE stock", {}, PostgresError("deadlock detected"))
        await record_effect(event, session, envelope)

    consumer = consumer_for(sessions, {OrderReceived: deadlocked_once})
    await consumer.apply(records[:10])
    # Redelivered with one new record, whose first attempt deadlocks: the whole batch runs twice.
    await consumer._apply_retrying_transient(records)
    assert deadlocks == []
    assert (consumer.stats.applied, consumer.stats.duplicates) == (11, 10)
    assert await effect_counts(sessions) == (11, 11)
