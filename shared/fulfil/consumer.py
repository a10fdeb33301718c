"""The idempotent consumer loop every service runs.

For each batch of records: decode, skip the ce_ids this group has already applied,
run each handler and record the applied ce_id and any events the handler emitted
(outbox rows) in one transaction, commit it, then commit the Kafka offsets. A record
that keeps failing goes to the dead-letter topic (through the outbox) and the loop
moves on. Handlers only touch the session they are given: they never publish, never
commit, and may be re-run after a rollback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from fulfil import kafka, metrics
from fulfil.codec import Attributes, Envelope, KafkaRecord, UndecodableRecord, decode_data, read_attributes
from fulfil.db import PlatformTable, SessionFactory
from fulfil.events import CATALOGUE, OrderEvent
from fulfil.logs import ce_id_var, order_id_var
from fulfil.outbox import Backoff, add_record, stage_events, utcnow
from fulfil.settings import ServiceSettings
from fulfil.shutdown import finish_within
from sqlalchemy import bindparam, delete, insert, text
from sqlalchemy import select as select_columns
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlmodel import Field, col
from sqlmodel.ext.asyncio.session import AsyncSession

log = logging.getLogger(__name__)

Emitted = Sequence[OrderEvent] | None
Handler = Callable[[Any, AsyncSession, Envelope], Awaitable[Emitted]]
Handlers = Mapping[type[OrderEvent], Handler]


class AppliedEvent(PlatformTable, table=True):
    """The inbox: which events each consumer group has applied."""

    __tablename__ = "inbox"

    consumer_group: str = Field(primary_key=True, max_length=100)
    ce_id: str = Field(primary_key=True, max_length=200)
    applied_at: datetime


INBOX_PURGE_INTERVAL_SECONDS = 600.0
CLIENT_STOP_SECONDS = 10.0
"""A member leaves its group politely within this; a broker that never answers must not hold shutdown up."""
JOINING_STOP_SECONDS = 0.5
"""A member still joining has nothing to commit or leave: aiokafka would wait for the join to end."""

CLAIM_ON_POSTGRESQL = text(
    "INSERT INTO inbox (consumer_group, ce_id, applied_at) "
    "SELECT :group, ids.ce_id, :now FROM unnest(CAST(:ids AS text[])) AS ids(ce_id) "
    "ON CONFLICT DO NOTHING RETURNING ce_id"
).bindparams(bindparam("now", type_=AppliedEvent.__table__.c.applied_at.type))  # type: ignore[attr-defined]

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OperationalError, InterfaceError, OSError, TimeoutError)
"""A database or network that is down: retry the batch for as long as it takes, never dead-letter."""


RETRY_SQLSTATES = frozenset({"40001", "40P01"})
"""Serialization failure and deadlock: the database asks for the transaction to be retried."""


def is_transient(error: BaseException) -> bool:
    if isinstance(error, DBAPIError):
        if error.connection_invalidated:
            return True
        if getattr(error.orig, "sqlstate", None) in RETRY_SQLSTATES:
            return True
    return isinstance(error, TRANSIENT_ERRORS)


@dataclass
class _Failure:
    index: int
    error: BaseException
    attempts: int


class _ClaimRace(Exception):
    """Another member of the group recorded one of the batch's events first."""


CLAIM_RACE_RETRIES = 3


class _Abort(Exception):
    """Roll the batch transaction back because of one record."""

    def __init__(self, failure: _Failure) -> None:
        super().__init__(failure.error)
        self.failure = failure


@dataclass
class ConsumerStats:
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    batches: int = 0
    last_batch_at: float = field(default_factory=time.monotonic)


