"""order-intake's HTTP API on a real database (SQLite, and PostgreSQL where marked) and broker."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from fulfil.codec import Envelope
from fulfil.events import OrderEvent
from fulfil.outbox import add_events, pending_count
from fulfil.testing import eventually, read_topic
from intake_events import T0, allocated, full_life, shipped
from intake_support import Intake, order_body
from order_intake import service
from order_intake.handlers import HANDLERS
from order_intake.models import CancelAccepted, Order, OrderPage, ProblemDetails
from sqlmodel import func, select

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def count_orders(intake: Intake) -> int:
    """Orders of the test's own client."""
    async with intake.runtime.sessions() as session:
        client = await service.authenticate(session, intake.key)
        assert client is not None
        statement = select(func.count()).select_from(Order).where(Order.client_id == client.id)
        return (await session.exec(statement)).one()


async def test_a_missing_or_wrong_key_is_401_problem_json(intake: Intake) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        response = await intake.http.post("/v1/orders", json=order_body(), headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert (await intake.http.get("/v1/orders")).status_code == 401
    assert await count_orders(intake) == 0


async def test_an_accepted_order_is_stored_with_its_event_and_published(
    own_intake: Intake, kafka_bootstrap: str
) -> None:
    intake = own_intake
    response = await intake.http.post("/v1/orders", json=order_body(), headers=intake.auth())
    assert response.status_code == 201, response.text
    accepted = response.json()
    order_id = accepted["order_id"]
    assert accepted["status"] == "received"
    assert accepted["links"]["self"] == f"/v1/orders/{order_id}" == response.headers["location"]

    records = await read_topic(kafka_bootstrap, intake.settings.kafka_topic, expect=1)
    assert [(r.type, r.subject) for r in records] == [("order.received", order_id)]
    received = records[0].data
    assert received.client == "erp-test"  # the client's name
    assert received.placed_at == intake.clock()  # defaulted to acceptance time
    assert received.customer.contact.email == "a@example.cn"
    assert received.lines[0].substitutes == ("TEA-OOLONG-500G",)
    # Our own event comes back through the consumer and is skipped by its ce_id, which was
    # recorded as applied when the order was committed.
    consumer = intake.runtime.consumer
    assert consumer is not None
    await eventually(lambda: consumer.stats.duplicates >= 1)
    assert consumer.stats.applied == 0
    assert await pending_count(intake.runtime.sessions) == 0

    detail = (await intake.http.get(f"/v1/orders/{order_id}", headers=intake.auth())).json()
    assert detail["status"] == "received"
    assert [entry["type"] for entry in detail["timeline"]] == ["order.received"]
    assert detail["order"]["external_ref"] == "SO-1"

    # Another service's event, through the real broker and our consumer, lands in the timeline.
    allocation = allocated(order_id, 0, 1, 5, complete=True).model_copy(update={"occurred_at": intake.clock()})
    async with intake.runtime.sessions() as session, session.begin():
        add_events(session, [allocation], source="/fulfil/inventory", topic=intake.settings.kafka_topic)

    async def allocated_now() -> bool:
        response = await intake.http.get(f"/v1/orders/{order_id}", headers=intake.auth())
        return bool(response.json()["status"] == "allocated")

    await eventually(allocated_now)
    detail = (await intake.http.get(f"/v1/orders/{order_id}", headers=intake.auth())).json()
    assert [entry["type"] for entry in detail["timeline"]] == ["order.received", "order.allocated"]
    assert "WH-1" in detail["timeline"][1]["summary"]


async def test_a_client_sees_only_its_own_orders(intake: Intake) -> None:
    order_id = (await intake.http.post("/v1/orders", json=order_body(), headers=intake.auth())).json()["order_id"]
    other = intake.auth(await intake.new_key("shop-other"))
    assert (await intake.http.get(f"/v1/orders/{order_id}", headers=other)).status_code == 404
    cancel = await intake.http.post(f"/v1/orders/{order_id}/cancel", json={"reason": "x"}, headers=other)
    assert cancel.status_code == 404
    assert (await intake.http.get("/v1/orders", headers=other)).json()["items"] == []
    # The same external_ref is free for another client.
    assert (await intake.http.post("/v1/orders", json=order_body(), headers=other)).status_code == 201


@pytest.mark.parametrize(
    ("change", "pointers"),
    [
        ({"lines": []}, ["/lines"]),
        ({"lines": [{"line_no": 1, "sku": "A1", "qty": 0}]}, ["/lines/0/qty"]),
        ({"lines": [{"line_no": 1, "sku": "A1", "qty": 1_000_001}]}, ["/lines/0/qty"]),
        ({"lines": [{"line_no": 1, "sku": "A1", "qty": 1.5}]}, ["/lines/0/qty"]),
        ({"lines": [{"line_no": 1, "sku": "A1", "qty": "2"}]}, ["/lines/0/qty"]),
        (
            {"lines": [{"line_no": 1, "sku": "a b", "qty": 1, "substitutes": ["ok-no"]}]},
            ["/lines/0/sku", "/lines/0/substitutes/0"],
        ),
        ({"lines": [{"line_no": i, "sku": "A1", "qty": 1} for i in range(1, 502)]}, ["/lines"]),
        (
            {"lines": [{"line_no": 1, "sku": "A1", "qty": 1}, {"line_no": 1, "sku": "B2", "qty": 1}]},
            ["/lines/1/line_no"],
        ),
        (
            {"ship_to": {"name": "A", "line1": "1", "city": "X", "postal_code": "1", "country": "XX"}},
            ["/ship_to/country"],
        ),
        (
            {"ship_to": {"name": " ", "line1": "1", "city": "X", "country": "NL"}},
            ["/ship_to/name", "/ship_to/postal_code"],
        ),
        ({"customer": {"id": "C", "locale": "fr", "tier": "gold"}}, ["/customer/tier", "/customer/locale"]),
        ({"service_level": "teleport", "external_ref": ""}, ["/external_ref", "/service_level"]),
        # Rules spanning fields are reported with the field errors, not after them.
        (
            {"lines": [{"line_no": 1, "sku": "A1", "qty": 0}, {"line_no": 1, "sku": "B2", "qty": 1}]},
            ["/lines/0/qty", "/lines/1/line_no"],
        ),
        (
            {
                "placed_at": "2999-01-01T00:00:00Z",
                "ship_to": {"name": "A", "line1": "1", "city": "X", "postal_code": "1", "country": "XX"},
            },
            ["/placed_at", "/ship_to/country"],
        ),
        (
            {"lines": [{"line_no": 3, "sku": "A1", "qty": 1}, {"line_no": 3, "sku": "b", "qty": 1}, "x"]},
            ["/lines/1/line_no", "/lines/1/sku", "/lines/2"],
        ),
    ],
)
async def test_every_bad_field_is_named_by_its_json_pointer(
    intake: Intake, change: dict[str, Any], pointers: list[str]
) -> None:
    response = await intake.http.post("/v1/orders", json=order_body(**change), headers=intake.auth())
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert sorted({error["pointer"] for error in response.json()["errors"]}) == sorted(pointers)
    assert await count_orders(intake) == 0


async def test_placed_at_more_than_five_minutes_ahead_is_refused(intake: Intake) -> None:
    ahead = (intake.clock() + timedelta(minutes=6)).isoformat()
    response = await intake.http.post("/v1/orders", json=order_body(placed_at=ahead), headers=intake.auth())
    assert response.status_code == 422
    assert [e["pointer"] for e in response.json()["errors"]] == ["/placed_at"]
    ok = (intake.clock() + timedelta(minutes=4)).isoformat()
    assert (
        await intake.http.post("/v1/orders", json=order_body(placed_at=ok), headers=intake.auth())
    ).status_code == 201


async def test_edge_refusals_malformed_json_wrong_type_too_large(intake: Intake) -> None:
    headers = {**intake.auth(), "content-type": "application/json"}
    assert (await intake.http.post("/v1/orders", content=b'{"external_ref":', headers=headers)).status_code == 400
    text = {**intake.auth(), "content-type": "text/plain"}
    assert (await intake.http.post("/v1/orders", content=b"{}", headers=text)).status_code == 415
    huge = json.dumps(order_body(note="x" * 1_100_000)).encode()
    assert (await intake.http.post("/v1/orders", content=huge, headers=headers)).status_code == 413


async def test_a_chunked_body_is_checked_for_its_content_type_too(intake: Intake) -> None:
    async def chunks(body: bytes) -> AsyncIterator[bytes]:
        yield body[:10]
        yield body[10:]

    payload = json.dumps(order_body("SO-chunked")).encode()
    text = {**intake.auth(), "content-type": "text/plain"}
    refused = await intake.http.post("/v1/orders", content=chunks(payload), headers=text)
    assert refused.status_code == 415, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert await count_orders(intake) == 0
    as_json = {**intake.auth(), "content-type": "application/json"}
    accepted = await intake.http.post("/v1/orders", content=chunks(payload), headers=as_json)
    assert accepted.status_code == 201, accepted.text


async def test_a_batch_item_reports_its_field_and_rule_errors_together(intake: Intake) -> None:
    bad = order_body("SO-both", lines=[{"line_no": 1, "sku": "A1", "qty": 0}, {"line_no": 1, "sku": "B2", "qty": 1}])
    response = await intake.http.post("/v1/orders/batch", json={"orders": [bad]}, headers=intake.auth())
    [item] = response.json()["items"]
    assert item["result"] == "invalid"
    assert item["external_ref"] == "SO-both"
    assert sorted(e["pointer"] for e in item["errors"]) == ["/orders/0/lines/0/qty", "/orders/0/lines/1/line_no"]


NUL = "\u0000"


@pytest.mark.parametrize(
    ("change", "pointer"),
    [
        ({"external_ref": f"SO{NUL}1"}, "/external_ref"),
        ({"customer": {"id": f"C{NUL}"}}, "/customer/id"),
        ({"customer": {"id": "C", "email": f"a{NUL}@example.cn"}}, "/customer/email"),
        (
            {"ship_to": {"name": f"Li{NUL}", "line1": "1", "city": "X", "postal_code": f"2{NUL}", "country": "CN"}},
            "/ship_to/name",
        ),
    ],
)
async def test_nul_characters_are_refused_not_a_server_error(
    intake_any_db: Intake, change: dict[str, Any], pointer: str
) -> None:
    """PostgreSQL cannot store U+0000 in text: every string is checked at the edge."""
    intake = intake_any_db
    response = await intake.http.post("/v1/orders", json=order_body(**change), headers=intake.auth())
    assert response.status_code == 422, response.text
    assert pointer in {error["pointer"] for error in response.json()["errors"]}
    batch = await intake.http.post("/v1/orders/batch", json={"orders": [order_body(**change)]}, headers=intake.auth())
    assert batch.status_code == 207, batch.text
    assert batch.json()["items"][0]["result"] == "invalid"
    assert await count_orders(intake) == 0


async def test_nul_characters_in_queries_and_paths_are_refused_not_a_server_error(intake_any_db: Intake) -> None:
    intake = intake_any_db
    for params in ({"external_ref": "SO\x001"}, {"customer_id": "\x00"}, {"cursor": "\x00"}):
        response = await intake.http.get("/v1/orders", params=params, headers=intake.auth())
        assert response.status_code == 422, (params, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    for path in ("/v1/orders/ord_%00", "/v1/orders/%00/cancel"):
        method = intake.http.get if not path.endswith("cancel") else intake.http.post
        kwargs: dict[str, Any] = {"json": {"reason": "x"}} if path.endswith("cancel") else {}
        response = await method(path, headers=intake.auth(), **kwargs)
        assert response.status_code == 422, (path, response.text)
    hidden = base64.urlsafe_b64encode(json.dumps(["2026-11-20T09:30:00+00:00", "ord\x00"]).encode()).decode()
    response = await intake.http.get("/v1/orders", params={"cursor": hidden}, headers=intake.auth())
    assert response.status_code == 400, response.text


async def test_the_openapi_document_has_examples_for_pages_cancels_and_problems(intake: Intake) -> None:
    document = (await intake.http.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    OrderPage.model_validate(schemas["OrderPage"]["examples"][0])
    CancelAccepted.model_validate(schemas["CancelAccepted"]["examples"][0])
    problems = 0
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                content = response.get("content", {}).get("application/problem+json")
                if content is None:
                    continue
                problems += 1
                example = content.get("example")
                assert example is not None, (method, path, status)
                problem = ProblemDetails.model_validate(example)
                assert str(problem.status) == status, (method, path, status)
    assert problems >= 20


async def test_a_second_order_with_the_same_external_ref_is_409_naming_the_first(intake_any_db: Intake) -> None:
    intake = intake_any_db
    first = (await intake.http.post("/v1/orders", json=order_body("SO-9"), headers=intake.auth())).json()
    again = await intake.http.post(
        "/v1/orders", json=order_body("SO-9", service_level="economy"), headers=intake.auth()
    )
    assert again.status_code == 409
    assert again.json()["order_id"] == first["order_id"]
    assert first["order_id"] in again.json()["detail"]
    assert await count_orders(intake) == 1


async def test_idempotency_key_replays_refuses_other_bodies(intake_any_db: Intake) -> None:
    intake = intake_any_db
    headers = {**intake.auth(), "Idempotency-Key": "k-1"}
    first = await intake.http.post("/v1/orders", json=order_body("SO-7"), headers=headers)
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    # Same JSON document, formatted differently: a replay.
    same = json.dumps(order_body("SO-7"), indent=2).encode()
    replay = await intake.http.post("/v1/orders", content=same, headers={**headers, "content-type": "application/json"})
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == first.json()
    assert replay.headers["location"] == first.headers["location"]

    other = await intake.http.post("/v1/orders", json=order_body("SO-8"), headers=headers)
    assert other.status_code == 422
    assert "Idempotency-Key" in other.json()["title"]

    # A refusal is replayed as well: the same key for a duplicate external_ref keeps saying 409.
    dup_headers = {**intake.auth(), "Idempotency-Key": "k-2"}
    dup = await intake.http.post("/v1/orders", json=order_body("SO-7"), headers=dup_headers)
    dup_again = await intake.http.post("/v1/orders", json=order_body("SO-7"), headers=dup_headers)
    assert dup.status_code == dup_again.status_code == 409
    assert dup_again.headers["idempotent-replayed"] == "true"
    assert dup_again.json()["order_id"] == first.json()["order_id"]
    assert await count_orders(intake) == 1


async def test_concurrent_posts_with_one_idempotency_key_create_exactly_one_order(intake_any_db: Intake) -> None:
    intake = intake_any_db
    headers = {**intake.auth(), "Idempotency-Key": "burst"}
    responses = await asyncio.gather(
        *[intake.http.post("/v1/orders", json=order_body("SO-burst"), headers=headers) for _ in range(25)]
    )
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {201, 409}, statuses
    created = [r for r in responses if r.status_code == 201]
    assert len({r.json()["order_id"] for r in created}) == 1
    assert sum("idempotent-replayed" not in r.headers for r in created) == 1
    in_flight = [r for r in responses if r.status_code == 409]
    assert all(r.headers["retry-after"] == "1" for r in in_flight)
    assert await count_orders(intake) == 1


async def test_a_request_cancelled_mid_commit_leaves_its_key_answered_not_claimed(own_intake: Intake) -> None:
    """A client that gives up (disconnects) while its order is being committed: the retry with
    the same key gets the stored answer at once, not 409 until a lock expires."""
    intake = own_intake
    headers = {**intake.auth(), "Idempotency-Key": "gone"}
    database = intake.settings.database.removeprefix("sqlite+aiosqlite:///")
    blocker = sqlite3.connect(database, isolation_level=None, timeout=30, check_same_thread=False)
    # Off the event loop: a write the app has in flight needs the loop to commit and free the lock.
    await asyncio.to_thread(blocker.execute, "BEGIN IMMEDIATE")  # the writer's transaction now waits for it
    try:
        request = asyncio.create_task(intake.http.post("/v1/orders", json=order_body("SO-gone"), headers=headers))
        await eventually(lambda: intake.runtime.extras["intake"].group_commit.in_flight)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        in_flight = await intake.http.post("/v1/orders", json=order_body("SO-gone"), headers=headers)
        assert in_flight.status_code == 409  # still being committed: the honest answer
    finally:
        blocker.rollback()
        blocker.close()
    await eventually(lambda: not intake.runtime.extras["intake"].group_commit.in_flight)
    retry = await intake.http.post("/v1/orders", json=order_body("SO-gone"), headers=headers)
    assert retry.status_code == 201, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert await count_orders(intake) == 1


async def test_a_batch_accepts_the_good_items_and_reports_each(intake_any_db: Intake) -> None:
    intake = intake_any_db
    existing = (await intake.http.post("/v1/orders", json=order_body("SO-old"), headers=intake.auth())).json()
    bad_qty = order_body("SO-bad", lines=[{"line_no": 1, "sku": "A1", "qty": 0}])
    orders = [
        order_body("SO-b1"),
        bad_qty,
        order_body("SO-old"),
        order_body("SO-b2"),
        order_body("SO-b1"),
        "not an object",
        order_body(
            "SO-dup-lines", lines=[{"line_no": 1, "sku": "A1", "qty": 1}, {"line_no": 1, "sku": "A1", "qty": 1}]
        ),
    ]
    response = await intake.http.post("/v1/orders/batch", json={"orders": orders}, headers=intake.auth())
    assert response.status_code == 207, response.text
    body = response.json()
    items = body["items"]
    assert [item["result"] for item in items] == [
        "created", "invalid", "duplicate", "created", "duplicate", "invalid", "invalid",
    ]  # fmt: skip
    assert (body["created"], body["duplicates"], body["invalid"]) == (2, 2, 3)
    assert items[1]["errors"][0]["pointer"] == "/orders/1/lines/0/qty"
    assert items[2]["order_id"] == existing["order_id"]
    assert items[4]["order_id"] == items[0]["order_id"]
    assert items[6]["errors"][0]["pointer"] == "/orders/6/lines/1/line_no"
    assert await count_orders(intake) == 3
    detail = await intake.http.get(f"/v1/orders/{items[3]['order_id']}", headers=intake.auth())
    assert detail.json()["timeline"][0]["type"] == "order.received"


async def test_concurrent_batches_with_overlapping_orders_create_each_once(intake_any_db: Intake) -> None:
    intake = intake_any_db
    batches = [{"orders": [order_body(f"SO-o{i}") for i in range(start, start + 30)]} for start in (0, 15, 10)]
    responses = await asyncio.gather(
        *[intake.http.post("/v1/orders/batch", json=batch, headers=intake.auth()) for batch in batches]
    )
    assert all(r.status_code == 207 for r in responses)
    created: dict[str, str] = {}
    for response in responses:
        for item in response.json()["items"]:
            if item["result"] == "created":
                assert item["external_ref"] not in created
                created[item["external_ref"]] = item["order_id"]
    assert len(created) == 45
    for response in responses:  # every duplicate names the order that was created
        for item in response.json()["items"]:
            assert created[item["external_ref"]] == item["order_id"]
    assert await count_orders(intake) == 45


async def test_a_batch_of_a_thousand_is_accepted_and_more_is_refused(intake: Intake) -> None:
    orders = [order_body(f"SO-{i}") for i in range(1000)]
    response = await intake.http.post("/v1/orders/batch", json={"orders": orders}, headers=intake.auth())
    assert response.status_code == 207
    assert response.json()["created"] == 1000
    too_many = await intake.http.post("/v1/orders/batch", json={"orders": orders + orders[:1]}, headers=intake.auth())
    assert too_many.status_code == 422


async def apply_all(intake: Intake, events: list[tuple[str, OrderEvent]]) -> None:
    """Feed events to the service's handlers as the consumer would, one transaction each."""
    for ce_id, event in events:
        async with intake.runtime.sessions() as session, session.begin():
            handler = HANDLERS[type(event)]
            envelope = Envelope(ce_id, "/test", event.type, event.occurred_at, event.order_id, event)
            await handler(event, session, envelope)


async def test_shuffled_and_duplicated_events_give_the_same_status_and_timeline(intake: Intake) -> None:
    intake.clock.now = T0 - timedelta(minutes=1)  # the orders are received just before their story starts
    bodies = [order_body(f"SO-t{i}") for i in range(2)]
    ids = [
        (await intake.http.post("/v1/orders", json=body, headers=intake.auth())).json()["order_id"] for body in bodies
    ]
    views = []
    for n, order_id in enumerate(ids):
        life = [(f"ce-{order_id}-{i}", e) for i, e in enumerate(full_life(order_id)[1:7])]  # received is ours
        feed = life + random.Random(n).sample(life, 4)  # duplicates, redelivered
        if n:
            random.Random(42).shuffle(feed)
        await apply_all(intake, feed)
        detail = (await intake.http.get(f"/v1/orders/{order_id}", headers=intake.auth())).json()
        views.append(detail)
    first, second = views
    assert first["status"] == second["status"] == "partially_shipped"
    assert first["delayed"]
    assert second["delayed"]
    assert first["latest_delay"]["reason"] == second["latest_delay"]["reason"] == "typhoon"

    def strip(timeline: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(entry["type"], entry["occurred_at"]) for entry in timeline]

    assert strip(first["timeline"]) == strip(second["timeline"])
    assert len(first["timeline"]) == 7
    assert [e["type"] for e in first["timeline"]][:3] == ["order.received", "order.allocated", "order.backordered"]
    shipped_entry = next(e for e in first["timeline"] if e["type"] == "order.shipped")
    assert "SF Express" in shipped_entry["summary"]
    assert "TRK-S1" in shipped_entry["summary"]


async def test_cancel_is_202_with_an_event_and_409_once_everything_shipped(
    own_intake: Intake, kafka_bootstrap: str
) -> None:
    intake = own_intake
    order_id = (await intake.http.post("/v1/orders", json=order_body("SO-c"), headers=intake.auth())).json()["order_id"]
    response = await intake.http.post(
        f"/v1/orders/{order_id}/cancel", json={"reason": "changed mind"}, headers=intake.auth()
    )
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    again = await intake.http.post(f"/v1/orders/{order_id}/cancel", json={"reason": "twice"}, headers=intake.auth())
    assert again.status_code == 202
    records = await read_topic(kafka_bootstrap, intake.settings.kafka_topic, expect=2)
    assert sorted(r.type for r in records) == ["order.cancelled", "order.received"]  # one cancel event only

    shipped_id = (await intake.http.post("/v1/orders", json=order_body("SO-s"), headers=intake.auth())).json()[
        "order_id"
    ]
    await apply_all(intake, [("ce-ship", shipped(shipped_id, 1, "S1", {1: 5, 2: 3}))])
    refused = await intake.http.post(f"/v1/orders/{shipped_id}/cancel", json={"reason": "late"}, headers=intake.auth())
    assert refused.status_code == 409
    assert refused.headers["content-type"] == "application/problem+json"
    detail = (await intake.http.get(f"/v1/orders/{shipped_id}", headers=intake.auth())).json()
    assert detail["status"] == "shipped"


async def test_orders_are_listed_with_filters_and_cursor_pages(intake: Intake) -> None:
    for i in range(7):
        body = order_body(f"SO-l{i}", customer={"id": "C-even" if i % 2 == 0 else "C-odd"})
        assert (await intake.http.post("/v1/orders", json=body, headers=intake.auth())).status_code == 201
        intake.clock.advance(1)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await intake.http.get("/v1/orders", params=params, headers=intake.auth())).json()
        seen += [item["external_ref"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"SO-l{i}" for i in range(7)]

    async def refs(**params: Any) -> list[str]:
        response = await intake.http.get("/v1/orders", params=params, headers=intake.auth())
        assert response.status_code == 200, response.text
        return [item["external_ref"] for item in response.json()["items"]]

    assert await refs(customer_id="C-odd") == ["SO-l1", "SO-l3", "SO-l5"]
    assert await refs(external_ref="SO-l4") == ["SO-l4"]
    since = (intake.clock.now - timedelta(seconds=2)).isoformat()
    assert await refs(since=since) == ["SO-l5", "SO-l6"]
    assert await refs(status="cancelled") == []
    assert len(await refs(status="received")) == 7
    bad = await intake.http.get("/v1/orders", params={"cursor": "!!"}, headers=intake.auth())
    assert bad.status_code == 400


@pytest.mark.parametrize("intake_overrides", [{"rate_limit_per_second": 1, "rate_limit_burst": 2}])
async def test_each_client_has_its_own_token_bucket(own_intake: Intake) -> None:
    intake = own_intake
    statuses = [(await intake.http.get("/v1/orders", headers=intake.auth())).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    limited = await intake.http.get("/v1/orders", headers=intake.auth())
    assert limited.headers["retry-after"] == "1"
    assert limited.headers["content-type"] == "application/problem+json"
    # Posting counts against the same bucket, and a refused order is not written.
    refused = await intake.http.post("/v1/orders", json=order_body("SO-429"), headers=intake.auth())
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert await count_orders(intake) == 0
    other = intake.auth(await intake.new_key("shop-2"))
    assert (await intake.http.get("/v1/orders", headers=other)).status_code == 200
    intake.clock.advance(1)
    assert (await intake.http.get("/v1/orders", headers=intake.auth())).status_code == 200
    intake.clock.advance(1)
    accepted = await intake.http.post("/v1/orders", json=order_body("SO-429"), headers=intake.auth())
    assert accepted.status_code == 201, accepted.text
