"""Inventory allocation through the real consumer loop against raw aiokafka on the same topic.

python -m tests.bench bench_inventory        (BENCH_ORDERS, BENCH_SKUS, BENCH_DATABASES to change)

A stream of order.received events over 500 SKUs and 3 warehouses goes through
fulfil.consumer.EventConsumer with the inventory HANDLERS on a real database (SQLite
file, then PostgreSQL when it answers). Stock is seeded from the stream's own demand so
that most orders allocate and some backorder (a few SKUs are stocked short). In the
same run, raw aiokafka reads the same topic: the ratio is the price of parsing,
idempotency, allocation and the outbox.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaProducer
from fulfil import db
from fulfil.broker import EmbeddedBroker, free_port
from fulfil.codec import Envelope, encode
from fulfil.consumer import EventConsumer, Handler, Handlers
from fulfil.events import Address, Customer, CustomerTier, OrderedLine, OrderReceived
from fulfil.testing import create_topics, settings_for
from inventory import service
from inventory.config import Settings
from inventory.handlers import HANDLERS
from inventory.models import Backorder, InventoryTable, Reservation, StockRow, WarehouseIn
from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tests.bench.bench_foundation import backends, fresh_database, raw_consume

ORDERS = int(os.environ.get("BENCH_ORDERS", "20000"))
SKUS = int(os.environ.get("BENCH_SKUS", "500"))
WAREHOUSES = {"PAR": 1, "LYS": 2, "MRS": 3}
SHORT_SKU_SHARE = 0.15
"""Share of SKUs stocked at 60% of their demand: their late orders backorder."""
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def sku_name(index: int) -> str:
    return f"SKU-{index:04d}"


def order_stream(seed: int = 7) -> list[OrderReceived]:
    """Orders of 1 to 3 lines, popular SKUs more often; some core customers, some
    ship-complete orders, some lines with a consented substitute."""
    rng = random.Random(seed)
    skus = [sku_name(i) for i in range(SKUS)]
    weights = [1 / (rank + 20) for rank in range(SKUS)]
    ship_to = Address(name="A. Buyer", line1="1 Road", city="Lyon", postal_code="69001", country="FR")
    orders = []
    for i in range(ORDERS):
        chosen: list[str] = []
        while len(chosen) < rng.randint(1, 3):
            sku = rng.choices(skus, weights)[0]
            if sku not in chosen:
                chosen.append(sku)
        lines = tuple(
            OrderedLine(
                line_no=n,
                sku=sku,
                qty=rng.randint(1, 3),
                substitutes=(rng.choice(skus),) if rng.random() < 0.15 else (),
            )
            for n, sku in enumerate(chosen, start=1)
        )
        at = T0 + timedelta(seconds=i)
        tier = CustomerTier.CORE if rng.random() < 0.1 else CustomerTier.STANDARD
        orders.append(
            OrderReceived(
                order_id=f"b-{i:06d}",
                occurred_at=at,
                client="bench",
                external_ref=f"ext-{i}",
                customer=Customer(id=f"c-{i % 997}", tier=tier),
                lines=lines,
                ship_to=ship_to,
                placed_at=at,
                allow_partial=rng.random() < 0.7,
            )
        )
    return orders


def seeded_stock(orders: list[OrderReceived], seed: int = 11) -> list[StockRow]:
    """Each SKU's demand in stock (115%), spread unevenly over the warehouses; a few SKUs short."""
    rng = random.Random(seed)
    demand = Counter[str]()
    for order in orders:
        for line in order.lines:
            demand[line.sku] += line.qty
    rows = []
    for index in range(SKUS):
        sku = sku_name(index)
        factor = 0.6 if rng.random() < SHORT_SKU_SHARE else 1.15
        total = math.ceil(demand[sku] * factor)
        shares = [rng.random() + 0.1 for _ in WAREHOUSES]
        for warehouse_id, share in zip(WAREHOUSES, shares, strict=True):
            on_hand = int(total * share / sum(shares))
            rows.append(StockRow(warehouse_id=warehouse_id, sku=sku, on_hand=on_hand, protected_for_core=on_hand // 20))
    return rows


async def produce(bootstrap: str, topic: str, orders: list[OrderReceived]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2, max_batch_size=1_048_576)
    await producer.start()
    try:
        records = [encode(order, source="/bench")[1] for order in orders]
        deliveries = [await producer.send(topic, value=r.value, key=r.key, headers=r.headers) for r in records]
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()


async def seed(sessions: db.SessionFactory, stock: list[StockRow]) -> None:
    for warehouse_id, priority in WAREHOUSES.items():
        async with sessions() as session:
            body = WarehouseIn(name=warehouse_id, country="FR", handling_hours=24, priority=priority)
            await service.put_warehouse(session, warehouse_id, body)
    async with sessions() as session, session.begin():
        session.add_all(StockRow.model_validate(row.model_dump()) for row in stock)


def timed(handlers: Handlers, first_call: list[float]) -> Handlers:
    """The real handlers, noting when the first one ran (the clock starts there)."""

    def wrap(handler: Handler) -> Handler:
        async def run(event: object, session: AsyncSession, envelope: Envelope) -> object:
            if not first_call:
                first_call.append(time.perf_counter())
            return await handler(event, session, envelope)

        return run  # type: ignore[return-value]

    return {event_type: wrap(handler) for event_type, handler in handlers.items()}


async def allocation_loop(bootstrap: str, topic: str, database_url: str, stock: list[StockRow]) -> tuple[float, str]:
    base = settings_for(bootstrap, database_url, topic=topic, service_name="inventory")
    settings = Settings(**base.model_dump()).model_copy(update={"consumer_group": f"inventory-{uuid.uuid4().hex}"})
    engine = db.create_engine(settings.database)
    try:
        await db.create_tables(engine, [InventoryTable.metadata])
        sessions = db.session_factory(engine)
        await seed(sessions, stock)
        first_call: list[float] = []
        consumer = EventConsumer(settings, sessions, timed(HANDLERS, first_call))
        task = asyncio.create_task(consumer.run())
        try:
            while consumer.stats.applied < ORDERS:
                if task.done():
                    task.result()
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - first_call[0]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert consumer.stats.dead_lettered == 0, "allocation failed for some orders"
        return ORDERS / elapsed, await outcome(sessions)
    finally:
        await engine.dispose()


async def outcome(sessions: db.SessionFactory) -> str:
    """What the stream did to stock: orders with a waiting line, units held, no over-allocation."""
    async with sessions() as session:
        waiting_orders = (await session.exec(select(func.count(func.distinct(col(Backorder.order_id)))))).one()
        held = (await session.exec(select(func.coalesce(func.sum(col(Reservation.qty)), 0)))).one()
        levels = await service.load_stock(session)
    assert all(0 <= level.reserved <= level.on_hand for level in levels)
    assert held == sum(level.reserved for level in levels)
    return f"{ORDERS - waiting_orders:,} orders fully covered, {waiting_orders:,} with backordered lines"


async def run() -> None:
    orders = order_stream()
    stock = seeded_stock(orders)
    broker = EmbeddedBroker("127.0.0.1", free_port())
    broker.start()
    try:
        topic = f"bench-inventory-{uuid.uuid4().hex[:8]}"
        await create_topics(settings_for(broker.bootstrap_servers, "sqlite://", topic=topic))
        await produce(broker.bootstrap_servers, topic, orders)
        with tempfile.TemporaryDirectory() as directory:
            for kind in await backends():
                raw = await raw_consume(broker.bootstrap_servers, topic, ORDERS)
                database = await fresh_database(kind, directory)
                rate, summary = await allocation_loop(broker.bootstrap_servers, topic, database, stock)
                print(f"{kind}: {ORDERS:,} order.received over {SKUS} SKUs and {len(WAREHOUSES)} warehouses")
                print(f"  raw consume        {raw:>10,.0f} events/s")
                print(f"  allocation loop    {rate:>10,.0f} events/s   ({summary})")
                print(f"  allocation / raw consume = {rate / raw:.1%}")
    finally:
        broker.stop()