class EventConsumer:
    def __init__(
        self,
        settings: ServiceSettings,
        sessions: SessionFactory,
        handlers: Handlers,
        *,
        group: str | None = None,
        retry_base_seconds: float = 0.1,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.handlers = handlers
        self.group = group or settings.group_id
        self.retry_base_seconds = retry_base_seconds
        self.stats = ConsumerStats()
        self.consumer: AIOKafkaConsumer | None = None
        self.broker_ok = False
        self._batch_lock = asyncio.Lock()
        self._last_inbox_purge = time.monotonic()
        self._handler_by_type = {model.event_type(): handler for model, handler in handlers.items()}
        self._duplicates = metrics.EVENTS_DUPLICATE.labels(self.group)
        self._applied_by_type = {t: metrics.EVENTS_APPLIED.labels(self.group, t) for t in CATALOGUE}
        self._seconds_by_type = {t: metrics.HANDLER_SECONDS.labels(self.group, t) for t in CATALOGUE}

    # -- applying records (no Kafka here; tests drive it directly) -------------------

    async def apply(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        """Apply records in order: each exactly once in effect, or dead-lettered."""
        start = 0
        while start < len(records):
            failure = await self._apply_until_failure(records, start)
            if failure is None:
                return
            record = records[failure.index]
            if not isinstance(failure.error, UndecodableRecord):
                retried = await self._retry_alone(record, failure)
            else:
                retried = failure
            if retried is not None:
                await self._dead_letter(record, retried.error, retried.attempts)
            start = failure.index + 1

    async def _apply_until_failure(
        self, records: Sequence[ConsumerRecord[bytes, bytes]], start: int
    ) -> _Failure | None:
        """Apply records from ``start`` and commit, stopping before the first failing one.

        A failure rolls the whole transaction back; the records before it are applied
        again in a new one. That costs a replay on the rare failure instead of a
        savepoint per record on every batch."""
        stop = len(records)
        earliest: _Failure | None = None
        while stop > start:
            failure = await self._apply_in_one_transaction(records, start, stop)
            if failure is None:
                break
            earliest = failure
            stop = failure.index
        return earliest

    async def _apply_in_one_transaction(
        self, records: Sequence[ConsumerRecord[bytes, bytes]], start: int, stop: int
    ) -> _Failure | None:
        """Apply records[start:stop] and commit; or roll back and return the first failure."""
        for _ in range(CLAIM_RACE_RETRIES):
            try:
                return await self._apply_once(records, start, stop)
            except _ClaimRace:
                log.info("another consumer claimed an event of this batch meanwhile; applying again")
        return await self._apply_once(records, start, stop)

    async def _apply_once(
        self, records: Sequence[ConsumerRecord[bytes, bytes]], start: int, stop: int
    ) -> _Failure | None:
        attributes: list[Attributes | UndecodableRecord] = []
        for record in records[start:stop]:
            try:
                attributes.append(read_attributes(record.headers))
            except UndecodableRecord as exc:
                attributes.append(exc)
        applied: list[Envelope] = []
        duplicates = 0  # counted once the transaction commits, like what was applied
        try:
            async with self.sessions() as session, session.begin():
                wanted = [
                    attrs.id
                    for attrs in attributes
                    if isinstance(attrs, Attributes) and attrs.type in self._handler_by_type
                ]
                try:
                    claimed = await self._claim(session, wanted)
                except IntegrityError as exc:
                    raise _ClaimRace from exc
                for index, attrs in enumerate(attributes, start=start):
                    if isinstance(attrs, UndecodableRecord):
                        raise _Abort(_Failure(index, attrs, 1))
                    handler = self._handler_by_type.get(attrs.type)
                    if handler is None:
                        continue  # not this service's business: its data is not even parsed
                    if attrs.id not in claimed:
                        duplicates += 1
                        continue
                    claimed.discard(attrs.id)  # a second copy in the same batch is a duplicate
                    try:
                        envelope = decode_data(attrs, records[index].value)
                    except UndecodableRecord as exc:
                        raise _Abort(_Failure(index, exc, 1)) from exc
                    try:
                        await self._run_handler(handler, envelope, session)
                    except Exception as exc:
                        if is_transient(exc):
                            raise
                        metrics.HANDLER_FAILURES.labels(self.group, envelope.type).inc()
                        log.warning("handler for %s failed: %r", envelope.type, exc, extra={"ce_id": envelope.id})
                        raise _Abort(_Failure(index, exc, 1)) from exc
                    applied.append(envelope)
        except _Abort as abort:
            return abort.failure
        self.stats.applied += len(applied)
        self.stats.duplicates += duplicates
        self._duplicates.inc(duplicates)
        for event_type, count in Counter(envelope.type for envelope in applied).items():
            self._applied_by_type[event_type].inc(count)
        return None

    async def _run_handler(self, handler: Handler, envelope: Envelope, session: AsyncSession) -> None:
        order_token = order_id_var.set(envelope.data.order_id)
        ce_token = ce_id_var.set(envelope.id)
        started = time.perf_counter()
        try:
            emitted = await handler(envelope.data, session, envelope)
            if emitted:
                stage_events(session, self.settings, emitted)
        finally:
            self._seconds_by_type[envelope.type].observe(time.perf_counter() - started)
            order_id_var.reset(order_token)
            ce_id_var.reset(ce_token)

    async def forget_old_applied_events(self) -> int:
        """Delete inbox rows older than the retention; return how many."""
        cutoff = utcnow() - timedelta(seconds=self.settings.inbox_retention_seconds)
        async with self.sessions() as session, session.begin():
            connection = await session.connection()
            result = await connection.execute(
                delete(AppliedEvent).where(
                    col(AppliedEvent.consumer_group) == self.group, col(AppliedEvent.applied_at) < cutoff
                )
            )
        self._last_inbox_purge = time.monotonic()
        return int(result.rowcount or 0)

    async def _claim(self, session: AsyncSession, ce_ids: list[str]) -> set[str]:
        """Record these events as applied by this group and return the ones that were not
        already. A rollback releases the claims with the rest of the transaction."""
        unique = list(dict.fromkeys(ce_ids))
        if not unique:
            return set()
        connection = await session.connection()
        if connection.dialect.name == "postgresql":
            # One statement, one round trip, and an array instead of an IN list (whose generic
            # plan turns into a scan comparing every row with every id).
            claim = {"group": self.group, "ids": unique, "now": utcnow()}
            result = await connection.execute(CLAIM_ON_POSTGRESQL, claim)
            return set(result.scalars())
        # SQLite: duplicates are rare, so one indexed lookup of the batch's ids, then one
        # executemany of the new ones. A replica that claimed one of them meanwhile makes the
        # insert fail; the caller retries and the lookup then finds it.
        already: set[str] = set()
        for chunk in _chunks(unique, 500):
            found = await connection.execute(
                select_columns(col(AppliedEvent.ce_id)).where(
                    col(AppliedEvent.consumer_group) == self.group, col(AppliedEvent.ce_id).in_(chunk)
                )
            )
            already.update(found.scalars())
        fresh = [ce_id for ce_id in unique if ce_id not in already]
        if fresh:
            now = utcnow()
            rows = [{"consumer_group": self.group, "ce_id": ce_id, "applied_at": now} for ce_id in fresh]
            await connection.execute(insert(AppliedEvent), rows)
        return set(fresh)

    async def _retry_alone(self, record: ConsumerRecord[bytes, bytes], failure: _Failure) -> _Failure | None:
        """Retry one failing record on its own, with backoff; None once it is applied."""
        backoff = Backoff(base=self.retry_base_seconds, cap=2.0)
        attempts = failure.attempts
        while attempts < self.settings.consumer_max_attempts:
            await asyncio.sleep(backoff.next())
            attempts += 1
            result = await self._apply_in_one_transaction([record], 0, 1)
            if result is None:
                return None
            failure = _Failure(failure.index, result.error, attempts)
        return _Failure(failure.index, failure.error, attempts)

    async def _dead_letter(self, record: ConsumerRecord[bytes, bytes], error: BaseException, attempts: int) -> None:
        headers = [
            *[(name, value) for name, value in record.headers or ()],
            ("dlq_group", self.group.encode()),
            ("dlq_error", f"{type(error).__name__}: {error}"[:2000].encode()),
            ("dlq_attempts", str(attempts).encode()),
            ("dlq_topic", record.topic.encode()),
            ("dlq_partition", str(record.partition).encode()),
            ("dlq_offset", str(record.offset).encode()),
            ("dlq_failed_at", utcnow().isoformat().encode()),
        ]
        event_id = f"dlq:{self.group}:{record.topic}:{record.partition}:{record.offset}"
        dead_letter = KafkaRecord(key=record.key or b"", value=record.value or b"", headers=headers)
        try:
            async with self.sessions() as session, session.begin():
                add_record(session, event_id=event_id, topic=self.settings.kafka_dlq_topic, record=dead_letter)
        except IntegrityError:
            log.info("record %s was already dead-lettered", event_id)
            return
        self.stats.dead_lettered += 1
        metrics.DEAD_LETTERED.labels(self.group).inc()
        log.error(
            "dead-lettered record after %d attempts: %s",
            attempts,
            error,
            extra={"topic": record.topic, "partition": record.partition, "offset": record.offset},
        )

    # -- the Kafka loop --------------------------------------------------------------

    async def run(self, *, topics: Sequence[str] | None = None) -> None:
        """Consume until cancelled; reconnect with backoff whenever the broker or database fails."""
        backoff = Backoff(cap=5.0)
        subscribed = list(topics or [self.settings.kafka_topic])
        while True:
            consumer = kafka.consumer(self.settings, group_id=self.group)
            try:
                consumer.subscribe(subscribed, listener=_FinishBatchOnRevoke(self._batch_lock))
                await consumer.start()
                self.consumer = consumer
                self.broker_ok = True
                log.info("consumer group %s subscribed to %s", self.group, subscribed)
                while True:
                    batches = await self._next_batch(consumer)
                    if batches:
                        await self._apply_and_commit(consumer, batches)
                        backoff.reset()
                    if time.monotonic() - self._last_inbox_purge > INBOX_PURGE_INTERVAL_SECONDS:
                        await self.forget_old_applied_events()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.broker_ok = isinstance(exc, DBAPIError)
                log.warning("consumer %s interrupted, restarting: %r", self.group, exc)
                await asyncio.sleep(backoff.next())
            finally:
                joined = self.consumer is consumer
                self.consumer = None
                # Offsets are already committed: nothing is lost by giving up on a polite stop.
                await finish_within(consumer.stop(), CLIENT_STOP_SECONDS if joined else JOINING_STOP_SECONDS)

    async def _next_batch(self, consumer: AIOKafkaConsumer) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        """Records for one transaction: what has arrived, topped up for a few milliseconds while
        more is flowing, since each commit costs far more than applying one more record."""
        limit = self.settings.consumer_batch_size
        batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = await consumer.getmany(
            timeout_ms=200, max_records=limit
        )
        count = sum(len(records) for records in batches.values())
        deadline = time.monotonic() + self.settings.consumer_linger_ms / 1000
        while 0 < count < limit and time.monotonic() < deadline:
            more = await consumer.getmany(timeout_ms=1, max_records=limit - count)
            if not more:
                break
            for tp, records in more.items():
                batches.setdefault(tp, []).extend(records)
                count += len(records)
        return batches

    async def _apply_retrying_transient(
        self, records: Sequence[ConsumerRecord[bytes, bytes]], *, give_up_after: float = 30.0
    ) -> None:
        """Apply, retrying in place while the database reports a deadlock or is briefly away;
        what was already applied is skipped by its claim. A longer outage propagates."""
        backoff = Backoff(base=0.05, cap=2.0)
        deadline = time.monotonic() + give_up_after
        while True:
            try:
                await self.apply(records)
                return
            except Exception as exc:
                if not is_transient(exc) or time.monotonic() > deadline:
                    raise
                log.warning("transient database error, retrying the batch: %r", exc)
                await asyncio.sleep(backoff.next())

    async def _apply_and_commit(
        self, consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
    ) -> None:
        async with self._batch_lock:
            records = [record for partition_records in batches.values() for record in partition_records]
            try:
                await self._apply_retrying_transient(records)
            except Exception:
                # Nothing of this batch is committed to Kafka: read it again after the restart.
                for tp, partition_records in batches.items():
                    with contextlib.suppress(IllegalStateError):
                        consumer.seek(tp, partition_records[0].offset)
                raise
            offsets = {tp: partition_records[-1].offset + 1 for tp, partition_records in batches.items()}
            try:
                await consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                # The group rebalanced under us; the next owner re-reads and skips what we applied.
                log.warning("offset commit failed (records will be redelivered and skipped): %r", exc)
            self.stats.batches += 1
            self.stats.last_batch_at = time.monotonic()
        for tp, partition_records in batches.items():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                lag = max(0, highwater - partition_records[-1].offset - 1)
                metrics.CONSUMER_LAG.labels(self.group, str(tp.partition)).set(lag)


class _FinishBatchOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Before partitions move to another member, let the batch in hand finish and commit."""

    def __init__(self, batch_lock: asyncio.Lock) -> None:
        self.batch_lock = batch_lock

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self.batch_lock:
            pass

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return None


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


__all__ = ["AppliedEvent", "EventConsumer", "Handler", "Handlers", "KafkaError"]
