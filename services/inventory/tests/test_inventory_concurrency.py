"""Two inventory processes consume different partitions of one stream against one database
(SQLite file, PostgreSQL): many orders for a few SKUs, cancellations, and restocks posted
to both processes mid-stream. Afterwards no stock row is over-reserved and every unit is
accounted for."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fulfil import db
from fulfil.broker import free_port
from fulfil.consumer import AppliedEvent
from fulfil.events import CustomerTier, OrderCancelled, OrderEvent, OrderReceived
from fulfil.outbox import OutboxRow
from fulfil.testing import create_topics, eventually
from inventory import service
from inventory.config import Settings
from inventory.models import Backorder, InventoryTable, Reservation, StockIn, WarehouseIn
from inventory_builders import T0, inventory_settings, line, order, publish
from sqlalchemy import func
from sqlmodel import col, select

pytestmark = pytest.mark.slow

SKUS = ["A", "B", "C"]
WAREHOUSES = {"W1": 1, "W2": 2}
SEEDED = 30
ORDERS = 180
RECEIPTS = [("W1", "A", 7), ("W2", "B", 9), ("W1", "C", 5), ("W2", "A", 6)]


def workload(seed: int) -> tuple[list[OrderEvent], dict[str, dict[int, int]], set[str]]:
    rng = random.Random(seed)
    events: list[OrderEvent] = []
    asked: dict[str, dict[int, int]] = {}
    cancelled: set[str] = set()
    for i in range(ORDERS):
        order_id = f"o{i:04d}"
        lines = [
            line(n, sku, rng.randint(1, 4), *([rng.choice(SKUS)] if rng.random() < 0.3 else []))
            for n, sku in enumerate(rng.sample(SKUS, rng.randint(1, 2)), start=1)
        ]
        received: OrderReceived = order(
            order_id,
            *lines,
            tier=CustomerTier.CORE if rng.random() < 0.25 else CustomerTier.STANDARD,
            allow_partial=rng.random() < 0.6,
            minutes=i,
        )
        events.append(received)
        asked[order_id] = {ln.line_no: ln.qty for ln in lines}
        if rng.random() < 0.2:
            cancelled.add(order_id)
            events.append(OrderCancelled(order_id=order_id, occurred_at=received.occurred_at, reason="test"))
    return events, asked, cancelled


def start_process(settings: Settings, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SERVICE_NAME": "inventory",
        "ENVIRONMENT": "test",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DATABASE_URL": settings.database,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "KAFKA_TOPIC": settings.kafka_topic,
        "KAFKA_DLQ_TOPIC": settings.kafka_dlq_topic,
        "KAFKA_SESSION_TIMEOUT_MS": "3000",
        "CONSUMER_GROUP": settings.group_id,
        "CONSUMER_BATCH_SIZE": "20",
        "OUTBOX_POLL_SECONDS": "0.05",
        "LOG_JSON": "false",
        "LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "uvicorn", "inventory.main:create_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    with log_path.open("wb") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


async def applied_by(client: httpx.AsyncClient) -> int:
    text = (await client.get("/metrics")).text
    return sum(int(float(v)) for v in re.findall(r"^fulfil_events_applied_total\{[^}]*\} (\S+)$", text, re.M))


async def test_two_processes_never_over_allocate(
    kafka_bootstrap: str, database_url: str, topic_name: str, tmp_path: Path
) -> None:
    # A group of its own: members of an earlier test's group may still be timing out on the broker.
    settings = inventory_settings(kafka_bootstrap, database_url, topic_name).model_copy(
        update={"consumer_group": f"inventory-{topic_name}"}
    )
    await create_topics(settings)
    engine = db.create_engine(settings.database)
    sessions = db.session_factory(engine)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        await db.create_tables(engine, [InventoryTable.metadata])
        for warehouse_id, priority in WAREHOUSES.items():
            async with sessions() as session, session.begin():
                body = WarehouseIn(name=warehouse_id, country="FR", handling_hours=24, priority=priority)
                await service.put_warehouse(session, warehouse_id, body)
            for sku in SKUS:
                async with sessions() as session, session.begin():
                    count = StockIn(on_hand=SEEDED, protected_for_core=5)
                    await service.set_stock(session, warehouse_id, sku, count, at=T0)

        ports = [free_port(), free_port()]
        clients = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) for port in ports]
        for index, port in enumerate(ports):
            processes.append(start_process(settings, port, tmp_path / f"inventory-{index}.log"))
            await eventually(lambda c=clients[index]: _ready(c), timeout=60)  # type: ignore[misc]
        # Let the group settle with both members before the stream starts.
        await asyncio.sleep(2)

        events, asked, cancelled = workload(seed=11)
        half = len(events) // 2
        await publish(settings, events[:half])
        for i, (warehouse_id, sku, qty) in enumerate(RECEIPTS):
            body = {"receipt_id": f"r{i}", "warehouse_id": warehouse_id, "lines": [{"sku": sku, "qty": qty}]}
            response = await clients[i % 2].post("/v1/receipts", json=body)
            assert response.status_code == 201, response.text
        await publish(settings, events[half:])

        async def all_applied() -> bool:
            async with sessions() as session:
                query = (
                    select(func.count())
                    .select_from(AppliedEvent)
                    .where(AppliedEvent.consumer_group == settings.group_id)
                )
                return (await session.exec(query)).one() == len(events)

        await eventually(all_applied, timeout=90, interval=0.25)
        per_process = [await applied_by(client) for client in clients]
        assert all(count > 0 for count in per_process), f"one process did all the work: {per_process}"
        for client in clients:
            await client.aclose()
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()

    tiers = {e.order_id: e.customer.tier for e in events if isinstance(e, OrderReceived)}
    try:
        await _check_ledger(sessions, asked, cancelled, tiers)
    finally:
        await engine.dispose()


async def _ready(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/readyz")).status_code == 200
    except httpx.HTTPError:
        return False


async def _check_ledger(
    sessions: db.SessionFactory,
    asked: dict[str, dict[int, int]],
    cancelled: set[str],
    tiers: dict[str, CustomerTier],
) -> None:
    received = Counter[tuple[str, str]]({(w, s): SEEDED for w in WAREHOUSES for s in SKUS})
    for warehouse_id, sku, qty in RECEIPTS:
        received[(warehouse_id, sku)] += qty
    async with sessions() as session:
        stock = await service.load_stock(session)
        reservations = (await session.exec(select(Reservation))).all()
        backorders = (await session.exec(select(Backorder))).all()
        dead = (
            await session.exec(select(func.count()).select_from(OutboxRow).where(col(OutboxRow.topic).like("%.dlq")))
        ).one()
    assert dead == 0
    reserved_by_key = Counter[tuple[str, str]]()
    core_by_key = Counter[tuple[str, str]]()
    held_by_line = Counter[tuple[str, int]]()
    for r in reservations:
        reserved_by_key[(r.warehouse_id, r.sku)] += r.qty
        if tiers[r.order_id] is CustomerTier.CORE:
            core_by_key[(r.warehouse_id, r.sku)] += r.qty
        held_by_line[(r.order_id, r.line_no)] += r.qty
    waiting_by_line = Counter({(b.order_id, b.line_no): b.qty for b in backorders})
    assert {level.key for level in stock} == set(received)
    for level in stock:
        assert level.on_hand == received[level.key]
        assert 0 <= level.reserved <= level.on_hand, level
        assert level.reserved == reserved_by_key[level.key], level
        assert level.reserved_for_core == core_by_key[level.key], level
    for order_id, lines in asked.items():
        for line_no, qty in lines.items():
            held, waiting = held_by_line[(order_id, line_no)], waiting_by_line[(order_id, line_no)]
            if order_id in cancelled:
                assert (held, waiting) == (0, 0), order_id
            else:
                assert held + waiting == qty, (order_id, line_no, held, waiting, qty)
    # The stream asks for far more than there is: the contention was real.
    assert sum(waiting_by_line.values()) > 0
    assert sum(level.reserved for level in stock) > 0
