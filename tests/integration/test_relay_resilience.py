"""The relay rides out a broker outage, and a relay that died holding the lease is
replaced once the lease expires."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from fulfil import db
from fulfil.broker import EmbeddedBroker, free_port
from fulfil.outbox import OutboxRelay, add_events, pending_count
from fulfil.testing import create_topics, eventually, read_topic, settings_for

from tests.support.orders import order_received


class NetworkCut:
    """A TCP proxy in front of the broker that can drop every connection and refuse new ones."""

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def restore(self) -> None:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", self.listen_port)

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await self.server.wait_closed()

    async def _pipe(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers |= {client_writer, broker_writer}

        async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.transport.abort()

        await asyncio.gather(copy(client_reader, broker_writer), copy(broker_reader, client_writer))
        self.writers -= {client_writer, broker_writer}


async def test_rows_written_while_the_broker_is_unreachable_are_published_when_it_returns(tmp_path: Path) -> None:
    proxy_port = free_port()
    broker = EmbeddedBroker("127.0.0.1", free_port(), advertised_port=proxy_port)
    broker.start()
    network = NetworkCut(proxy_port, broker.port)
    await network.restore()
    bootstrap = f"127.0.0.1:{proxy_port}"
    settings = settings_for(bootstrap, f"sqlite+aiosqlite:///{tmp_path}/r.db", topic="order-events")
    await create_topics(settings)
    engine = db.create_engine(settings.database)
    await db.create_tables(engine, [])
    sessions = db.session_factory(engine)
    relay = OutboxRelay(settings, sessions)
    task = asyncio.create_task(relay.run())
    try:
        await eventually(lambda: relay.producer is not None)
        await network.cut()
        async with sessions() as session, session.begin():
            add_events(session, [order_received(f"o-{i}") for i in range(50)], source="/t", topic="order-events")
        await asyncio.sleep(3)  # the relay keeps failing and backing off meanwhile
        assert await pending_count(sessions) == 50
        assert not task.done()

        await network.restore()

        async def drained() -> bool:
            return await pending_count(sessions) == 0

        await eventually(drained, timeout=60)
        published = await read_topic(bootstrap, "order-events", expect=50)
        assert {record.subject for record in published} == {f"o-{i}" for i in range(50)}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await engine.dispose()
        await network.cut()
        broker.stop()


async def test_a_standby_relay_takes_over_the_lease_of_one_that_died(
    kafka_bootstrap: str, tmp_path: Path, topic_name: str
) -> None:
    settings = settings_for(kafka_bootstrap, f"sqlite+aiosqlite:///{tmp_path}/l.db", topic=topic_name)
    await create_topics(settings)
    engine = db.create_engine(settings.database)
    await db.create_tables(engine, [])
    sessions = db.session_factory(engine)
    holder = OutboxRelay(settings, sessions, lease_seconds=2)
    standby = OutboxRelay(settings, sessions, lease_seconds=2)
    try:
        assert await holder._hold_lease()
        assert not await standby._hold_lease()  # one publisher per database
        # The holder dies without releasing anything; its rows stay pending.
        async with sessions() as session, session.begin():
            add_events(session, [order_received(f"o-{i}") for i in range(10)], source="/t", topic=topic_name)
        task = asyncio.create_task(standby.run())

        async def drained() -> bool:
            return await pending_count(sessions) == 0

        await eventually(drained, timeout=30)
        assert len(await read_topic(kafka_bootstrap, topic_name, expect=10)) == 10
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        await engine.dispose()
