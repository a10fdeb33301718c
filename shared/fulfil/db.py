"""Async database engine and sessions: SQLite (WAL) by default, PostgreSQL in production.

The SQLModel session is the unit of work: a use case opens one, changes state, adds
outbox rows, and commits once.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import registry
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

SessionFactory = async_sessionmaker[AsyncSession]

SQLITE_BUSY_TIMEOUT_MS = 30_000


class PlatformTable(SQLModel, registry=registry()):
    """Base of the platform's own tables (outbox, inbox, leases) in every service database."""


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_engine(url: str, *, pool_size: int = 10, for_reads: bool = False) -> AsyncEngine:
    """An engine tuned for the backend: SQLite in WAL mode with a busy timeout and
    ``BEGIN IMMEDIATE`` (so writers queue instead of failing to upgrade a read lock);
    PostgreSQL with a pool and pre-ping so a restarted database is survived.

    ``for_reads`` (SQLite only): plain deferred ``BEGIN`` and ``query_only``, so readers
    see the last committed state at once instead of queueing behind busy writers."""
    if not is_sqlite(url):
        return create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
    if for_reads and (not database or database == ":memory:"):
        raise ValueError("a separate read engine needs a SQLite file, not :memory:")

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, own transactions, so SAVEPOINT and BEGIN IMMEDIATE work.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        if for_reads:
            cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    begin = "BEGIN" if for_reads else "BEGIN IMMEDIATE"

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql(begin)

    return engine


def read_engine(url: str, writer: AsyncEngine) -> AsyncEngine:
    """The engine for read-only work: on SQLite a deferred-BEGIN engine on the same file;
    on PostgreSQL the writer engine itself (MVCC readers never wait for writers)."""
    return create_engine(url, for_reads=True) if is_sqlite(url) else writer


def session_factory(engine: AsyncEngine, **info: Any) -> SessionFactory:
    """Sessions that keep loaded objects usable after commit; ``info`` is copied to every session."""
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False, info=info)


async def create_tables(engine: AsyncEngine, metadatas: Iterable[MetaData]) -> None:
    """Create the platform's tables and the service's own (idempotent)."""
    async with engine.begin() as connection:
        for metadata in (PlatformTable.metadata, *metadatas):
            await connection.run_sync(metadata.create_all)


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
