"""Use cases: fold events into per-order facts and cohort aggregates, settle old orders,
and build KPI reports from the aggregates.

Writing happens in two steps, each in its own transaction:

1. ``apply_events`` (with the consumer's batch): one read of the batch's orders, the
   events merged into their facts, each changed order scored once, its row written
   with its new contribution, and the batch's changes (new - old contribution, bucket
   by bucket) journalled as one ``kpi_pending_changes`` row.
2. ``fold_pending`` (twice a second, from the consumer's commit hook or, without
   traffic, a background loop): many journal rows added into the aggregate rows at
   once, so a bucket that every batch touches is written once per fold, not per batch.

Reports read only aggregate rows: a few dozen per window, whatever the number of orders.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from fulfil.events import OrderEvent
from sqlalchemy import ColumnElement, Table, and_, delete, func, or_, select, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import Session
from sqlmodel.ext.asyncio.session import AsyncSession

from kpi import cohorts, domain
from kpi.cohorts import Level, Window
from kpi.domain import PARTS, Aggregate, Contribution, Counters, Dimension, Distribution, Kpi, OrderFacts, Stage
from kpi.models import (
    CriterionOutcome,
    CycleTimeGroup,
    CycleTimeReport,
    HistogramBucket,
    KpiGroup,
    KpiReport,
    KpiSummary,
    KpiTable,
    KpiValue,
    OpenOrder,
    OpenOrders,
    OrderKpi,
    SeriesDistribution,
    StockoutSku,
)

Clock = Callable[[], datetime]

ORDERS: Table = KpiTable.metadata.tables["kpi_orders"]
AGGREGATES: Table = KpiTable.metadata.tables["kpi_aggregates"]
PENDING: Table = KpiTable.metadata.tables["kpi_pending_changes"]
SETTLED: Table = KpiTable.metadata.tables["kpi_settled_orders"]
TABLES = (ORDERS, AGGREGATES, PENDING, SETTLED)
ORDER_COLUMNS = ("received_at", "stage", "stage_since", "facts", "contribution")

AGGREGATE_WRITERS_LOCK = 0x6B7069
"""PostgreSQL advisory lock held by whoever writes aggregate rows (fold, compaction,
rebuild): one writer at a time across replicas, so no update is lost."""

CHUNK = 500
COHORT = (
    "orders whose order.received event time is at or after `since` (the window's start on its "
    "bucket grid: the minute for 1h, the hour for 24h, the 6-hour block for 7d); each order's "
    "later events (allocation, shipment, delivery) count with it; customer-cancelled orders "
    "count only in the fill rates, the backorder rate and the stockouts"
)


def utc_now() -> datetime:
    return datetime.now(UTC)


def epoch_seconds(moment: datetime) -> int:
    return math.floor(moment.timestamp())


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands datetimes back naive; every stored time is UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


Item = TypeVar("Item")


def _chunks(items: Sequence[Item], size: int = CHUNK) -> Iterator[Sequence[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _is_postgresql(connection: Connection | AsyncConnection) -> bool:
    return connection.dialect.name == "postgresql"


def _insert(connection: Connection | AsyncConnection, table: Table) -> Any:
    return (postgresql_insert if _is_postgresql(connection) else sqlite_insert)(table)


# -- applying events ----------------------------------------------------------------


def apply_events(session: Session, events: Sequence[OrderEvent], *, now: datetime, settle_after: int) -> int:
    """Merge a batch of events into their orders (idempotent, order-independent) and
    journal how the aggregates change. Returns how many orders changed.

    Synchronous on purpose: the consumer runs it from its transaction's ``before_commit``
    hook, async callers through ``AsyncSession.run_sync``. Events of settled orders are
    ignored: their KPIs are final."""
    by_order: dict[str, list[OrderEvent]] = {}
    for event in events:
        by_order.setdefault(event.order_id, []).append(event)
    order_ids = sorted(by_order)
    connection = session.connection()
    settled: set[str] = set()
    stored: dict[str, tuple[str, str]] = {}
    for chunk in _chunks(order_ids):
        settled.update(connection.execute(select(SETTLED.c.order_id).where(SETTLED.c.order_id.in_(chunk))).scalars())
        query = select(ORDERS.c.order_id, ORDERS.c.facts, ORDERS.c.contribution).where(ORDERS.c.order_id.in_(chunk))
        for order_id, facts_json, contribution_json in connection.execute(query):
            stored[order_id] = (facts_json, contribution_json)
    at = epoch_seconds(now)
    changes: cohorts.Deltas = {}
    rows: list[dict[str, Any]] = []
    for order_id in order_ids:
        if order_id in settled:
            continue
        before = stored.get(order_id)
        facts = OrderFacts.model_validate_json(before[0]) if before else OrderFacts(order_id=order_id)
        for event in by_order[order_id]:
            domain.apply(facts, event)
        facts_json = facts.model_dump_json()
        if before is not None and facts_json == before[0]:
            continue  # redelivered or re-emitted: nothing new
        scored = domain.score(facts)
        contribution = Contribution.of(scored)
        old = Contribution.from_json(json.loads(before[1])) if before else None
        cohorts.add_change(changes, old, contribution, at, settle_after)
        rows.append(
            {
                "order_id": order_id,
                "received_at": scored.received_at,
                "stage": str(scored.stage),
                "stage_since": scored.stage_since,
                "facts": facts_json,
                "contribution": json.dumps(contribution.to_json(), separators=(",", ":")),
            }
        )
    if rows:
        upsert = _insert(connection, ORDERS)
        upsert = upsert.on_conflict_do_update(
            index_elements=[ORDERS.c.order_id],
            set_={name: upsert.excluded[name] for name in ORDER_COLUMNS},
        )
        connection.execute(upsert, rows)
    journal = [
        [level, start, dimension, group, part, counters]
        for (level, start, dimension, group), parts in cohorts.pruned(changes).items()
        for part, counters in parts.items()
    ]
    if journal:
        connection.execute(PENDING.insert().values(changes=json.dumps(journal, separators=(",", ":"))))
    return len(rows)


async def apply_events_async(
    session: AsyncSession, events: Sequence[OrderEvent], *, now: datetime, settle_after: int
) -> int:
    return await session.run_sync(lambda sync: apply_events(sync, events, now=now, settle_after=settle_after))


async def count_orders(session: AsyncSession) -> int:
    connection = await session.connection()
    return int((await connection.execute(select(func.count()).select_from(ORDERS))).scalar_one())


async def reset(session: AsyncSession) -> None:
    """Forget every order, aggregate and settled id (before a replay)."""
    connection = await session.connection()
    for table in TABLES:
        await connection.execute(delete(table))


# -- folding the journal into the aggregates --------------------------------------------

AggregateKey = tuple[str, int, str, str, str]
"""(level, start, dimension, group, part) of one aggregate row."""


def lock_aggregates(connection: Connection) -> None:
    if _is_postgresql(connection):
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": AGGREGATE_WRITERS_LOCK})


def fold_pending(session: Session, *, limit: int = 1000) -> int:
    """Add up to ``limit`` journal rows into the aggregate rows and drop them; returns how
    many. Synchronous like ``apply_events``: the consumer folds from its commit hook too."""
    connection = session.connection()
    lock_aggregates(connection)
    query = select(PENDING.c.id, PENDING.c.changes).order_by(PENDING.c.id).limit(limit)
    rows = connection.execute(query).all()
    if not rows:
        return 0
    total: dict[AggregateKey, Counters] = {}
    for _, changes in rows:
        for level, start, dimension, group, part, counters in json.loads(changes):
            domain.add_counters(total.setdefault((level, start, dimension, group, part), {}), counters)
    _add_to_aggregates(connection, total)
    connection.execute(delete(PENDING).where(PENDING.c.id.in_([row[0] for row in rows])))
    return len(rows)


async def fold_pending_async(session: AsyncSession, *, limit: int = 1000) -> int:
    return await session.run_sync(lambda sync: fold_pending(sync, limit=limit))


def aggregate_key(level: str, start: int, dimension: str, group: str, part: str) -> str:
    # The group goes last: it is free text, the other four cannot contain "|".
    return f"{level}|{dimension}|{part}|{start}|{group}"


def _add_to_aggregates(connection: Connection, additions: dict[AggregateKey, Counters]) -> None:
    keys = {aggregate_key(*key): key for key in sorted(additions)}
    existing: dict[str, Counters] = {}
    for chunk in _chunks(list(keys), CHUNK):
        query = select(AGGREGATES.c.key, AGGREGATES.c.counters).where(AGGREGATES.c.key.in_(chunk))
        for key, counters in connection.execute(query):
            existing[key] = json.loads(counters)
    upserts: list[dict[str, Any]] = []
    emptied: list[str] = []
    for key, (level, start, dimension, group, part) in keys.items():
        counters = existing.get(key, {})
        domain.add_counters(counters, additions[(level, start, dimension, group, part)])
        if counters:
            upserts.append(
                {
                    "key": key,
                    "level": level,
                    "start": start,
                    "dimension": dimension,
                    "group": group,
                    "part": part,
                    "counters": json.dumps(counters, separators=(",", ":")),
                }
            )
        elif key in existing:
            emptied.append(key)
    if upserts:
        upsert = _insert(connection, AGGREGATES)
        upsert = upsert.on_conflict_do_update(
            index_elements=[AGGREGATES.c.key], set_={"counters": upsert.excluded.counters}
        )
        connection.execute(upsert, upserts)
    for chunk in _chunks(emptied, CHUNK):
        connection.execute(delete(AGGREGATES).where(AGGREGATES.c.key.in_(chunk)))


def compact(session: Session, now: datetime, *, settle_after: int) -> int:
    """Fold ``6h`` buckets older than the settle window into ``all`` and drop fine buckets
    no window reads any more; returns how many rows went."""
    connection = session.connection()
    lock_aggregates(connection)
    at = epoch_seconds(now)
    old_quarters = (
        AGGREGATES.c.level == str(Level.QUARTER),
        AGGREGATES.c.start < cohorts.settled_before(at, settle_after),
    )
    old = connection.execute(
        select(AGGREGATES.c.dimension, AGGREGATES.c.group, AGGREGATES.c.part, AGGREGATES.c.counters).where(
            *old_quarters
        )
    ).all()
    removed = 0
    if old:
        folded: dict[AggregateKey, Counters] = {}
        for dimension, group, part, counters in old:
            key = (str(Level.SETTLED), 0, dimension, group, part)
            domain.add_counters(folded.setdefault(key, {}), json.loads(counters))
        _add_to_aggregates(connection, folded)
        removed += connection.execute(delete(AGGREGATES).where(*old_quarters)).rowcount or 0
    for level in (Level.HOUR, Level.MINUTE):
        fine = delete(AGGREGATES).where(
            AGGREGATES.c.level == str(level), AGGREGATES.c.start < cohorts.kept_since(level, at)
        )
        removed += connection.execute(fine).rowcount or 0
    return removed


async def compact_async(session: AsyncSession, now: datetime, *, settle_after: int) -> int:
    return await session.run_sync(lambda sync: compact(sync, now, settle_after=settle_after))


async def pending_count(session: AsyncSession) -> int:
    connection = await session.connection()
    return int((await connection.execute(select(func.count()).select_from(PENDING))).scalar_one())


# -- settling: bounded state ----------------------------------------------------------


async def settle(
    session: AsyncSession, now: datetime, *, settle_after: timedelta, retention: timedelta, limit: int = 5000
) -> int:
    """Drop the rows of delivered and cancelled orders received (or, never received,
    cancelled) before ``now - settle_after`` and remember their ids, so that their late
    events are ignored; their contributions stay in the aggregates. Also forget settled
    ids older than ``retention`` and orphan rows (events of orders never received).
    Returns how many orders were settled."""
    connection = await session.connection()
    now = now.astimezone(UTC)
    cutoff = now - settle_after
    closed = [str(Stage.DELIVERED), str(Stage.CANCELLED)]
    never_received = and_(
        ORDERS.c.stage == str(Stage.CANCELLED), ORDERS.c.received_at.is_(None), ORDERS.c.stage_since < cutoff
    )
    query = (
        select(ORDERS.c.order_id)
        .where(or_(and_(ORDERS.c.stage.in_(closed), ORDERS.c.received_at < cutoff), never_received))
        .limit(limit)
    )
    if _is_postgresql(connection):
        query = query.with_for_update(skip_locked=True)
    ids = list((await connection.execute(query)).scalars())
    if ids:
        remember = _insert(connection, SETTLED).on_conflict_do_nothing(index_elements=[SETTLED.c.order_id])
        await connection.execute(remember, [{"order_id": order_id, "settled_at": now} for order_id in ids])
        await connection.execute(delete(ORDERS).where(ORDERS.c.order_id.in_(ids)))
    await connection.execute(delete(SETTLED).where(SETTLED.c.settled_at < now - retention))
    await connection.execute(
        delete(ORDERS).where(ORDERS.c.stage == str(Stage.UNRECEIVED), ORDERS.c.stage_since < cutoff)
    )
    return len(ids)


async def settled_at(session: AsyncSession, order_id: str) -> datetime | None:
    connection = await session.connection()
    found = (await connection.execute(select(SETTLED.c.settled_at).where(SETTLED.c.order_id == order_id))).first()
    return _aware(found[0]) if found else None


# -- reading ------------------------------------------------------------------------


async def load_totals(
    session: AsyncSession, window: Window, now: datetime, dimension: Dimension | None, parts: Sequence[str] = PARTS
) -> dict[str, Aggregate]:
    """The window's aggregate per group of ``dimension`` (one group "" when None)."""
    connection = await session.connection()
    query = select(AGGREGATES.c.group, AGGREGATES.c.part, AGGREGATES.c.counters).where(
        AGGREGATES.c.dimension == (str(dimension) if dimension else ""), AGGREGATES.c.part.in_(parts)
    )
    start = cohorts.window_start(window, epoch_seconds(now))
    if start is None:
        query = query.where(AGGREGATES.c.level.in_([str(Level.QUARTER), str(Level.SETTLED)]))
    else:
        query = query.where(AGGREGATES.c.level == str(cohorts.LEVEL_OF[window]), AGGREGATES.c.start >= start)
    totals: dict[str, Aggregate] = {}
    for group, part, counters in await connection.execute(query):
        totals.setdefault(group, Aggregate()).add({part: json.loads(counters)})
    return dict(sorted(totals.items()))


