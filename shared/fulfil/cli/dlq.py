"""``fulfil dlq``: inspect dead-lettered records and put them back once the cause is fixed.

Redrive stages the records in its own small outbox and lets the outbox relay publish
them, so even this operator tool does not publish to Kafka by any other path. A cursor
(consumer group ``fulfil-dlq-redrive`` on the DLQ topic) makes each record redriven once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from fulfil import db, kafka
from fulfil.codec import KafkaRecord, header_map
from fulfil.outbox import OutboxRelay, OutboxRow, add_record
from fulfil.settings import ServiceSettings
from rich.console import Console
from rich.table import Table
from sqlmodel import select

app = typer.Typer(help="Dead-lettered records: list and redrive.", no_args_is_help=True)

REDRIVE_GROUP = "fulfil-dlq-redrive"


@dataclass(frozen=True)
class DeadLetter:
    partition: int
    offset: int
    record: ConsumerRecord[bytes, bytes]
    redriven: bool

    def header(self, name: str) -> str:
        raw = header_map(self.record.headers).get(name)
        return raw.decode(errors="replace") if raw is not None else ""


async def read_dead_letters(settings: ServiceSettings) -> list[DeadLetter]:
    """Every record on the DLQ topic, marked redriven or not."""
    consumer = kafka.consumer(settings, group_id=REDRIVE_GROUP)
    await consumer.start()
    try:
        await consumer.topics()  # refreshes metadata
        partitions = consumer.partitions_for_topic(settings.kafka_dlq_topic) or set()
        tps = [TopicPartition(settings.kafka_dlq_topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        consumer.assign(tps)
        cursor = {tp: (await consumer.committed(tp)) or 0 for tp in tps}
        end = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        letters: list[DeadLetter] = []
        remaining = {tp for tp in tps if end[tp] > 0}
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=1000)
            if not batches:
                break
            for tp, records in batches.items():
                for record in records:
                    letters.append(DeadLetter(tp.partition, record.offset, record, record.offset < cursor[tp]))
                if records and records[-1].offset + 1 >= end[tp]:
                    remaining.discard(tp)
        return letters
    finally:
        await consumer.stop()


async def _commit_cursor(settings: ServiceSettings, offsets: dict[TopicPartition, int]) -> None:
    consumer = AIOKafkaConsumer(**kafka.connection_options(settings), group_id=REDRIVE_GROUP, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


def _settings(bootstrap: str | None) -> ServiceSettings:
    overrides = {"service_name": "dlq-redrive"}
    if bootstrap:
        overrides["kafka_bootstrap_servers"] = bootstrap
    return ServiceSettings(**overrides)  # type: ignore[arg-type]


BootstrapOption = Annotated[str | None, typer.Option(help="broker; defaults to KAFKA_BOOTSTRAP_SERVERS")]


@app.command("list")
def list_dead_letters(
    bootstrap: BootstrapOption = None, all_: Annotated[bool, typer.Option("--all", help="include redriven")] = False
) -> None:
    """Show dead-lettered records with the group that gave up and the error."""
    letters = asyncio.run(read_dead_letters(_settings(bootstrap)))
    table = Table(title=f"dead letters ({sum(not letter.redriven for letter in letters)} waiting)")
    for column in ("partition/offset", "group", "type", "order", "attempts", "error", "failed at", "state"):
        # An operator needs the whole error, not "ValueE…": it wraps; the short columns do not.
        table.add_column(column, overflow="fold" if column == "error" else "ellipsis", no_wrap=column != "error")
    for letter in letters:
        if letter.redriven and not all_:
            continue
        table.add_row(
            f"{letter.partition}/{letter.offset}",
            letter.header("dlq_group"),
            letter.header("ce_type") or "?",
            letter.header("ce_subject") or (letter.record.key or b"").decode(errors="replace"),
            letter.header("dlq_attempts"),
            letter.header("dlq_error"),
            letter.header("dlq_failed_at"),
            "redriven" if letter.redriven else "waiting",
        )
    Console().print(table)  # made here, so it measures the terminal the command runs in


async def redrive_dead_letters(settings: ServiceSettings, data_dir: Path) -> int:
    """Put every waiting dead letter back on the topic it came from; return how many."""
    letters = [letter for letter in await read_dead_letters(settings) if not letter.redriven]
    if not letters:
        return 0
    engine = db.create_engine(f"sqlite+aiosqlite:///{data_dir}/dlq-redrive.db")
    try:
        await db.create_tables(engine, [])
        sessions = db.session_factory(engine)
        async with sessions() as session, session.begin():
            staged = set(
                (await session.exec(select(OutboxRow.event_id).where(OutboxRow.topic != ""))).all()  # type: ignore[call-overload]
            )
            for letter in letters:
                event_id = f"redrive:{settings.kafka_dlq_topic}:{letter.partition}:{letter.offset}"
                if event_id in staged:
                    continue
                headers = [(name, value) for name, value in letter.record.headers if not name.startswith("dlq_")]
                original_topic = letter.header("dlq_topic") or settings.kafka_topic
                add_record(
                    session,
                    event_id=event_id,
                    topic=original_topic,
                    record=KafkaRecord(letter.record.key or b"", letter.record.value or b"", headers),
                )
        await OutboxRelay(settings, sessions).drain()
    finally:
        await engine.dispose()
    cursor: dict[TopicPartition, int] = {}
    for letter in letters:
        tp = TopicPartition(settings.kafka_dlq_topic, letter.partition)
        cursor[tp] = max(cursor.get(tp, 0), letter.offset + 1)
    await _commit_cursor(settings, cursor)
    return len(letters)


@app.command("redrive")
def redrive(
    bootstrap: BootstrapOption = None,
    data_dir: Annotated[Path, typer.Option(help="where the redrive outbox lives")] = Path(".fulfil"),
) -> None:
    """Put waiting dead letters back on their topic (consumers skip what they already applied)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    count = asyncio.run(redrive_dead_letters(_settings(bootstrap), data_dir))
    Console().print(f"redriven {count} record(s)")
