"""The demo order generator: bodies order-intake accepts, with the client's key."""

from __future__ import annotations

import json
import random
from datetime import UTC, date, datetime

import httpx
from fulfil.events import Address, OrderedLine, ServiceLevel
from shipping.cli import app
from shipping.orders import OrderGenerator, customers, make_order
from typer.testing import CliRunner

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def test_orders_are_well_formed_and_varied() -> None:
    rng = random.Random(7)
    pool = customers(rng)
    bodies = [make_order(rng, rng.choice(pool), NOW, n) for n in range(500)]
    for body in bodies:
        lines = [OrderedLine.model_validate(line) for line in body["lines"]]
        assert [line.line_no for line in lines] == list(range(1, len(lines) + 1))
        assert len({line.sku for line in lines}) == len(lines)
        assert all(line.sku not in line.substitutes for line in lines)
        Address.model_validate(body["ship_to"])
        ServiceLevel(body["service_level"])
        assert datetime.fromisoformat(body["placed_at"]) <= NOW
    assert len({body["external_ref"] for body in bodies}) == 500
    assert {body["customer"]["tier"] for body in bodies} == {"core", "standard"}
    assert {body["customer"]["locale"] for body in bodies} == {"zh-CN", "en"}
    assert {body["service_level"] for body in bodies} == {"standard", "express", "economy"}
    assert any(len(body["lines"]) >= 3 for body in bodies)
    assert any("requested_delivery_date" in body for body in bodies)
    assert any(line.get("substitutes") for body in bodies for line in body["lines"])


def test_under_time_compression_orders_are_placed_moments_before_they_are_sent() -> None:
    rng = random.Random(3)
    pool = customers(rng)
    bodies = [make_order(rng, rng.choice(pool), NOW, n, time_compression=1440) for n in range(200)]
    lags = [NOW - datetime.fromisoformat(body["placed_at"]) for body in bodies]
    assert max(lags).total_seconds() <= 120 / 1440
    # A requested date stays a calendar date; shipping compresses its distance.
    assert all(
        date.fromisoformat(b["requested_delivery_date"]) > NOW.date() for b in bodies if "requested_delivery_date" in b
    )


async def test_orders_are_posted_with_the_api_key_and_an_idempotency_key() -> None:
    seen: list[httpx.Request] = []

    def order_intake(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={"order_id": "o-1"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(order_intake), base_url="http://intake") as client:
        generator = OrderGenerator(client, api_key="key-123", rng=random.Random(1))
        for _ in range(3):
            assert (await generator.post_one(NOW)).status_code == 201
    assert [request.url.path for request in seen] == ["/v1/orders"] * 3
    assert all(request.headers["authorization"] == "Bearer key-123" for request in seen)
    assert len({request.headers["idempotency-key"] for request in seen}) == 3
    assert all(json.loads(request.content)["lines"] for request in seen)


def test_demo_command_documents_its_rates() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for option in (
        "--late-dispatch",
        "--transit-delay",
        "--damage",
        "--exception",
        "--partial-dispatch",
        "--time-compression",
        "--inventory-url",
        "--restock-hours",
    ):
        assert option in result.output