async def load_overall(session: AsyncSession, window: Window, now: datetime, parts: Sequence[str] = PARTS) -> Aggregate:
    return (await load_totals(session, window, now, None, parts)).get("", Aggregate())


def window_since(window: Window, now: datetime) -> datetime | None:
    start = cohorts.window_start(window, epoch_seconds(now))
    return datetime.fromtimestamp(start, UTC) if start is not None else None


def summary_of(total: Aggregate) -> KpiSummary:
    tallies = total.tallies
    kpis = [
        KpiValue(kpi=kpi, numerator=tallies[kpi][0], denominator=tallies[kpi][1], value=total.rate(kpi)) for kpi in Kpi
    ]
    return KpiSummary(
        orders_received=total.orders_received,
        orders_cancelled=total.orders_cancelled,
        orders_delivered=total.orders_delivered,
        orders_open=total.orders_open,
        kpis=kpis,
        perfect_order_failures={str(c): n for c, n in total.failures.items()},
        open_by_stage={str(s): n for s, n in total.open_by_stage.items()},
        top_stockout_skus=[
            StockoutSku(sku=sku, backordered_lines=out, ordered_lines=ordered, frequency=out / ordered)
            for sku, out, ordered in total.top_stockouts()
        ],
    )


SUMMARY_PARTS = (domain.COUNTS, domain.STOCKOUTS)
SERIES_PARTS = tuple(p for p in PARTS if p not in SUMMARY_PARTS)


