"""Shipping test fixtures. Starting a service app costs about two seconds (consumer group
join and leave on the broker), so integration modules share one app per database backend
and isolate tests by order id and a per-test clock reset.

Also makes the helpers (shipping_support.py) importable."""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

sys.path.insert(0, str(Path(__file__).parent))

from shipping_support import T0, Harness, harness, postgres_database


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["sqlite", "postgresql"])
async def shipping_app(
    request: pytest.FixtureRequest, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Harness]:
    """One running shipping app per test module and backend (PostgreSQL skipped when absent)."""
    topic = f"order-events-{uuid.uuid4().hex[:10]}"
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('shipping')}/shipping.db"
        async with harness(kafka_bootstrap, url, topic) as h:
            yield h
        return
    async with postgres_database() as url:
        if url is None:
            pytest.skip("PostgreSQL does not answer")
        async with harness(kafka_bootstrap, url, topic) as h:
            yield h


@pytest.fixture
def h(shipping_app: Harness) -> Harness:
    shipping_app.clock.current = T0
    return shipping_app
