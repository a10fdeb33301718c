"""Preferences API and how preferences shape what is queued."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fulfil.testing import running_app
from notifications.handlers import HANDLERS
from notifications.main import create_app
from notifications_support import FakeClock, envelope, every_notice, notifications_settings, received

NOW = datetime(2025, 3, 3, 15, 30, tzinfo=UTC)  # 23:30 in Shanghai


@contextlib.asynccontextmanager
async def notifications_api(bootstrap: str, url: str, topic: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(notifications_settings(bootstrap, url, topic), clock=FakeClock(NOW), run_worker=False)
    async with running_app(app) as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


@pytest.fixture
async def api(kafka_bootstrap: str, sqlite_url: str, topic_name: str) -> AsyncIterator[httpx.AsyncClient]:
    async with notifications_api(kafka_bootstrap, sqlite_url, topic_name) as client:
        yield client


@pytest.fixture
async def api_any_db(kafka_bootstrap: str, database_url: str, topic_name: str) -> AsyncIterator[httpx.AsyncClient]:
    """On SQLite and on PostgreSQL."""
    async with notifications_api(kafka_bootstrap, database_url, topic_name) as client:
        yield client


async def apply(client: httpx.AsyncClient, *events: object) -> None:
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    async with runtime.sessions() as session, session.begin():
        for event in events:
            await HANDLERS[type(event)](event, session, envelope(event))  # type: ignore[index]


async def test_preferences_round_trip_and_the_secret_is_shown_once(api_any_db: httpx.AsyncClient) -> None:
    api = api_any_db
    assert (await api.get("/v1/customers/c-1/preferences")).status_code == 404
    body = {
        "locale": "zh-CN",
        "email": "ops@example.cn",
        "webhook_url": "http://127.0.0.1:9/hook",
        "events": ["order.shipped", "order.delayed"],
        "quiet_hours": {"start": "22:00", "end": "07:00", "timezone": "Asia/Shanghai"},
    }
    created = (await api.put("/v1/customers/c-1/preferences", json=body)).json()
    secret = created["webhook_secret"]
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert created["webhook_status"] == "active"

    shown = (await api.get("/v1/customers/c-1/preferences")).json()
    assert shown["webhook_secret"] is None
    assert shown["events"] == ["order.delayed", "order.shipped"]
    assert shown["quiet_hours"] == {"start": "22:00:00", "end": "07:00:00", "timezone": "Asia/Shanghai"}

    same = (await api.put("/v1/customers/c-1/preferences", json=body)).json()
    assert same["webhook_secret"] is None
    moved = (
        await api.put("/v1/customers/c-1/preferences", json={**body, "webhook_url": "http://localhost:9/x"})
    ).json()
    assert moved["webhook_secret"].startswith("whsec_")
    assert moved["webhook_secret"] != secret
    removed = (await api.put("/v1/customers/c-1/preferences", json={**body, "webhook_url": None})).json()
    assert removed["webhook_url"] is None


BAD_PREFERENCES: list[tuple[str, object]] = [
    ("webhook_url", "http://hooks.example.com/x"),
    ("webhook_url", "https://169.254.169.254/latest"),
    ("webhook_url", "https://[::ffff:10.0.0.1]/x"),
    ("locale", "fr"),
    ("events", ["order.teleported"]),
    ("email", "not-an-email"),
    ("quiet_hours", {"start": "22:00", "end": "07:00", "timezone": "Mars/Olympus"}),
]


async def test_bad_preferences_are_refused_with_a_problem(api: httpx.AsyncClient) -> None:
    for field, value in BAD_PREFERENCES:
        response = await api.put("/v1/customers/c-1/preferences", json={"locale": "en", field: value})
        assert response.status_code == 422, (field, value, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
    assert (await api.get("/v1/customers/c-1/preferences")).status_code == 404


async def test_preferences_choose_events_locale_channel_and_hold_delays_for_the_morning(
    api_any_db: httpx.AsyncClient,
) -> None:
    api = api_any_db
    await api.put(
        "/v1/customers/c-1/preferences",
        json={
            "locale": "en",
            "email": "ops@example.cn",
            "events": ["order.shipped", "order.delayed"],
            "quiet_hours": {"start": "22:00", "end": "07:00", "timezone": "Asia/Shanghai"},
        },
    )
    events = every_notice(at=NOW - timedelta(days=1))
    delayed = events[3].model_copy(update={"occurred_at": NOW})
    await apply(api, events[0], events[2], delayed)
    rows = (await api.get("/v1/deliveries", params={"order_id": "o-1"})).json()
    assert [(d["notice"], d["channel"], d["recipient"], d["locale"]) for d in rows] == [
        ("order.shipped", "email", "ops@example.cn", "en"),
        ("order.delayed", "email", "ops@example.cn", "en"),
    ]
    assert rows[1]["subject"] == "Your order PO-O-1 is delayed"
    assert datetime.fromisoformat(rows[1]["next_attempt_at"]) == datetime(2025, 3, 3, 23, 0, tzinfo=UTC)


async def test_express_delay_notice_is_not_held(api: httpx.AsyncClient) -> None:
    await api.put(
        "/v1/customers/c-1/preferences",
        json={"locale": "zh-CN", "quiet_hours": {"start": "22:00", "end": "07:00", "timezone": "Asia/Shanghai"}},
    )
    order = received(at=NOW - timedelta(days=1), service_level="express")  # type: ignore[arg-type]
    delayed = every_notice()[3].model_copy(update={"occurred_at": NOW})
    await apply(api, order, delayed)
    rows = (await api.get("/v1/deliveries", params={"order_id": "o-1", "status": "pending"})).json()
    assert [(d["notice"], d["recipient"]) for d in rows] == [
        ("order.received", "li.wei@example.cn"),
        ("order.delayed", "li.wei@example.cn"),
    ]
    assert datetime.fromisoformat(rows[1]["next_attempt_at"]) == NOW


async def test_unknown_order_queues_nothing_and_unknown_delivery_is_404(api: httpx.AsyncClient) -> None:
    await apply(api, every_notice(order_id="o-404")[2])
    assert (await api.get("/v1/deliveries")).json() == []
    missing = await api.post("/v1/deliveries/nope/retry")
    assert missing.status_code == 404


async def put(api: httpx.AsyncClient, body: dict[str, object], customer_id: str = "c-1") -> dict[str, object]:
    response = await api.put(f"/v1/customers/{customer_id}/preferences", json=body)
    assert response.status_code == 200, response.text
    shown = response.json()
    assert isinstance(shown, dict)
    return shown


async def queued(api: httpx.AsyncClient, order_id: str) -> list[tuple[str, str, str]]:
    rows = (await api.get("/v1/deliveries", params={"order_id": order_id})).json()
    return sorted((d["channel"], d["recipient"], d["locale"]) for d in rows)


async def test_explicit_null_email_means_webhook_only_and_absent_fields_stay_as_they_were(
    api_any_db: httpx.AsyncClient,
) -> None:
    api = api_any_db
    hook = "http://127.0.0.1:9/hook"
    shown = await put(api, {"webhook_url": hook, "email": None})
    assert (shown["email"], shown["email_enabled"], shown["locale"]) == (None, False, None)
    # The order gives an email address; the customer said no email: webhook only.
    await apply(api, received("o-1", at=NOW))
    assert await queued(api, "o-1") == [("webhook", hook, "zh-CN")]

    # A PUT that names only the events changes only the events.
    shown = await put(api, {"events": ["order.received", "order.shipped"]})
    assert (shown["email"], shown["email_enabled"], shown["webhook_url"]) == (None, False, hook)
    assert shown["locale"] is None

    # Email back on, at an address of their own.
    shown = await put(api, {"email": "ops@example.cn"})
    assert (shown["email"], shown["email_enabled"], shown["webhook_url"]) == ("ops@example.cn", True, hook)
    await apply(api, received("o-2", at=NOW))
    assert await queued(api, "o-2") == [("email", "ops@example.cn", "zh-CN"), ("webhook", hook, "zh-CN")]

    # Webhook off, explicitly; email stays.
    shown = await put(api, {"webhook_url": None})
    assert (shown["webhook_url"], shown["email"]) == (None, "ops@example.cn")
    await apply(api, received("o-3", at=NOW))
    assert await queued(api, "o-3") == [("email", "ops@example.cn", "zh-CN")]


async def test_a_put_without_locale_keeps_it_and_a_new_customer_follows_the_order(
    api_any_db: httpx.AsyncClient,
) -> None:
    api = api_any_db
    # No locale given: notices follow each order's locale (zh-CN here), not en.
    shown = await put(api, {"events": ["order.received"]})
    assert shown["locale"] is None
    await apply(api, received("o-1", at=NOW))
    assert await queued(api, "o-1") == [("email", "li.wei@example.cn", "zh-CN")]

    assert (await put(api, {"locale": "en"}))["locale"] == "en"
    shown = await put(api, {"email": "ops@example.cn"})
    assert shown["locale"] == "en"  # a PUT without locale no longer resets it to en (or anything)
    assert shown["events"] == ["order.received"]
    await apply(api, received("o-2", at=NOW))
    assert await queued(api, "o-2") == [("email", "ops@example.cn", "en")]

    # An explicit null goes back to the default: each order's locale; all notices.
    shown = await put(api, {"locale": None, "events": None})
    assert shown["locale"] is None
    assert len(shown["events"]) == 6


async def test_concurrent_first_puts_for_one_customer_all_succeed(api_any_db: httpx.AsyncClient) -> None:
    api = api_any_db
    body = {"locale": "zh-CN", "webhook_url": "http://127.0.0.1:9/hook"}
    responses = await asyncio.gather(*(api.put(f"/v1/customers/c-{n % 2}/preferences", json=body) for n in range(8)))
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    for customer in ("c-0", "c-1"):
        mine = [r.json() for r in responses if r.json()["customer_id"] == customer]
        # One subscription per customer, so its secret is shown exactly once.
        assert len([m for m in mine if m["webhook_secret"]]) == 1
        assert (await api.get(f"/v1/customers/{customer}/preferences")).json()["webhook_status"] == "active"


async def test_a_delivery_records_when_it_was_written_and_when_the_event_happened(api: httpx.AsyncClient) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=2)
    await apply(api, received("o-1", at=long_ago))
    (row,) = (await api.get("/v1/deliveries", params={"order_id": "o-1"})).json()
    assert datetime.fromisoformat(row["occurred_at"]) == long_ago
    assert abs(datetime.fromisoformat(row["created_at"]) - datetime.now(UTC)) < timedelta(seconds=30)


async def test_an_event_redelivered_after_the_inbox_forgot_it_is_skipped_quietly(
    api_any_db: httpx.AsyncClient,
) -> None:
    """The consumer runs the handler again when the inbox no longer knows the ce_id."""
    api = api_any_db
    await put(api, {"webhook_url": "http://127.0.0.1:9/hook"})
    events = every_notice(at=NOW)
    copies = [envelope(event) for event in events[:3]]
    runtime = api.app.state.runtime  # type: ignore[attr-defined]
    for _ in range(2):
        async with runtime.sessions() as session, session.begin():
            for copy in copies:
                await HANDLERS[type(copy.data)](copy.data, session, copy)
    rows = (await api.get("/v1/deliveries", params={"order_id": "o-1"})).json()
    assert len(rows) == 6
    assert len({(d["notice"], d["channel"]) for d in rows}) == 6
