"""Kafka clients configured the way fulfil needs them.

aiokafka's defaults are wrong for us (acks=1, auto-commit, auto_offset_reset=latest);
every client is built here so that no service gets them by accident.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context
from fulfil.settings import ServiceSettings

log = logging.getLogger(__name__)

ORDER_EVENT_PARTITIONS = 6


def connection_options(settings: ServiceSettings) -> dict[str, Any]:
    """How to reach and authenticate to the brokers: plaintext (Tansu, a private network),
    TLS (``SSL``) and SASL (``SASL_PLAINTEXT``/``SASL_SSL``, e.g. managed Kafka)."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": protocol,
    }
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(cafile=settings.kafka_ssl_cafile)
    if protocol.startswith("SASL_"):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = (
            settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None
        )
    return options


def producer(settings: ServiceSettings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **connection_options(settings),
        client_id=f"{settings.service_name}-relay",
        acks="all",
        enable_idempotence=settings.kafka_idempotent_producer,
        linger_ms=2,
        max_batch_size=1_048_576,
        request_timeout_ms=15_000,
        retry_backoff_ms=200,
    )


def consumer(settings: ServiceSettings, *topics: str, group_id: str | None) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *topics,
        **connection_options(settings),
        client_id=f"{settings.service_name}-consumer",
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_interval_ms=300_000,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=max(300, settings.kafka_session_timeout_ms // 4),
        max_partition_fetch_bytes=4 * 1_048_576,
    )


async def ensure_topics(
    settings: ServiceSettings, *, partitions: int = ORDER_EVENT_PARTITIONS, timeout: float = 30.0
) -> None:
    """Create the event topic and its DLQ if they do not exist yet."""
    admin = AIOKafkaAdminClient(**connection_options(settings), request_timeout_ms=int(timeout * 1000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, num_partitions=partitions, replication_factor=settings.kafka_replication_factor)
            for name in (settings.kafka_topic, settings.kafka_dlq_topic)
            if name not in existing
        ]
        if wanted:
            try:
                await admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass
            log.info("created topics %s", [topic.name for topic in wanted])
    finally:
        await admin.close()


async def wait_for_broker(settings: ServiceSettings, *, timeout: float = 30.0) -> None:
    """Block until the broker answers a metadata request, or raise ``TimeoutError``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        admin = AIOKafkaAdminClient(**connection_options(settings), request_timeout_ms=3000)
        try:
            await admin.start()
            await admin.list_topics()
            return
        except (KafkaError, OSError) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"broker {settings.kafka_bootstrap_servers} not reachable: {exc}") from exc
            await asyncio.sleep(0.2)
        finally:
            await admin.close()