async def kpi_report(session: AsyncSession, window: Window, by: Dimension | None, now: datetime) -> KpiReport:
    overall = await load_overall(session, window, now, SUMMARY_PARTS)
    report = KpiReport(
        window=window, cohort=COHORT, since=window_since(window, now), as_of=now, overall=summary_of(overall)
    )
    if by is not None:
        report.by = by
        groups = await load_totals(session, window, now, by, SUMMARY_PARTS)
        report.groups = [KpiGroup(group=key, **summary_of(total).model_dump()) for key, total in groups.items()]
    return report


def distributions_of(total: Aggregate) -> list[SeriesDistribution]:
    return [_distribution(str(series), dist) for series, dist in total.durations.items()]


def _distribution(name: str, dist: Distribution) -> SeriesDistribution:
    bounds: list[float | None] = [*domain.HISTOGRAM_BOUNDS_SECONDS, None]
    return SeriesDistribution(
        series=name,
        count=dist.count,
        mean_seconds=dist.mean_seconds,
        std_seconds=dist.std_seconds,
        percentiles_seconds={f"p{round(q * 100)}": dist.percentile(q) for q in domain.PERCENTILES},
        buckets=[HistogramBucket(le=le, count=n) for le, n in zip(bounds, dist.buckets, strict=True)],
    )


