"""Transactional outbox: the only way anything reaches Kafka.

A use case adds outbox rows in the same transaction as its state change. The relay
publishes pending rows in id order (acks=all), keyed by order id, and marks them sent.
A crash between publishing and marking re-publishes the row (at least once); consumers
drop the duplicate by its ``ce_id``. One relay per database holds a lease, so replicas
never publish the same rows concurrently or out of order; a replica that dies leaves
its lease to expire and another takes over the rows it left in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from fulfil import kafka, metrics
from fulfil.codec import Headers, KafkaRecord, encode
from fulfil.db import PlatformTable, SessionFactory
from fulfil.events import OrderEvent
from fulfil.settings import ServiceSettings
from fulfil.shutdown import finish_within
from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, delete, func, text, update
from sqlalchemy import select as select_columns
from sqlalchemy.exc import DBAPIError
from sqlmodel import Field, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

log = logging.getLogger(__name__)

RELAY_PIPELINE = 3
"""Batches handed to the producer before the oldest must be acknowledged."""
RELAY_BATCHES_PER_CALL = 20
"""Batches one ``publish_pending`` call publishes before the relay renews its lease."""

WAKE_RELAY = "wake_outbox_relay"
"""Session ``info`` key: called after a commit that added outbox rows."""
_ADDED = "outbox_rows_added"


def utcnow() -> datetime:
    return datetime.now(UTC)


class OutboxRow(PlatformTable, table=True):
    __tablename__ = "outbox"
    __table_args__ = (
        Index(
            "ix_outbox_pending",
            "id",
            postgresql_where=text("sent_at IS NULL"),
            sqlite_where=text("sent_at IS NULL"),
        ),
    )

    # SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias).
    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    )
    event_id: str = Field(unique=True, max_length=200)
    topic: str
    key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    value: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    headers: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    sent_at: datetime | None = Field(default=None, index=True)


class RelayLease(PlatformTable, table=True):
    __tablename__ = "outbox_lease"

    name: str = Field(primary_key=True)
    holder: str
    expires_at: datetime


def pack_headers(headers: Headers) -> bytes:
    # Header values are bytes; latin-1 maps every byte to one character and back.
    return "\n".join(f"{name}\t{value.decode('latin-1')}" for name, value in headers).encode("latin-1")


def unpack_headers(packed: bytes) -> Headers:
    if not packed:
        return []
    return [
        (name, value.encode("latin-1"))
        for name, _, value in (line.partition("\t") for line in packed.decode("latin-1").split("\n"))
    ]


def add_events(session: AsyncSession, events: Iterable[OrderEvent], *, source: str, topic: str) -> list[str]:
    """Stage events for publication in the caller's transaction; return their ce_ids."""
    ids = []
    rows = []
    for event in events:
        ce_id, record = encode(event, source=source)
        ids.append(ce_id)
        rows.append(_row(ce_id, topic, record))
    if rows:
        add_rows(session, rows)
    return ids


def stage_events(session: AsyncSession, settings: ServiceSettings, events: Iterable[OrderEvent]) -> list[str]:
    """Stage events this service publishes, on its topic, in the caller's transaction."""
    return add_events(session, events, source=f"/fulfil/{settings.service_name}", topic=settings.kafka_topic)


def add_record(session: AsyncSession, *, event_id: str, topic: str, record: KafkaRecord) -> None:
    """Stage an already-encoded record (dead letters, redrives)."""
    add_rows(session, [_row(event_id, topic, record)])


def _row(event_id: str, topic: str, record: KafkaRecord) -> OutboxRow:
    return OutboxRow(
        event_id=event_id,
        topic=topic,
        key=record.key,
        value=record.value,
        headers=pack_headers(record.headers),
        created_at=utcnow(),
    )


def add_rows(session: AsyncSession, rows: Sequence[OutboxRow]) -> None:
    session.add_all(rows)
    session.sync_session.info[_ADDED] = True


