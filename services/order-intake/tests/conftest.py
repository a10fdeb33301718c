"""Fixtures of order-intake tests: the app running on a real database and broker, with a client key."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from fulfil.service import Runtime
from fulfil.testing import create_topics, running_app, unique_name
from order_intake import service
from order_intake.main import create_app

sys.path.insert(0, str(Path(__file__).parent))

from intake_support import FakeClock, Intake, intake_settings


@pytest.fixture
def intake_overrides() -> dict[str, Any]:
    return {}


async def start_intake(kafka_bootstrap: str, url: str, topic: str, overrides: dict[str, Any]) -> AsyncIterator[Intake]:
    settings = intake_settings(kafka_bootstrap, url, topic, **overrides)
    await create_topics(settings)
    clock = FakeClock()
    app = create_app(settings, clock=clock)
    async with running_app(app) as http:
        runtime: Runtime = app.state.runtime
        async with runtime.sessions() as session:
            _, key = await service.create_client(session, "erp-test", clock())
        yield Intake(http, app, key, clock, settings)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_intake(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Intake]:
    """One order-intake on SQLite for a test module; tests isolate themselves by client."""
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('intake')}/service.db"
    async for running in start_intake(kafka_bootstrap, url, unique_name("order-events"), {}):
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def intake(shared_intake: Intake) -> Intake:
    """The shared order-intake with a fresh client of its own."""
    key = await shared_intake.new_key(unique_name("erp"))
    return replace(shared_intake, key=key)


@pytest_asyncio.fixture(loop_scope="module")
async def own_intake(
    kafka_bootstrap: str, sqlite_url: str, topic_name: str, intake_overrides: dict[str, Any]
) -> AsyncIterator[Intake]:
    """order-intake on SQLite, started for one test (with its own settings)."""
    async for running in start_intake(kafka_bootstrap, sqlite_url, topic_name, intake_overrides):
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def intake_any_db(
    kafka_bootstrap: str, database_url: str, topic_name: str, intake_overrides: dict[str, Any]
) -> AsyncIterator[Intake]:
    """order-intake on SQLite and on PostgreSQL."""
    async for running in start_intake(kafka_bootstrap, database_url, topic_name, intake_overrides):
        yield running
