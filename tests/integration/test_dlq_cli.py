"""The operator's `fulfil dlq list` and `fulfil dlq redrive`, run as commands against a real
broker: what a dead letter says, and that a redrive puts it back on its topic once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fulfil import db
from fulfil.cli import app
from fulfil.codec import KafkaRecord, encode
from fulfil.outbox import OutboxRelay, add_record
from fulfil.settings import ServiceSettings
from fulfil.testing import create_topics, read_topic, settings_for
from typer.testing import CliRunner

from tests.support.orders import order_received


async def dead_letter_one(settings: ServiceSettings, order_id: str) -> None:
    """A record as a consumer group gives up on it: its headers plus the dlq_* ones, staged and relayed."""
    _, record = encode(order_received(order_id), source="/t")
    headers = [
        *record.headers,
        ("dlq_group", b"inventory"),
        ("dlq_error", b"ValueError: no warehouse serves it"),
        ("dlq_attempts", b"5"),
        ("dlq_topic", settings.kafka_topic.encode()),
        ("dlq_failed_at", b"2026-03-02T09:00:00+00:00"),
    ]
    engine = db.create_engine(settings.database)
    try:
        await db.create_tables(engine, [])
        sessions = db.session_factory(engine)
        async with sessions() as session, session.begin():
            add_record(
                session,
                event_id=f"dlq:{order_id}",
                topic=settings.kafka_dlq_topic,
                record=KafkaRecord(record.key, record.value, headers),
            )
        await OutboxRelay(settings, sessions).drain()
    finally:
        await engine.dispose()


def test_list_shows_why_and_redrive_puts_the_record_back_once(
    kafka_bootstrap: str, sqlite_url: str, topic_name: str, tmp_path: Path
) -> None:
    settings = settings_for(kafka_bootstrap, sqlite_url, topic=topic_name, service_name="dlq-cli")
    asyncio.run(create_topics(settings))
    asyncio.run(dead_letter_one(settings, "o-stuck"))
    runner = CliRunner()
    env = {"KAFKA_TOPIC": settings.kafka_topic, "KAFKA_DLQ_TOPIC": settings.kafka_dlq_topic, "COLUMNS": "250"}
    cli = ["dlq", "list", "--bootstrap", kafka_bootstrap]

    listed = runner.invoke(app, cli, env=env)
    assert listed.exit_code == 0, listed.output
    assert "1 waiting" in listed.output
    row = next(line for line in listed.output.splitlines() if "o-stuck" in line)
    for shown in ("inventory", "order.received", "5", "ValueError: no warehouse serves it", "waiting"):
        assert shown in row, row

    redrive = ["dlq", "redrive", "--bootstrap", kafka_bootstrap, "--data-dir", str(tmp_path / "redrive")]
    redriven = runner.invoke(app, redrive, env=env)
    assert redriven.exit_code == 0, redriven.output
    assert "redriven 1 record(s)" in redriven.output
    (back,) = asyncio.run(read_topic(kafka_bootstrap, settings.kafka_topic, expect=1, timeout=15))
    assert (back.data.order_id, back.type) == ("o-stuck", "order.received")

    # Once: a second redrive has nothing waiting, and the list keeps the record only with --all.
    again = runner.invoke(app, redrive, env=env)
    assert "redriven 0 record(s)" in again.output
    assert "0 waiting" in runner.invoke(app, cli, env=env).output
    assert "o-stuck" not in runner.invoke(app, cli, env=env).output
    everything = runner.invoke(app, [*cli, "--all"], env=env).output
    assert "redriven" in next(line for line in everything.splitlines() if "o-stuck" in line)