async def cycle_time_report(
    session: AsyncSession, window: Window, by: Dimension | None, now: datetime
) -> CycleTimeReport:
    overall = await load_overall(session, window, now, SERIES_PARTS)
    report = CycleTimeReport(
        window=window,
        cohort=COHORT,
        since=window_since(window, now),
        as_of=now,
        relative_accuracy=domain.SKETCH_RELATIVE_ACCURACY,
        overall=distributions_of(overall),
    )
    if by is not None:
        report.by = by
        groups = await load_totals(session, window, now, by, SERIES_PARTS)
        report.groups = [CycleTimeGroup(group=key, series=distributions_of(total)) for key, total in groups.items()]
    return report


async def open_orders(
    session: AsyncSession,
    stages: Sequence[Stage],
    now: datetime,
    limit: int,
    *,
    received_since: datetime | None = None,
) -> OpenOrders:
    """The backlog in these stages, oldest first (by receipt, else by when the first event
    was seen); ``received_since`` keeps the orders of a window's cohort only."""
    connection = await session.connection()
    names = [str(stage) for stage in stages]
    where: list[ColumnElement[bool]] = [ORDERS.c.stage.in_(names)]
    if received_since is not None:
        where.append(ORDERS.c.received_at >= received_since)
    counts = dict.fromkeys(names, 0)
    query = select(ORDERS.c.stage, func.count()).where(*where).group_by(ORDERS.c.stage)
    for found_stage, count in await connection.execute(query):
        counts[found_stage] = int(count)
    age = func.coalesce(ORDERS.c.received_at, ORDERS.c.stage_since)
    query = (
        select(ORDERS.c.order_id, ORDERS.c.stage, ORDERS.c.stage_since, ORDERS.c.received_at)
        .where(*where)
        .order_by(age, ORDERS.c.order_id)
        .limit(limit)
    )
    orders = [_open_order(*row, now=now) for row in await connection.execute(query)]
    return OpenOrders(
        as_of=now,
        count=sum(counts.values()),
        count_by_stage=counts,
        oldest=orders[0] if orders else None,
        orders=orders,
    )


