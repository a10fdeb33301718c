"""The whole path on a real broker: order events on the topic -> consumer -> delivery
queue -> signed webhooks to a real receiver and emails to a real aiosmtpd server.
A redelivered event produces no second notice."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaProducer
from fulfil.codec import encode
from fulfil.consumer import AppliedEvent
from fulfil.testing import create_topics, eventually, running_app
from notifications.main import create_app
from notifications_support import (
    Mailbox,
    Receiver,
    bodies,
    every_notice,
    notifications_settings,
    run_receiver,
    run_smtp,
)
from sqlalchemy import delete
from standardwebhooks import Webhook


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from run_receiver(Receiver())


async def test_every_order_event_becomes_one_signed_webhook_and_one_email(
    kafka_bootstrap: str, database_url: str, topic_name: str, receiver: Receiver
) -> None:
    mailbox = Mailbox()
    smtp = run_smtp(mailbox)
    smtp_url = next(smtp)
    try:
        settings = notifications_settings(kafka_bootstrap, database_url, topic_name, smtp_url=smtp_url)
        await create_topics(settings)
        app = create_app(settings)
        async with running_app(app) as client:
            put = await client.put(
                "/v1/customers/c-1/preferences", json={"locale": "zh-CN", "webhook_url": receiver.url}
            )
            secret = put.json()["webhook_secret"]
            events = every_notice()
            records = [encode(event, source="/test") for event in events]
            producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
            await producer.start()
            try:
                for _, record in records:
                    await producer.send_and_wait(topic_name, record.value, key=record.key, headers=record.headers)
                await eventually(lambda: len(receiver.requests) >= 6 and len(mailbox.messages) >= 6, timeout=30)
                # The broker delivers the shipped event again (same ce_id): nothing new is sent.
                _, shipped = records[2]
                await producer.send_and_wait(topic_name, shipped.value, key=shipped.key, headers=shipped.headers)
                runtime = app.state.runtime
                consumer = runtime.consumer
                await eventually(lambda: consumer.stats.duplicates >= 1, timeout=30)
                # Later the inbox has forgotten the ce_id (retention), and the broker redelivers it:
                # the delivery queue itself knows, so nothing is queued twice and nothing dead-lettered.
                async with runtime.sessions() as session, session.begin():
                    await (await session.connection()).execute(delete(AppliedEvent))
                applied = consumer.stats.applied
                await producer.send_and_wait(topic_name, shipped.value, key=shipped.key, headers=shipped.headers)
                await eventually(lambda: consumer.stats.applied > applied, timeout=30)
                assert consumer.stats.dead_lettered == 0
            finally:
                await producer.stop()

            async def all_delivered() -> list[dict[str, object]]:
                rows = (await client.get("/v1/deliveries", params={"order_id": "o-1"})).json()
                return rows if all(d["status"] == "delivered" for d in rows) else []

            rows = await eventually(all_delivered, timeout=30)
            assert len(rows) == 12
            assert all([a["status_code"] for a in d["attempts"]] == [200] for d in rows if d["channel"] == "webhook")

        assert len(receiver.requests) == 6
        assert len(mailbox.messages) == 6
        payloads = [Webhook(secret).verify(r.body, r.headers) for r in receiver.requests]
        assert sorted(p["type"] for p in payloads) == sorted(e.type for e in events)
        assert len({r.headers["webhook-id"] for r in receiver.requests}) == 6
        assert {p["data"]["event_id"] for p in payloads} == {ce_id for ce_id, _ in records}

        by_subject = {m["Subject"]: m for m in mailbox.messages}
        shipped_mail = by_subject["您的订单 PO-O-1 已发货"]
        assert shipped_mail["To"] == "li.wei@example.cn"
        text, html = bodies(shipped_mail)
        assert "运单号：SF1234567890" in text
        assert "承运商：SF Express" in text
        assert "<td>SF1234567890</td>" in html
        assert "您的订单 PO-O-1 延误" in by_subject
        assert "恶劣天气" in bodies(by_subject["您的订单 PO-O-1 延误"])[0]
        assert "您的订单 PO-O-1 已签收，部分商品破损" in by_subject
    finally:
        next(smtp, None)
