"""The kpi service at scale: events applied per second through its real consumer loop
(against raw aiokafka consume and a no-op handler on the same topic, same run),
/v1/kpis latency and the service's memory with many orders applied.

python -m tests.bench bench_kpi

Environment (defaults in brackets):
  BENCH_KPI_ORDERS    orders in the synthetic stream [100000]; the issue's figure is 1000000
  BENCH_KPI_DAYS      event-time span over which the orders are received, ending now [30]
  BENCH_KPI_SKUS      catalogue size [2000]
  BENCH_KPI_NOOP      events the no-op consumer baseline reads (0: skip it) [100000]
  BENCH_KPI_DATABASE  sqlite or postgresql [sqlite]
  BENCH_KPI_TIMEOUT   give up waiting for the kpi service after this many seconds [3600]

The stream is what the other services would emit, in event-time order: receipts spread
evenly over the span, first-pass allocations (some partial, then backordered and
released later), split shipments, late dispatches with delay notices, deliveries days
later with some damage and short deliveries, cancellations. So one consumer batch
mixes fresh orders with orders received days earlier, as in production. The kpi
service runs as its own process (uvicorn, asyncio loop like the in-process baselines)
with the wall clock: orders received more than the settle window ago get settled while
it consumes.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer
from fulfil import db
from fulfil.broker import EmbeddedBroker, die_with_parent, free_port
from fulfil.codec import Envelope, encode
from fulfil.consumer import EventConsumer
from fulfil.events import (
    CATALOGUE,
    Address,
    AllocatedLine,
    Customer,
    CustomerTier,
    DelayStage,
    DeliveredLine,
    LineQuantity,
    OrderAllocated,
    OrderBackordered,
    OrderCancelled,
    OrderDelayed,
    OrderDelivered,
    OrderedLine,
    OrderEvent,
    OrderReceived,
    OrderShipped,
)
from fulfil.testing import create_topics, settings_for

from tests.bench.bench_foundation import fresh_database, raw_consume

ORDERS = int(os.environ.get("BENCH_KPI_ORDERS", "100000"))
DAYS = float(os.environ.get("BENCH_KPI_DAYS", "30"))
SKUS = int(os.environ.get("BENCH_KPI_SKUS", "2000"))
NOOP_EVENTS = int(os.environ.get("BENCH_KPI_NOOP", "100000"))
DATABASE = os.environ.get("BENCH_KPI_DATABASE", "sqlite")
TIMEOUT = float(os.environ.get("BENCH_KPI_TIMEOUT", "3600"))

WAREHOUSES = ("WH-1", "WH-2", "WH-3", "WH-4")
CARRIERS = ("DHL", "UPS", "PostNL")
CLIENTS = ("shop", "erp", "marketplace", "b2b")
HOUR = 3600.0
ADDRESS = Address(name="A", line1="1 Road", city="Town", postal_code="1000", country="NL")


# -- the synthetic stream -------------------------------------------------------------


def order_events(index: int, received: datetime, rng: random.Random) -> list[OrderEvent]:
    """One order's whole life (some of it may lie in the future: then it is still open)."""
    order_id = f"bench-{index:08d}"
    at = received

    def later(lo_hours: float, hi_hours: float) -> datetime:
        nonlocal at
        at = at + timedelta(hours=rng.uniform(lo_hours, hi_hours))
        return at

    skus = [f"SKU-{min(int(rng.paretovariate(1.2)), SKUS):05d}" for _ in range(rng.choice((1, 1, 1, 2, 2, 3)))]
    lines = [
        OrderedLine(line_no=n, sku=sku, qty=rng.randint(1, 5), substitutes=(f"{sku}-ALT",) if n == 3 else ())
        for n, sku in enumerate(dict.fromkeys(skus), start=1)
    ]
    events: list[OrderEvent] = [
        OrderReceived(
            order_id=order_id,
            occurred_at=received,
            client=rng.choice(CLIENTS),
            external_ref=f"ext-{index}",
            customer=Customer(
                id=f"c-{index % 50_000}", tier=CustomerTier.CORE if rng.random() < 0.2 else CustomerTier.STANDARD
            ),
            lines=tuple(lines),
            ship_to=ADDRESS,
            placed_at=received - timedelta(minutes=rng.uniform(0.5, 30)),
        )
    ]
    home = rng.choice(WAREHOUSES)
    short = lines[-1] if rng.random() < 0.08 else None
    first = [line for line in lines if line is not short]
    allocated_at = later(0.005, 0.1)
    if first:
        events.append(
            OrderAllocated(
                order_id=order_id,
                occurred_at=allocated_at,
                allocations=tuple(
                    AllocatedLine(line_no=line.line_no, sku=line.sku, qty=line.qty, warehouse_id=home) for line in first
                ),
                complete=short is None,
                first_pass=True,
            )
        )
    if short is not None:
        events.append(
            OrderBackordered(
                order_id=order_id,
                occurred_at=allocated_at,
                lines=(LineQuantity(line_no=short.line_no, sku=short.sku, qty=short.qty),),
                reason="insufficient stock",
            )
        )
    if rng.random() < 0.03:
        events.append(OrderCancelled(order_id=order_id, occurred_at=later(0.05, 2), reason="changed their mind"))
        return events
    other = rng.choice([w for w in WAREHOUSES if w != home])
    if short is not None:
        events.append(
            OrderAllocated(
                order_id=order_id,
                occurred_at=later(12, 72),
                allocations=(AllocatedLine(line_no=short.line_no, sku=short.sku, qty=short.qty, warehouse_id=other),),
                complete=True,
                first_pass=False,
            )
        )
    ship_by = at + timedelta(hours=24)
    split = len(lines) > 1 and rng.random() < 0.3
    groups = [(home, lines[:1]), (other, lines[1:])] if split else [(home, lines)]
    for number, (warehouse, shipped_lines) in enumerate(groups, start=1):
        shipment_id = f"{order_id}-S{number}"
        shipped_at = later(1, 30)
        promised = ship_by + timedelta(hours=72)
        if shipped_at > ship_by:
            events.append(
                OrderDelayed(
                    order_id=order_id,
                    occurred_at=ship_by,
                    shipment_id=shipment_id,
                    stage=DelayStage.DISPATCH,
                    reason="missed ship-by",
                )
            )
        events.append(
            OrderShipped(
                order_id=order_id,
                occurred_at=shipped_at,
                shipment_id=shipment_id,
                warehouse_id=warehouse,
                carrier=rng.choice(CARRIERS),
                tracking_number=f"trk-{shipment_id}",
                lines=tuple(LineQuantity(line_no=line.line_no, sku=line.sku, qty=line.qty) for line in shipped_lines),
                ship_by=ship_by,
                promised_delivery_at=promised,
            )
        )
        delivered_at = shipped_at + timedelta(hours=rng.uniform(12, 96))
        events.append(
            OrderDelivered(
                order_id=order_id,
                occurred_at=delivered_at,
                shipment_id=shipment_id,
                lines=tuple(
                    DeliveredLine(
                        line_no=line.line_no,
                        sku=line.sku,
                        qty_delivered=line.qty - (1 if rng.random() < 0.01 else 0),
                        qty_damaged=1 if rng.random() < 0.02 else 0,
                    )
                    for line in shipped_lines
                ),
                delivered_at=delivered_at,
            )
        )
    return events


