"""Fixtures of the end-to-end tests: the database each service of the stack runs on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.stack import SERVICE_NAMES, postgres_databases


@pytest.fixture(params=["sqlite", "postgresql"])
def stack_databases(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """DATABASE_URL per service: none (each its SQLite file, as `make run`), or a fresh
    PostgreSQL database per service, dropped afterwards; that variant skips, saying why,
    when PostgreSQL does not answer (``fulfil.testing.postgres_available``)."""
    if request.param == "sqlite":
        yield {}
        return
    request.getfixturevalue("postgres_available")
    with postgres_databases(SERVICE_NAMES) as urls:
        yield urls