def _open_order(
    order_id: str, stage: str, stage_since: datetime | None, received_at: datetime | None, *, now: datetime
) -> OpenOrder:
    since = _aware(stage_since)
    received = _aware(received_at)
    return OpenOrder(
        order_id=order_id,
        stage=stage,
        stage_since=since,
        age_in_stage_seconds=(now - since).total_seconds() if since else None,
        received_at=received,
        age_seconds=(now - received).total_seconds() if received else None,
    )


async def load_facts(session: AsyncSession, order_id: str) -> OrderFacts | None:
    connection = await session.connection()
    found = (await connection.execute(select(ORDERS.c.facts).where(ORDERS.c.order_id == order_id))).first()
    return OrderFacts.model_validate_json(found[0]) if found else None


def order_kpi(facts: OrderFacts) -> OrderKpi:
    scored = domain.score(facts)
    return OrderKpi(
        order_id=scored.order_id,
        stage=scored.stage,
        stage_since=scored.stage_since,
        received_at=scored.received_at,
        cancelled=scored.cancelled,
        backordered=scored.backordered,
        perfect=scored.perfect,
        criteria={str(c): CriterionOutcome(passed=r.passed, reason=r.reason) for c, r in scored.criteria.items()},
        contributions=[
            KpiValue(kpi=kpi, numerator=n, denominator=d, value=n / d if d else None)
            for kpi, (n, d) in scored.tallies.items()
        ],
        durations_seconds={str(s): [v / 1_000_000 for v in values] for s, values in scored.durations.items()},
        groups={str(d): list(v) for d, v in scored.groups.items()},
        notes=scored.notes,
        stage_times={
            "placed": facts.received.placed_at if facts.received else None,
            "received": facts.received.received_at if facts.received else None,
            "first_allocated": facts.first_allocated_at(),
            "fully_allocated": facts.fully_allocated_at(),
            "backordered": facts.backordered_at(),
            "last_shipped": facts.last_shipped_at(),
            "last_delivered": facts.last_delivered_at(),
            "cancelled": facts.cancelled_at,
        },
    )