def stream(orders: int, end: datetime) -> Iterator[OrderEvent]:
    """Every order's events that happened before ``end``, in event-time order."""
    rng = random.Random(20260105)
    start = end - timedelta(days=DAYS)
    step = (end - start) / orders
    pending: list[tuple[datetime, int, OrderEvent]] = []
    sequence = 0
    for index in range(orders):
        received = start + step * index
        while pending and pending[0][0] <= received:
            yield heapq.heappop(pending)[2]
        for event in order_events(index, received, rng):
            if event.occurred_at < end:
                heapq.heappush(pending, (event.occurred_at, sequence, event))
                sequence += 1
    while pending:
        yield heapq.heappop(pending)[2]


async def publish(bootstrap: str, topic: str, end: datetime) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=1_048_576)
    await producer.start()
    sent = 0
    try:
        deliveries: list[asyncio.Future[Any]] = []
        for event in stream(ORDERS, end):
            _, record = encode(event, source="/bench")
            deliveries.append(await producer.send(topic, value=record.value, key=record.key, headers=record.headers))
            sent += 1
            if len(deliveries) >= 20_000:
                await asyncio.gather(*deliveries)
                deliveries.clear()
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()
    return sent


# -- baselines ------------------------------------------------------------------------


async def noop_consumer_loop(bootstrap: str, topic: str, expect: int, database_url: str) -> float:
    """The platform's consumer loop with handlers that do nothing, for every event type."""
    settings = settings_for(bootstrap, database_url, topic=topic, consumer_group=f"noop-{uuid.uuid4().hex}")
    engine = db.create_engine(settings.database)
    await db.create_tables(engine, [])
    first: list[float] = []

    async def no_op(event: OrderEvent, session: object, envelope: Envelope) -> None:
        if not first:
            first.append(time.perf_counter())

    consumer = EventConsumer(settings, db.session_factory(engine), dict.fromkeys(CATALOGUE.values(), no_op))
    task = asyncio.create_task(consumer.run())
    while consumer.stats.applied < expect:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - first[0]
    applied = consumer.stats.applied
    # Cancelling mid-commit makes aiokafka log a harmless connection error: keep the report readable.
    for noisy in ("aiokafka", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await engine.dispose()
    return applied / elapsed


# -- the kpi service ------------------------------------------------------------------


@dataclass
class Sample:
    at: float
    applied: int
    rss_mb: float
    kpis_ms: float | None = None


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def applied_events(metrics: str) -> int:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("fulfil_events_applied_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


async def timed_get(client: httpx.AsyncClient, path: str, params: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    response = await client.get(path, params=params, timeout=600)
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000


def start_kpi(bootstrap: str, topic: str, database_url: str, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SERVICE_NAME": "kpi",
        "CONSUMER_GROUP": f"kpi-bench-{uuid.uuid4().hex[:8]}",
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPIC": topic,
        "KAFKA_DLQ_TOPIC": f"{topic}.dlq",
        "DATABASE_URL": database_url,
        "ENVIRONMENT": "test",
        "LOG_JSON": "false",
        "LOG_LEVEL": "WARNING",
        "KPI_SETTLE_INTERVAL_SECONDS": "5",
    }
    command = [sys.executable, "-m", "uvicorn", "kpi.main:create_app", "--factory", "--loop", "asyncio"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"]
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, preexec_fn=die_with_parent
        )


async def run_kpi(bootstrap: str, topic: str, events: int, database_url: str, log_path: Path) -> dict[str, Any]:
    port = free_port()
    process = start_kpi(bootstrap, topic, database_url, port, log_path)
    samples: list[Sample] = []
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"kpi exited, see {log_path}")
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("kpi did not start")
                await asyncio.sleep(0.1)
            idle_rss = rss_mb(process.pid)
            started = time.monotonic()
            first_at: float | None = None
            next_probe = 0.1
            while True:
                applied = applied_events((await client.get("/metrics", timeout=600)).text)
                now = time.monotonic()
                if applied and first_at is None:
                    first_at = now
                sample = Sample(now, applied, rss_mb(process.pid))
                if applied >= next_probe * events:
                    sample.kpis_ms = await timed_get(client, "/v1/kpis")
                    next_probe += 0.1
                samples.append(sample)
                if applied >= events:
                    break
                if now - started > TIMEOUT:
                    raise TimeoutError(f"only {applied} of {events} applied after {TIMEOUT}s")
                await asyncio.sleep(1.0)
            assert first_at is not None
            consume_seconds = samples[-1].at - first_at
            await asyncio.sleep(10)  # let the settle loop and the live refresh catch up
            latencies: dict[str, list[float]] = {}
            probes = [
                ("/v1/kpis", {"window": "all"}),
                ("/v1/kpis", {"window": "24h"}),
                ("/v1/kpis", {"window": "7d", "by": "warehouse"}),
                ("/v1/kpis/cycle-time", {"window": "all"}),
            ]
            for path, params in probes:
                name = path + "?" + "&".join(f"{k}={v}" for k, v in params.items())
                latencies[name] = [await timed_get(client, path, params) for _ in range(10)]
            open_orders = (await client.get("/v1/open-orders", params={"limit": 1})).json()
            overall = (await client.get("/v1/kpis")).json()["overall"]
            return {
                "rate": events / consume_seconds if consume_seconds > 0 else float("nan"),
                "consume_seconds": consume_seconds,
                "samples": samples,
                "latencies": latencies,
                "idle_rss": idle_rss,
                "rss": rss_mb(process.pid),
                "peak_rss": rss_mb(process.pid, "VmHWM"),
                "open_orders": open_orders["count"],
                "overall": overall,
            }
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def per_order_rows(database_url: str) -> dict[str, int]:
    """Rows of per-order state and of settled ids (the per-order table was kpi_order_facts
    before the aggregates redesign, kpi_orders after; count whichever exists)."""
    from sqlalchemy import inspect, text

    engine = db.create_engine(database_url)
    counts: dict[str, int] = {}
    try:
        async with engine.connect() as connection:
            tables = set(await connection.run_sync(lambda sync: inspect(sync).get_table_names()))
            for name, candidates in (
                ("orders", ("kpi_orders", "kpi_order_facts")),
                ("settled", ("kpi_settled_orders",)),
                ("aggregates", ("kpi_aggregates", "kpi_settled_aggregates")),
            ):
                table = next(t for t in candidates if t in tables)
                counts[name] = int((await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())
    finally:
        await engine.dispose()
    return counts


# -- report ---------------------------------------------------------------------------


def describe(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"median {statistics.median(ordered):8.1f} ms   p95 {p95:8.1f} ms"


async def run() -> None:
    broker = EmbeddedBroker("127.0.0.1", free_port())
    broker.start()
    try:
        with tempfile.TemporaryDirectory() as directory:
            await run_with(broker.bootstrap_servers, Path(directory))
    finally:
        broker.stop()


async def run_with(bootstrap: str, directory: Path) -> None:
    topic = f"bench-kpi-{uuid.uuid4().hex[:8]}"
    await create_topics(settings_for(bootstrap, "sqlite://", topic=topic))
    end = datetime.now(UTC)
    started = time.perf_counter()
    events = await publish(bootstrap, topic, end)
    print(
        f"{ORDERS:,} orders received over {DAYS:g} days, {events:,} events published in "
        f"{time.perf_counter() - started:.0f}s; database {DATABASE}, {SKUS} SKUs"
    )
    raw = await raw_consume(bootstrap, topic, events)
    noop = None
    if NOOP_EVENTS:
        noop = await noop_consumer_loop(
            bootstrap, topic, min(NOOP_EVENTS, events), await fresh_database(DATABASE, str(directory))
        )
    database_url = await fresh_database(DATABASE, str(directory))
    result = await run_kpi(bootstrap, topic, events, database_url, directory / "kpi.log")
    rows = await per_order_rows(database_url)
    rate = result["rate"]
    print(f"  raw aiokafka consume  {raw:>9,.0f} events/s")
    if noop is not None:
        print(f"  no-op consumer loop   {noop:>9,.0f} events/s   (first {min(NOOP_EVENTS, events):,} events)")
    print(f"  kpi consumer loop     {rate:>9,.0f} events/s   ({events:,} events in {result['consume_seconds']:.0f}s)")
    print(f"  kpi / raw consume     = {rate / raw:.1%}")
    if noop is not None:
        print(f"  kpi / no-op loop      = {rate / noop:.1%}")
    print("  while consuming (applied events: GET /v1/kpis latency, RSS):")
    for sample in result["samples"]:
        if sample.kpis_ms is not None:
            print(f"    {sample.applied:>10,}  {sample.kpis_ms:9.1f} ms  {sample.rss_mb:7.0f} MB")
    print("  after consuming:")
    for name, values in result["latencies"].items():
        print(f"    {name:<40} {describe(values)}")
    print(
        f"  RSS: idle {result['idle_rss']:.0f} MB, after {ORDERS:,} orders {result['rss']:.0f} MB "
        f"(peak {result['peak_rss']:.0f} MB)"
    )
    overall = result["overall"]
    print(
        f"  per-order rows {rows['orders']:,} (open orders {result['open_orders']:,}), "
        f"settled ids {rows['settled']:,}, aggregate rows {rows['aggregates']:,}; "
        f"KPIs over {overall['orders_received']:,} orders received, {overall['orders_delivered']:,} delivered"
    )
