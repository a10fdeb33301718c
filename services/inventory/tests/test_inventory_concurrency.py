"""Two inventory processes consume different partitions of one stream against one database
(SQLite file, PostgreSQL): many orders for a few SKUs, cancellations, and restocks posted
to both processes mid-stream. Afterwards no stock row is over-reserved and every unit is
accounted for."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fulfil import db
from fulfil.broker import free_port
from fulfil.consumer import AppliedEvent
from fulfil.testing import create_topics, eventually
from inventory.config import Settings
from inventory.models import InventoryTable
from inventory_builders import inventory_settings, publish
from inventory_ledger import RECEIPTS, check_ledger, seed_stock, tiers_of, workload
from sqlalchemy import func
from sqlmodel import select

pytestmark = pytest.mark.slow


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
        await seed_stock(sessions)

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

    try:
        await check_ledger(sessions, asked, cancelled, tiers_of(events))
    finally:
        await engine.dispose()


async def _ready(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/readyz")).status_code == 200
    except httpx.HTTPError:
        return False
