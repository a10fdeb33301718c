"""In dev without SMTP_URL the service catches its own email in an aiosmtpd sink on
loopback and lists it at GET /v1/dev/mailbox; nowhere else does that route exist, and
production refuses to start without a real mail relay."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fulfil.settings import Environment
from fulfil.testing import running_app
from notifications.config import Settings
from notifications.handlers import HANDLERS
from notifications.main import create_app
from notifications_support import Mailbox, envelope, every_notice, notifications_settings, run_smtp


async def test_dev_without_smtp_url_sends_to_its_own_sink_and_lists_what_it_caught(
    kafka_bootstrap: str, sqlite_url: str, topic_name: str
) -> None:
    settings = notifications_settings(kafka_bootstrap, sqlite_url, topic_name, environment=Environment.DEV)
    assert settings.smtp_url is None
    app = create_app(settings, run_worker=False)
    async with running_app(app) as client:
        assert (await client.get("/v1/dev/mailbox")).json() == []
        runtime = app.state.runtime
        events = every_notice(at=datetime.now(UTC) - timedelta(days=1))
        async with runtime.sessions() as session, session.begin():
            for event in events[:3]:
                await HANDLERS[type(event)](event, session, envelope(event))
        assert await runtime.extras["worker"].run_once() == 3

        mailbox = (await client.get("/v1/dev/mailbox")).json()
        assert sorted(m["subject"] for m in mailbox) == sorted(
            ["您的订单 PO-O-1 已发货", "订单 PO-O-1 部分商品缺货/延期交货", "订单已接收：PO-O-1"]
        )
        arrived = [datetime.fromisoformat(m["received_at"]) for m in mailbox]
        assert arrived == sorted(arrived, reverse=True)  # newest first
        assert abs(arrived[0] - datetime.now(UTC)) < timedelta(seconds=30)
        (received,) = [m for m in mailbox if m["subject"] == "订单已接收：PO-O-1"]
        assert received["to"] == ["li.wei@example.cn"]
        assert "TEA-001 × 3" in received["text"]
        assert "<strong>PO-O-1</strong>" in received["html"]
        (newest,) = (await client.get("/v1/dev/mailbox", params={"limit": 1})).json()
        assert newest == mailbox[0]
        rows = (await client.get("/v1/deliveries")).json()
        assert {d["status"] for d in rows} == {"delivered"}


@pytest.fixture
def mail_relay() -> Iterator[str]:
    yield from run_smtp(Mailbox())


@pytest.mark.parametrize("environment", [Environment.TEST, Environment.DEV])
async def test_the_mailbox_route_exists_only_for_the_dev_sink(
    kafka_bootstrap: str, sqlite_url: str, topic_name: str, mail_relay: str, environment: Environment
) -> None:
    """ENVIRONMENT=test, or dev with a real SMTP_URL: no sink, so no mailbox route."""
    settings = notifications_settings(
        kafka_bootstrap, sqlite_url, topic_name, environment=environment, smtp_url=mail_relay
    )
    app = create_app(settings, run_worker=False)
    async with running_app(app) as client:
        response = await client.get("/v1/dev/mailbox")
        assert response.status_code == 404
        assert "mail_sink" not in app.state.runtime.extras


PRODUCTION = {
    "environment": "production",
    "database_url": "postgresql+asyncpg://fulfil@postgres:5432/notifications",
    "kafka_bootstrap_servers": "kafka:9092",
}


def test_production_refuses_to_start_without_a_mail_relay() -> None:
    with pytest.raises(ValueError, match="SMTP_URL must name the production mail relay"):
        Settings(**PRODUCTION)
    with pytest.raises(ValueError, match="not a local sink"):
        Settings(**PRODUCTION, smtp_url="smtp://127.0.0.1:8025")
    settings = Settings(**PRODUCTION, smtp_url="smtp://user:secret@smtp.example.com:587")
    assert not settings.dev_mail_sink
