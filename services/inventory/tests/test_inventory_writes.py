"""The write routes under concurrency and at their limits: first PUTs racing each other,
quantities beyond 32 bits, receipts dated in the future, a real PostgreSQL deadlock that
the route retries, and a database that keeps refusing (503 with Retry-After, never 500)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from fulfil.service import Runtime
from fulfil.testing import create_topics, running_app
from inventory import routes, service
from inventory.main import create_app
from inventory.models import MAX_UNITS_PER_STOCK_ROW
from inventory_builders import T0, inventory_settings, line, order
from sqlalchemy.exc import DBAPIError

NOW = T0 + timedelta(hours=1)
WAREHOUSE = {"name": "Paris", "country": "FR", "handling_hours": 24, "priority": 1}


@pytest.fixture
async def app(kafka_bootstrap: str, database_url: str, topic_name: str) -> FastAPI:
    settings = inventory_settings(kafka_bootstrap, database_url, topic_name)
    await create_topics(settings)
    return create_app(settings, clock=lambda: NOW)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(app) as client:
        yield client


async def test_first_puts_racing_each_other_all_succeed(client: httpx.AsyncClient) -> None:
    warehouses = await asyncio.gather(*(client.put("/v1/warehouses/PAR", json=WAREHOUSE) for _ in range(8)))
    assert [r.status_code for r in warehouses] == [200] * 8
    counts = await asyncio.gather(
        *(client.put("/v1/stock/PAR/A", json={"on_hand": 10 + i, "protected_for_core": 1}) for i in range(8))
    )
    assert [r.status_code for r in counts] == [200] * 8, [r.text for r in counts]
    inbound = await asyncio.gather(
        *(client.put("/v1/inbound/PAR/A", json={"qty": 5, "eta": "2026-03-09"}) for _ in range(8))
    )
    assert [r.status_code for r in inbound] == [200] * 8
    (row,) = (await client.get("/v1/stock", params={"sku": "A"})).json()
    assert row["on_hand"] in range(10, 18)


async def test_stock_beyond_32_bits_and_the_bound_of_a_stock_row(client: httpx.AsyncClient) -> None:
    assert (await client.put("/v1/warehouses/PAR", json=WAREHOUSE)).status_code == 200
    for i in range(3):
        receipt = {"receipt_id": f"r{i}", "warehouse_id": "PAR", "lines": [{"sku": "A", "qty": 1_000_000_000}]}
        created = await client.post("/v1/receipts", json=receipt)
        assert created.status_code == 201, created.text
    (row,) = (await client.get("/v1/stock", params={"sku": "A"})).json()
    assert row["on_hand"] == 3_000_000_000  # a 32-bit INTEGER would have overflowed on PostgreSQL
    # 1000 lines of 1e9 would take on_hand past the documented bound: refused, nothing changed.
    huge = {"receipt_id": "r-huge", "warehouse_id": "PAR", "lines": [{"sku": "A", "qty": 1_000_000_000}] * 1000}
    refused = await client.post("/v1/receipts", json=huge)
    assert refused.status_code == 409, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["limit"] == MAX_UNITS_PER_STOCK_ROW
    (row,) = (await client.get("/v1/stock", params={"sku": "A"})).json()
    assert row["on_hand"] == 3_000_000_000
    # A fresh row may receive up to the bound itself, in one receipt.
    at_bound = {**huge, "receipt_id": "r-bound", "lines": [{"sku": "B", "qty": 1_000_000_000}] * 1000}
    assert (await client.post("/v1/receipts", json=at_bound)).status_code == 201


async def test_a_receipt_dated_in_the_future_is_refused(client: httpx.AsyncClient) -> None:
    assert (await client.put("/v1/warehouses/PAR", json=WAREHOUSE)).status_code == 200
    receipt = {"receipt_id": "r1", "warehouse_id": "PAR", "lines": [{"sku": "A", "qty": 1}]}
    future = {**receipt, "received_at": (NOW + timedelta(hours=2)).isoformat()}
    refused = await client.post("/v1/receipts", json=future)
    assert (refused.status_code, refused.headers["content-type"]) == (422, "application/problem+json")
    # A few seconds ahead (the sender's clock runs fast) is taken as now.
    skewed = {**receipt, "received_at": (NOW + timedelta(seconds=30)).isoformat()}
    created = await client.post("/v1/receipts", json=skewed)
    assert created.status_code == 201
    assert created.json()["received_at"] == NOW.isoformat().replace("+00:00", "Z")


class _SerializationFailure(Exception):
    sqlstate = "40001"


async def test_a_database_that_keeps_aborting_the_write_gives_503_with_retry_after(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (await client.put("/v1/warehouses/PAR", json=WAREHOUSE)).status_code == 200
    attempts = []

    async def always_aborted(*args: object, **kwargs: object) -> object:
        attempts.append(1)
        raise DBAPIError("UPDATE stock ...", {}, _SerializationFailure("could not serialize access"))

    monkeypatch.setattr(service, "receive_stock", always_aborted)
    monkeypatch.setattr(service, "set_stock", always_aborted)
    receipt = {"receipt_id": "r1", "warehouse_id": "PAR", "lines": [{"sku": "A", "qty": 1}]}
    busy = await client.post("/v1/receipts", json=receipt)
    assert busy.status_code == 503
    assert busy.headers["content-type"] == "application/problem+json"
    assert busy.headers["retry-after"] == str(routes.RETRY_AFTER_SECONDS)
    assert len(attempts) == routes.WRITE_ATTEMPTS
    assert (await client.put("/v1/stock/PAR/A", json={"on_hand": 1})).status_code == 503


async def _wait_until_blocked(admin: asyncpg.Connection, database: str) -> None:
    for _ in range(200):
        waiting = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'", database
        )
        if waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the receipt never waited for the order row")


async def test_a_deadlock_between_a_receipt_and_a_cancellation_is_retried_not_a_500(
    kafka_bootstrap: str, postgres_url: str, topic_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = inventory_settings(kafka_bootstrap, postgres_url, topic_name)
    await create_topics(settings)
    app = create_app(settings, clock=lambda: NOW)
    database = postgres_url.rpartition("/")[2]
    attempts = []
    receive_stock = service.receive_stock

    async def counted(*args: Any, **kwargs: Any) -> service.Served:
        attempts.append(1)
        return await receive_stock(*args, **kwargs)

    monkeypatch.setattr(service, "receive_stock", counted)
    async with running_app(app) as client:
        assert (await client.put("/v1/warehouses/PAR", json=WAREHOUSE)).status_code == 200
        assert (await client.put("/v1/stock/PAR/A", json={"on_hand": 0})).status_code == 200
        runtime: Runtime = app.state.runtime
        async with runtime.sessions() as session, session.begin():
            await service.allocate_order(session, order("o1", line(1, "A", 2)), at=NOW)

        # Like a cancellation of o1: its order row first, then the stock row.
        dsn = postgres_url.replace("postgresql+asyncpg://", "postgresql://")
        canceller = await asyncpg.connect(dsn)
        admin = await asyncpg.connect(dsn)
        try:
            await canceller.execute("SET deadlock_timeout = '10s'")  # so the receipt is the one PostgreSQL aborts
            transaction = canceller.transaction()
            await transaction.start()
            await canceller.execute("SELECT 1 FROM orders WHERE order_id = 'o1' FOR UPDATE")
            receipt = {"receipt_id": "r1", "warehouse_id": "PAR", "lines": [{"sku": "A", "qty": 3}]}
            posted = asyncio.create_task(client.post("/v1/receipts", json=receipt))
            await _wait_until_blocked(admin, database)  # the receipt holds stock A and waits for o1
            # This waits for the receipt's stock row: a deadlock, which PostgreSQL breaks by aborting the receipt.
            await canceller.execute("UPDATE stock SET on_hand = on_hand WHERE warehouse_id = 'PAR' AND sku = 'A'")
            await transaction.commit()
            created = await posted
        finally:
            await canceller.close()
            await admin.close()
        assert created.status_code == 201, created.text
        assert created.json()["orders_served"] == ["o1"]
        assert len(attempts) == 2  # aborted once (40P01), then done
        (row,) = (await client.get("/v1/stock", params={"sku": "A"})).json()
        assert (row["on_hand"], row["reserved"]) == (3, 2)
