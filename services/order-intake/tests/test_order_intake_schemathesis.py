"""schemathesis against order-intake's live OpenAPI schema (the ASGI app in-process, lifespan
running): for every /v1 operation, no 5xx and every response conforms to the schema."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fulfil.testing import create_topics, unique_name
from hypothesis import HealthCheck, given, settings
from intake_support import intake_settings
from order_intake.cli import issue_dev_key
from order_intake.main import create_app
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")

AUTH: dict[str, str] = {}


@pytest.fixture(scope="module")
def intake_schema(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('schemathesis')}/order-intake.db"
    _, key = issue_dev_key(url, "schemathesis")
    AUTH["Authorization"] = f"Bearer {key}"
    intake = intake_settings(kafka_bootstrap, url, unique_name("order-events"))
    asyncio.run(create_topics(intake))
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(intake)).include(path_regex="^/v1/")
    try:
        yield schema
    finally:
        shutdown_lifespans()


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize(("mode", "examples"), [(GenerationMode.POSITIVE, 25), (GenerationMode.NEGATIVE, 15)])
def test_api_never_fails_and_matches_its_schema(intake_schema: Any, mode: GenerationMode, examples: int) -> None:
    operations = [result.ok() for result in intake_schema.get_all_operations()]
    assert len(operations) == 5
    statuses: dict[str, set[int]] = {}
    for operation in operations:

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case: Any) -> None:
            response = case.call_and_validate(headers=AUTH, checks=CHECKS)
            statuses.setdefault(case.operation.label, set()).add(response.status_code)

        call()
    if mode is GenerationMode.POSITIVE:
        # The key works and generated bodies get past validation: the tests reach the use cases.
        assert 201 in statuses["POST /v1/orders"], statuses
        assert 207 in statuses["POST /v1/orders/batch"], statuses
        assert 200 in statuses["GET /v1/orders"], statuses
