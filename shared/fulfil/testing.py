"""pytest plugin: a real Tansu broker per test session, SQLite per test, PostgreSQL when
one answers, and helpers to run a service app with its lifespan.

Loaded from the repository's root conftest (``pytest_plugins = ["fulfil.testing"]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from fastapi import FastAPI
from fulfil import kafka
from fulfil.broker import EmbeddedBroker, free_port
from fulfil.codec import Envelope, KafkaRecord, decode, encode
from fulfil.events import OrderEvent
from fulfil.settings import Environment, ServiceSettings

POSTGRES_ADMIN_URL = os.environ.get("DATABASE_URL_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A real Tansu broker on a free loopback port, for the whole test session."""
    broker = EmbeddedBroker("127.0.0.1", free_port())
    broker.start()
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def topic_name() -> str:
    return unique_name("order-events")


def settings_for(
    bootstrap: str, database_url: str, *, topic: str, service_name: str = "test", **overrides: Any
) -> ServiceSettings:
    """Settings pointing at the test broker with a private topic, DLQ and consumer group.

    The group is private to the topic too: Tansu keeps a group's members across topics, so
    a group shared by tests of one session would make each join wait on the last test's."""
    return ServiceSettings(
        service_name=service_name,
        consumer_group=overrides.pop("consumer_group", f"{service_name}-{topic}"),
        environment=Environment.TEST,
        kafka_bootstrap_servers=bootstrap,
        kafka_topic=topic,
        kafka_dlq_topic=f"{topic}.dlq",
        database_url=database_url,
        **{"outbox_poll_seconds": 0.05, "log_json": False, "kafka_session_timeout_ms": 3000, **overrides},
    )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/service.db"


async def postgres_unreachable_reason() -> str | None:
    """None when PostgreSQL answers at ``POSTGRES_ADMIN_URL``; otherwise why not."""
    import asyncpg

    try:
        connection = await asyncpg.connect(_plain_dsn(POSTGRES_ADMIN_URL), timeout=3)
        await connection.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _plain_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


@pytest.fixture(scope="session")
def postgres_available() -> None:
    reason = asyncio.run(postgres_unreachable_reason())
    if reason is not None:
        pytest.skip(f"PostgreSQL does not answer at {POSTGRES_ADMIN_URL} ({reason}); set DATABASE_URL_POSTGRES")


@pytest.fixture
def postgres_url(postgres_available: None) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    import asyncpg

    name = "fulfil_test_" + uuid.uuid4().hex[:12]

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(_plain_dsn(POSTGRES_ADMIN_URL))
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes this runs on SQLite and on PostgreSQL (skipped when absent)."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("postgres_url"))


@contextlib.asynccontextmanager
async def running_app(app: FastAPI, *, base_url: str = "http://test") -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan (database, consumer, relay) and give an HTTP client to it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            yield client


async def read_topic(bootstrap: str, topic: str, *, expect: int, timeout: float = 30.0) -> list[Envelope]:
    """Read a topic from the beginning until ``expect`` records arrived (no consumer group)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    envelopes: list[Envelope] = []
    try:
        await consumer.topics()
        partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        await consumer.seek_to_beginning()
        deadline = asyncio.get_running_loop().time() + timeout
        while len(envelopes) < expect and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                envelopes.extend(decode(r.key, r.value, r.headers) for r in records)
    finally:
        await consumer.stop()
    return envelopes


async def create_topics(settings: ServiceSettings, partitions: int = kafka.ORDER_EVENT_PARTITIONS) -> None:
    await kafka.ensure_topics(settings, partitions=partitions)


async def eventually(predicate: Any, *, timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Await ``predicate()`` (sync or async) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def as_consumed(
    record: KafkaRecord, offset: int, *, partition: int = 0, topic: str = "order-events"
) -> ConsumerRecord[bytes, bytes]:
    """An encoded record as a consumer would receive it, for feeding ``EventConsumer.apply``."""
    return ConsumerRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=record.key,
        value=record.value,
        checksum=None,
        serialized_key_size=len(record.key),
        serialized_value_size=len(record.value),
        headers=tuple(record.headers),
    )


def consumed_records(events: list[OrderEvent], *, source: str = "/test") -> list[ConsumerRecord[bytes, bytes]]:
    """These events, encoded, at offsets 0, 1, 2... of one partition."""
    return [as_consumed(encode(event, source=source)[1], offset) for offset, event in enumerate(events)]