def install_commit_hook() -> None:
    """Wake the relay as soon as a transaction that added outbox rows commits."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    if event.contains(Session, "after_commit", _after_commit):
        return
    event.listen(Session, "after_commit", _after_commit)


def _after_commit(session: object) -> None:
    info = getattr(session, "info", {})
    if info.pop(_ADDED, False):
        wake: Callable[[], None] | None = info.get(WAKE_RELAY)
        if wake is not None:
            wake()


install_commit_hook()


class OutboxRelay:
    """Publishes pending outbox rows; one active relay per database (lease)."""

    LEASE = "relay"

    def __init__(
        self,
        settings: ServiceSettings,
        sessions: SessionFactory,
        *,
        reads: SessionFactory | None = None,
        lease_seconds: float = 15.0,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.reads = reads or sessions
        """Where pending rows are read: on SQLite a reader that does not take the write lock."""
        self._lease_renew_at: datetime | None = None
        self.lease_seconds = lease_seconds
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.producer: AIOKafkaProducer | None = None
        self.broker_ok = False
        self._wake = asyncio.Event()
        self._last_purge = utcnow()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Run until cancelled; never gives up on a broker or database that is down."""
        backoff = Backoff()
        try:
            while True:
                try:
                    if self.producer is None:
                        self.producer = await self._start_producer()
                    if not await self._hold_lease():
                        await self._sleep(self.lease_seconds / 3)
                        continue
                    published = await self.publish_pending()
                    backoff.reset()
                    if published < self.settings.outbox_batch_size:
                        await self._sleep(self.settings.outbox_poll_seconds)
                except (KafkaError, OSError) as exc:
                    self.broker_ok = False
                    metrics.OUTBOX_PUBLISH_FAILURES.labels(self.settings.service_name).inc()
                    log.warning("outbox relay: broker unavailable, retrying: %s", exc)
                    await asyncio.sleep(backoff.next())
                except DBAPIError as exc:
                    log.warning("outbox relay: database unavailable, retrying: %s", exc)
                    await asyncio.sleep(backoff.next())
        finally:
            if self.producer is not None:
                # Unsent rows stay in the outbox; a dead broker must not hold shutdown up.
                await finish_within(self.producer.stop(), 10.0)

    async def drain(self) -> None:
        """Publish everything pending now, then stop: for one-shot tools, not services."""
        self.producer = await self._start_producer()
        try:
            while await pending_count(self.sessions):
                await self.publish_pending()
        finally:
            await finish_within(self.producer.stop(), 10.0)
            self.producer = None

    async def _start_producer(self) -> AIOKafkaProducer:
        producer = kafka.producer(self.settings)
        try:
            await producer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        self.broker_ok = True
        return producer

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _hold_lease(self) -> bool:
        now = utcnow()
        if self._lease_renew_at is not None and now < self._lease_renew_at:
            return True  # held, and far from expiry: no write transaction just to say so
        self._lease_renew_at = None
        held = await self._take_or_renew_lease(now)
        if held:
            self._lease_renew_at = now + timedelta(seconds=self.lease_seconds / 3)
        return held

    async def _take_or_renew_lease(self, now: datetime) -> bool:
        async with self.sessions() as session, session.begin():
            result = await session.exec(  # type: ignore[call-overload]
                update(RelayLease)
                .where(RelayLease.name == self.LEASE)  # type: ignore[arg-type]
                .where((RelayLease.holder == self.holder) | (RelayLease.expires_at < now))  # type: ignore[arg-type,operator]
                .values(holder=self.holder, expires_at=now + timedelta(seconds=self.lease_seconds))
            )
            if result.rowcount == 1:
                return True
            existing = await session.get(RelayLease, self.LEASE)
            if existing is None:
                session.add(
                    RelayLease(
                        name=self.LEASE, holder=self.holder, expires_at=now + timedelta(seconds=self.lease_seconds)
                    )
                )
                return True
            return False

    async def publish_pending(self) -> int:
        """Publish pending rows in id order; return how many were published.

        Up to ``RELAY_PIPELINE`` batches are in flight at once: the next batch is read and
        handed to the producer while the broker acknowledges the previous one, and each
        batch is marked sent once all of its records are acknowledged. The producer keeps
        one request in flight per partition, so per-key order is the outbox order. A
        failure leaves the unacknowledged rows pending: they are published again (at least
        once) and consumers drop the copies by ce_id. One call publishes a bounded number
        of batches, so the caller renews its lease between calls."""
        assert self.producer is not None
        in_flight: deque[tuple[list[int], asyncio.Future[list[object]]]] = deque()
        after = 0
        published = 0
        batches = 0
        try:
            while True:
                rows = await self._pending_rows(after) if batches < RELAY_BATCHES_PER_CALL else []
                if rows:
                    deliveries = [
                        await self.producer.send(topic, value=value, key=key, headers=unpack_headers(headers))
                        for _, topic, key, value, headers in rows
                    ]
                    ids = [row_id for row_id, *_ in rows]
                    in_flight.append((ids, asyncio.gather(*deliveries)))
                    after = ids[-1]
                    batches += 1
                if not in_flight:
                    break
                if rows and len(in_flight) < RELAY_PIPELINE:
                    continue
                ids, acknowledged = in_flight.popleft()
                await acknowledged
                self.broker_ok = True
                await self._mark_sent(ids)
                published += len(ids)
        finally:
            for _, acknowledged in in_flight:
                acknowledged.add_done_callback(_retrieve_outcome)
        if published == 0:
            await self._maybe_purge()
            metrics.OUTBOX_BACKLOG.labels(self.settings.service_name).set(0)
        elif batches == RELAY_BATCHES_PER_CALL:
            await self._refresh_backlog()
        else:
            metrics.OUTBOX_BACKLOG.labels(self.settings.service_name).set(0)
        return published

    async def _pending_rows(self, after: int) -> list[tuple[int, str, bytes, bytes, bytes]]:
        async with self.reads() as session:
            connection = await session.connection()
            rows = (
                await connection.execute(
                    select_columns(
                        col(OutboxRow.id),
                        col(OutboxRow.topic),
                        col(OutboxRow.key),
                        col(OutboxRow.value),
                        col(OutboxRow.headers),
                    )
                    .where(col(OutboxRow.sent_at).is_(None), col(OutboxRow.id) > after)
                    .order_by(col(OutboxRow.id))
                    .limit(self.settings.outbox_batch_size)
                )
            ).all()
        return [
            (row_id, topic, key, value, headers) for row_id, topic, key, value, headers in rows if row_id is not None
        ]

    async def _mark_sent(self, ids: list[int]) -> None:
        now = utcnow()
        async with self.sessions() as session, session.begin():
            for chunk in _chunks(ids, 500):
                await session.exec(  # type: ignore[call-overload]
                    update(OutboxRow).where(OutboxRow.id.in_(chunk)).values(sent_at=now)  # type: ignore[union-attr]
                )
        metrics.OUTBOX_PUBLISHED.labels(self.settings.service_name).inc(len(ids))

    async def _refresh_backlog(self) -> None:
        async with self.sessions() as session:
            pending = (
                await session.exec(select(func.count()).select_from(OutboxRow).where(OutboxRow.sent_at.is_(None)))  # type: ignore[union-attr]
            ).one()
        metrics.OUTBOX_BACKLOG.labels(self.settings.service_name).set(pending)

    async def _maybe_purge(self) -> None:
        """Delete rows published longer ago than the retention; they only served the relay."""
        now = utcnow()
        if now - self._last_purge < timedelta(seconds=60):
            return
        self._last_purge = now
        cutoff = now - timedelta(seconds=self.settings.outbox_retention_seconds)
        async with self.sessions() as session, session.begin():
            await session.exec(delete(OutboxRow).where(col(OutboxRow.sent_at) < cutoff))


async def pending_count(sessions: SessionFactory) -> int:
    async with sessions() as session:
        return int(
            (await session.exec(select(func.count()).select_from(OutboxRow).where(OutboxRow.sent_at.is_(None)))).one()  # type: ignore[union-attr]
        )


def _retrieve_outcome(future: asyncio.Future[list[object]]) -> None:
    """Batches abandoned after a failure: their outcome no longer matters, the rows are pending."""
    if not future.cancelled():
        future.exception()


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Backoff:
    """Exponential backoff with full jitter, capped."""

    def __init__(self, base: float = 0.2, cap: float = 5.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0
