"""The delivery worker against a real HTTP receiver and a real SMTP server, on a fake
clock: retry schedule, Retry-After, 410, disabling a failing endpoint, manual retry,
and a crash between sending and recording."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fulfil.events import OrderEvent
from fulfil.testing import eventually, running_app
from notifications.delivery import DeliveryWorker
from notifications.handlers import HANDLERS
from notifications.main import create_app
from notifications.webhooks import VettedTransport
from notifications_support import (
    Canary,
    FakeClock,
    Mailbox,
    Receiver,
    bodies,
    envelope,
    every_notice,
    notifications_settings,
    received,
    run_receiver,
    run_smtp,
)
from standardwebhooks import Webhook


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from run_receiver(Receiver())


@pytest.fixture
def mailbox() -> Mailbox:
    return Mailbox()


@pytest.fixture
def smtp_url(mailbox: Mailbox) -> Iterator[str]:
    yield from run_smtp(mailbox)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime.now(UTC).replace(microsecond=0))


class Harness:
    def __init__(self, app: FastAPI, client: httpx.AsyncClient, clock: FakeClock) -> None:
        self.app = app
        self.client = client
        self.clock = clock

    @property
    def worker(self) -> DeliveryWorker:
        worker: DeliveryWorker = self.app.state.runtime.extras["worker"]
        return worker

    async def apply(self, event: OrderEvent) -> None:
        """Run the handler as the consumer does: in one transaction."""
        runtime = self.app.state.runtime
        async with runtime.sessions() as session, session.begin():
            await HANDLERS[type(event)](event, session, envelope(event))

    async def subscribe(self, url: str, customer_id: str = "c-1", **body: Any) -> str:
        response = await self.client.put(
            f"/v1/customers/{customer_id}/preferences", json={"locale": "zh-CN", "webhook_url": url, **body}
        )
        assert response.status_code == 200, response.text
        secret = response.json()["webhook_secret"]
        assert isinstance(secret, str)
        return secret

    async def subscribe_again(self, url: str, customer_id: str = "c-1") -> None:
        response = await self.client.put(f"/v1/customers/{customer_id}/preferences", json={"webhook_url": url})
        assert response.status_code == 200, response.text
        assert response.json()["webhook_status"] == "active"
        assert response.json()["webhook_secret"] is None

    async def deliveries(self, **params: str) -> list[dict[str, Any]]:
        response = await self.client.get("/v1/deliveries", params=params)
        assert response.status_code == 200, response.text
        rows = response.json()
        assert isinstance(rows, list)
        return rows

    async def webhook_delivery_of(self, order_id: str, notice: str = "order.received") -> dict[str, Any]:
        rows = [d for d in await self.deliveries(order_id=order_id) if d["channel"] == "webhook"]
        (row,) = [d for d in rows if d["notice"] == notice]
        return row

    async def webhook_delivery(self, notice: str = "order.received") -> dict[str, Any]:
        rows = [d for d in await self.deliveries() if d["channel"] == "webhook" and d["notice"] == notice]
        assert len(rows) == 1
        return rows[0]


@pytest.fixture
async def harness(
    kafka_bootstrap: str, sqlite_url: str, topic_name: str, smtp_url: str, clock: FakeClock, request: Any
) -> AsyncIterator[Harness]:
    overrides = dict(getattr(request, "param", {}))
    transport = overrides.pop("transport", None)
    email_sender = overrides.pop("email_sender", None)
    settings = notifications_settings(kafka_bootstrap, sqlite_url, topic_name, smtp_url=smtp_url, **overrides)
    app = create_app(
        settings,
        clock=clock,
        jitter=lambda: 0.0,
        run_worker=False,
        http_transport=transport,
        email_sender=email_sender,
    )
    async with running_app(app) as client:
        yield Harness(app, client, clock)


def verified(secret: str, request: Any) -> dict[str, Any]:
    payload = Webhook(secret).verify(request.body, request.headers)
    assert isinstance(payload, dict)
    return payload


async def test_a_delivery_is_signed_and_emailed_once(harness: Harness, receiver: Receiver, mailbox: Mailbox) -> None:
    secret = await harness.subscribe(receiver.url)
    await harness.apply(received(at=harness.clock.now - timedelta(seconds=1)))
    assert await harness.worker.run_once() == 2
    assert await harness.worker.run_once() == 0

    (request,) = receiver.requests
    payload = verified(secret, request)
    assert payload["type"] == "order.received"
    assert payload["data"]["order_id"] == "o-1"
    assert payload["data"]["notice"]["subject"] == "订单已接收：PO-O-1"
    assert request.headers["webhook-id"] == (await harness.webhook_delivery())["id"]

    (message,) = mailbox.messages
    assert message["To"] == "li.wei@example.cn"
    assert message["Subject"] == "订单已接收：PO-O-1"
    text, html = bodies(message)
    assert "TEA-001 × 3" in text
    assert "<strong>PO-O-1</strong>" in html
    assert all(d["status"] == "delivered" and len(d["attempts"]) == 1 for d in await harness.deliveries())


@pytest.mark.parametrize("harness", [{"endpoint_disable_after_seconds": 3 * 3600}], indirect=True)
async def test_failing_endpoint_follows_the_schedule_then_is_disabled_and_the_customer_told(
    harness: Harness, receiver: Receiver, mailbox: Mailbox
) -> None:
    receiver.statuses = [500]
    await harness.subscribe(receiver.url)
    await harness.apply(received(at=harness.clock.now))
    started = harness.clock.now
    for _ in range(20):
        await harness.worker.run_once()
        delivery = await harness.webhook_delivery()
        if delivery["status"] != "pending":
            break
        harness.clock.now = datetime.fromisoformat(delivery["next_attempt_at"])

    offsets = [datetime.fromisoformat(a["started_at"]) - started for a in delivery["attempts"]]
    # 0, +5 s, +5 min, +30 min, +2 h, +5 h: by then it has failed for over 3 h.
    assert offsets == [
        timedelta(0),
        timedelta(seconds=5),
        timedelta(minutes=5, seconds=5),
        timedelta(minutes=35, seconds=5),
        timedelta(hours=2, minutes=35, seconds=5),
        timedelta(hours=7, minutes=35, seconds=5),
    ]
    assert [a["status_code"] for a in delivery["attempts"]] == [500] * 6
    assert len(receiver.requests) == 6
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
    assert delivery["status"] == "failed"
    assert "endpoint disabled" in delivery["last_error"]

    preferences = (await harness.client.get("/v1/customers/c-1/preferences")).json()
    assert preferences["webhook_status"] == "disabled"
    assert "webhook_secret" not in preferences or preferences["webhook_secret"] is None

    await harness.worker.run_once()
    subjects = [m["Subject"] for m in mailbox.messages]
    assert subjects == ["订单已接收：PO-O-1", "我们已停止向您的 Webhook 发送订单状态通知"]
    assert receiver.url in bodies(mailbox.messages[1])[0]

    # A disabled endpoint gets no new deliveries.
    await harness.apply(every_notice(at=harness.clock.now)[2])
    assert not [d for d in await harness.deliveries() if d["notice"] == "order.shipped" and d["channel"] == "webhook"]


async def test_after_the_last_attempt_the_delivery_is_failed_visible_and_can_be_resent(
    harness: Harness, receiver: Receiver
) -> None:
    receiver.statuses = [503]
    secret = await harness.subscribe(receiver.url, email=None)
    await harness.apply(received(at=harness.clock.now, email=None))
    started = harness.clock.now
    for _ in range(20):
        await harness.worker.run_once()
        delivery = await harness.webhook_delivery()
        if delivery["status"] != "pending":
            break
        harness.clock.now = datetime.fromisoformat(delivery["next_attempt_at"])
    assert delivery["status"] == "failed"
    assert len(delivery["attempts"]) == 9
    assert all(a["status_code"] == 503 and a["error"] == "HTTP 503" for a in delivery["attempts"])
    assert "gave up after 9 attempts" in delivery["last_error"]
    # About three days from the first attempt to the last.
    last = datetime.fromisoformat(delivery["attempts"][-1]["started_at"])
    assert last - started == timedelta(hours=71, minutes=35, seconds=5)
    assert [d["id"] for d in await harness.deliveries(status="failed", order_id="o-1")] == [delivery["id"]]
    assert await harness.deliveries(status="failed", order_id="o-2") == []
    # Failing for longer than the (default) threshold: the endpoint is off too.
    preferences = (await harness.client.get("/v1/customers/c-1/preferences")).json()
    assert preferences["webhook_status"] == "disabled"

    receiver.statuses = [204]
    harness.clock.now = datetime.now(UTC)  # the signature check below uses the wall clock
    assert (await harness.client.post(f"/v1/deliveries/{delivery['id']}/retry")).status_code == 409
    await harness.subscribe_again(receiver.url)  # same URL: fixed, active again, same secret
    response = await harness.client.post(f"/v1/deliveries/{delivery['id']}/retry")
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "pending"
    await harness.worker.run_once()
    delivery = await harness.webhook_delivery()
    assert delivery["status"] == "delivered"
    assert len(delivery["attempts"]) == 10
    assert {r.headers["webhook-id"] for r in receiver.requests} == {delivery["id"]}
    verified(secret, receiver.requests[-1])

    again = await harness.client.post(f"/v1/deliveries/{delivery['id']}/retry")
    assert again.status_code == 409
    assert again.headers["content-type"].startswith("application/problem+json")


async def test_by_default_an_endpoint_failing_across_deliveries_is_disabled_after_two_days(
    harness: Harness, receiver: Receiver, mailbox: Mailbox
) -> None:
    """The default threshold (not an overridden one): every attempt of every delivery fails;
    the first attempt two days after the first failure switches the endpoint off."""
    receiver.statuses = [500]
    await harness.subscribe(receiver.url)
    started = harness.clock.now
    await harness.apply(received("o-1", at=started))
    later_orders = [received("o-2", at=started + timedelta(hours=40))]
    for _ in range(60):
        await harness.worker.run_once()
        waiting = [d for d in await harness.deliveries() if d["channel"] == "webhook" and d["status"] == "pending"]
        times = [datetime.fromisoformat(d["next_attempt_at"]) for d in waiting] + [o.occurred_at for o in later_orders]
        if not times:
            break
        harness.clock.now = min(times)
        while later_orders and later_orders[0].occurred_at <= harness.clock.now:
            await harness.apply(later_orders.pop(0))
    await harness.worker.run_once()  # the email telling the customer

    first = await harness.webhook_delivery_of("o-1")
    second = await harness.webhook_delivery_of("o-2")
    offsets = [datetime.fromisoformat(a["started_at"]) - started for a in second["attempts"]]
    # o-2's attempts from 40 h on; the one at 57 h 35 min is the first past 48 h of failing.
    assert offsets[0] == timedelta(hours=40)
    assert offsets[-1] == timedelta(hours=57, minutes=35, seconds=5)
    assert len(second["attempts"]) == 7
    assert second["status"] == "failed"
    assert "endpoint disabled" in second["last_error"]
    # o-1 had made 8 attempts (the last at 41 h 35 min) and was waiting for its 9th: failed now, unsent.
    assert len(first["attempts"]) == 8
    assert first["status"] == "failed"
    assert "endpoint disabled" in first["last_error"]
    assert len(receiver.requests) == 8 + 7

    preferences = (await harness.client.get("/v1/customers/c-1/preferences")).json()
    assert preferences["webhook_status"] == "disabled"
    disabled_notice = [m for m in mailbox.messages if m["Subject"] == "我们已停止向您的 Webhook 发送订单状态通知"]
    assert len(disabled_notice) == 1
    assert disabled_notice[0]["To"] == "li.wei@example.cn"
    assert receiver.url in bodies(disabled_notice[0])[0]


async def test_a_host_that_does_not_resolve_is_a_failed_attempt_on_the_retry_schedule(harness: Harness) -> None:
    """socket.gaierror is not an httpx error: it must still be recorded and retried."""
    await harness.subscribe("https://no-such-host.invalid/hooks", email=None)
    await harness.apply(received(at=harness.clock.now, email=None))
    started = harness.clock.now
    for _ in range(3):
        assert await harness.worker.run_once() == 1
        delivery = await harness.webhook_delivery()
        assert delivery["status"] == "pending"
        harness.clock.now = datetime.fromisoformat(delivery["next_attempt_at"])
    attempts = delivery["attempts"]
    assert [a["outcome"] for a in attempts] == ["retry"] * 3
    assert all(a["status_code"] is None and "does not resolve" in a["error"] for a in attempts)
    assert [datetime.fromisoformat(a["started_at"]) - started for a in attempts] == [
        timedelta(0),
        timedelta(seconds=5),
        timedelta(minutes=5, seconds=5),
    ]


@contextlib.asynccontextmanager
async def trickling_receiver(total_seconds: float) -> AsyncIterator[str]:
    """Answers 200, one header line every 0.2 s for ``total_seconds``: each read is quick,
    the whole answer is slow."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        loop = asyncio.get_running_loop()
        until = loop.time() + total_seconds
        with contextlib.suppress(ConnectionError):
            while loop.time() < until:
                writer.write(b"x-slowly: yes\r\n")
                await writer.drain()
                await asyncio.sleep(0.2)
            writer.write(b"content-length: 0\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks"
    finally:
        server.close()


@pytest.mark.parametrize("harness", [{"webhook_timeout_seconds": 1.0}], indirect=True)
async def test_the_timeout_is_one_deadline_for_the_whole_attempt(harness: Harness) -> None:
    async with trickling_receiver(total_seconds=4.0) as url:
        await harness.subscribe(url, email=None)
        await harness.apply(received(at=harness.clock.now, email=None))
        began = time.monotonic()
        await harness.worker.run_once()
        took = time.monotonic() - began
    delivery = await harness.webhook_delivery()
    assert delivery["status"] == "pending"
    assert [(a["outcome"], a["error"]) for a in delivery["attempts"]] == [("retry", "timed out after 1 s")]
    assert 0.9 < took < 3.0


async def test_410_disables_the_endpoint_at_once(harness: Harness, receiver: Receiver, mailbox: Mailbox) -> None:
    receiver.statuses = [410]
    await harness.subscribe(receiver.url)
    events = every_notice(at=harness.clock.now)
    await harness.apply(events[0])
    await harness.apply(events[2])  # shipped three hours from now: queued, not yet due
    await harness.worker.run_once()
    assert len(receiver.requests) == 1
    first = await harness.webhook_delivery("order.received")
    assert first["status"] == "failed"
    assert [a["status_code"] for a in first["attempts"]] == [410]
    later = await harness.webhook_delivery("order.shipped")
    assert later["status"] == "failed"
    assert later["attempts"] == []
    assert "endpoint disabled" in later["last_error"]
    assert (await harness.client.get("/v1/customers/c-1/preferences")).json()["webhook_status"] == "disabled"
    refused = await harness.client.post(f"/v1/deliveries/{first['id']}/retry")
    assert refused.status_code == 409

    await harness.worker.run_once()
    assert "我们已停止向您的 Webhook 发送订单状态通知" in [m["Subject"] for m in mailbox.messages]

    # The customer fixes their receiver and says so: same URL, same secret, active again.
    receiver.statuses = [200]
    response = await harness.client.put(
        "/v1/customers/c-1/preferences", json={"locale": "zh-CN", "webhook_url": receiver.url}
    )
    assert response.json()["webhook_status"] == "active"
    assert response.json()["webhook_secret"] is None
    assert (await harness.client.post(f"/v1/deliveries/{first['id']}/retry")).status_code == 202
    await harness.worker.run_once()
    assert (await harness.webhook_delivery("order.received"))["status"] == "delivered"


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_honoured(harness: Harness, receiver: Receiver, status: int) -> None:
    receiver.statuses = [status, 200]
    receiver.headers = {"Retry-After": "120"}
    await harness.subscribe(receiver.url)
    await harness.apply(received(at=harness.clock.now))
    sent_at = harness.clock.now
    await harness.worker.run_once()
    delivery = await harness.webhook_delivery()
    assert delivery["status"] == "pending"
    assert datetime.fromisoformat(delivery["next_attempt_at"]) == sent_at + timedelta(seconds=120)
    harness.clock.advance(timedelta(seconds=119))
    await harness.worker.run_once()
    assert len(receiver.requests) == 1
    harness.clock.advance(timedelta(seconds=1))
    await harness.worker.run_once()
    assert (await harness.webhook_delivery())["status"] == "delivered"


async def test_other_4xx_is_not_retried(harness: Harness, receiver: Receiver) -> None:
    receiver.statuses = [400]
    await harness.subscribe(receiver.url)
    await harness.apply(received(at=harness.clock.now))
    await harness.worker.run_once()
    harness.clock.advance(timedelta(days=3))
    await harness.worker.run_once()
    delivery = await harness.webhook_delivery()
    assert delivery["status"] == "failed"
    assert len(receiver.requests) == 1
    preferences = (await harness.client.get("/v1/customers/c-1/preferences")).json()
    assert preferences["webhook_status"] == "active"


class CrashAfterSending(httpx.AsyncBaseTransport):
    """The process dies after the receiver accepted the webhook, before we record it."""

    def __init__(self) -> None:
        self.inner = VettedTransport(allow_loopback=True)
        self.crash = True

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self.crash:
            self.crash = False
            raise asyncio.CancelledError("killed between sending and recording")
        return response


@pytest.mark.parametrize("harness", [{"transport": CrashAfterSending()}], indirect=True)
async def test_a_crash_between_sending_and_recording_resends_once_with_the_same_webhook_id(
    harness: Harness, receiver: Receiver
) -> None:
    secret = await harness.subscribe(receiver.url, email=None)
    await harness.apply(received(at=harness.clock.now, email=None))
    with pytest.raises(asyncio.CancelledError):
        await harness.worker.run_once()
    assert len(receiver.requests) == 1
    assert (await harness.webhook_delivery())["status"] == "sending"

    assert await harness.worker.run_once() == 0  # the dead worker's lease still holds
    harness.clock.advance(timedelta(seconds=harness.worker.settings.delivery_lease_seconds))
    assert await harness.worker.run_once() == 1
    assert await harness.worker.run_once() == 0
    first, second = receiver.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert verified(secret, first) == verified(secret, second)
    assert (await harness.webhook_delivery())["status"] == "delivered"


async def test_a_redirect_is_not_followed(harness: Harness, receiver: Receiver) -> None:
    canary = Canary()
    await canary.start()
    try:
        receiver.statuses = [302]
        receiver.headers = {"Location": f"http://127.0.0.1:{canary.port}/steal"}
        await harness.subscribe(receiver.url)
        await harness.apply(received(at=harness.clock.now))
        await harness.worker.run_once()
        delivery = await harness.webhook_delivery()
        assert delivery["status"] == "failed"
        assert "redirects are not followed" in delivery["last_error"]
        await asyncio.sleep(0.1)
        assert canary.connections == 0
    finally:
        await canary.stop()


@contextlib.asynccontextmanager
async def worker_running(harness: Harness) -> AsyncIterator[DeliveryWorker]:
    """The service's own loop (``run``), not the tests' ``run_once`` steps."""
    task = asyncio.create_task(harness.worker.run())
    try:
        yield harness.worker
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def statuses(harness: Harness, order_id: str) -> dict[str, str]:
    return {d["channel"]: d["status"] for d in await harness.deliveries(order_id=order_id)}


async def test_a_slow_endpoint_does_not_hold_back_other_deliveries(harness: Harness, receiver: Receiver) -> None:
    receiver.delays = {"/slow": 3.0}
    await harness.subscribe(receiver.url_for("/slow"), customer_id="c-slow", email=None)
    await harness.subscribe(receiver.url_for("/fast"), customer_id="c-fast", email=None)
    async with worker_running(harness):
        await harness.apply(received("o-slow", customer_id="c-slow", email=None, at=harness.clock.now))
        await eventually(lambda: [r.path for r in receiver.requests] == ["/slow"], timeout=5)
        # Queued while the slow attempt is in flight: sent at once, not after it.
        queued = time.monotonic()
        await harness.apply(received("o-fast", customer_id="c-fast", email=None, at=harness.clock.now))
        await eventually(lambda: receiver.answered == ["/fast"], timeout=2.5)
        took = time.monotonic() - queued
        await eventually(lambda: statuses(harness, "o-fast"), timeout=2)
        assert await statuses(harness, "o-fast") in ({"webhook": "delivered"}, {"webhook": "sending"})
        assert await statuses(harness, "o-slow") == {"webhook": "sending"}
        await eventually(
            lambda: _all_delivered(harness, "o-slow", "o-fast"),
            timeout=10,
        )
    assert took < 1.5
    assert receiver.answered == ["/fast", "/slow"]


async def _all_delivered(harness: Harness, *order_ids: str) -> bool:
    for order_id in order_ids:
        if set((await statuses(harness, order_id)).values()) != {"delivered"}:
            return False
    return True


@pytest.mark.parametrize("harness", [{"delivery_concurrency": 1}], indirect=True)
async def test_a_delivery_waiting_for_a_slot_is_not_claimed_so_another_replica_can_send_it(
    harness: Harness, receiver: Receiver
) -> None:
    receiver.delays = {"/slow": 2.0}
    await harness.subscribe(receiver.url_for("/slow"), email=None)
    await harness.apply(received("o-1", email=None, at=harness.clock.now - timedelta(seconds=2)))
    await harness.apply(received("o-2", email=None, at=harness.clock.now - timedelta(seconds=1)))
    async with worker_running(harness):
        await eventually(lambda: len(receiver.requests) == 1, timeout=5)
        # Its one slot is busy with the older delivery: the other is left pending, unleased...
        assert await statuses(harness, "o-1") == {"webhook": "sending"}
        assert await statuses(harness, "o-2") == {"webhook": "pending"}
        # ...so a second replica sends it now instead of after the first replica's slow send.
        runtime = harness.app.state.runtime
        replica = DeliveryWorker(
            harness.worker.settings,
            runtime.sessions,
            clock=harness.clock,
            http=runtime.extras["http"],
            email=harness.worker.email,
        )
        assert await replica.run_once() == 1
        await eventually(lambda: _all_delivered(harness, "o-1", "o-2"), timeout=10)
    assert len(receiver.requests) == 2
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 2


class HangingMailServer:
    """An SMTP relay that accepts the connection and then never answers."""

    def __init__(self) -> None:
        self.calls = 0

    async def send(self, message: object) -> None:
        self.calls += 1
        await asyncio.Event().wait()


@pytest.mark.parametrize("harness", [{"email_sender": HangingMailServer(), "smtp_timeout_seconds": 1.0}], indirect=True)
async def test_a_hanging_mail_server_holds_back_no_webhook_and_times_out(harness: Harness, receiver: Receiver) -> None:
    await harness.subscribe(receiver.url)
    async with worker_running(harness):
        await harness.apply(received(at=harness.clock.now))
        await eventually(lambda: receiver.answered == ["/hooks"], timeout=1.0)
        assert await statuses(harness, "o-1") in (
            {"webhook": "delivered", "email": "sending"},
            {"webhook": "sending", "email": "sending"},
        )
        await eventually(lambda: _email_retrying(harness), timeout=3)
    (email,) = [d for d in await harness.deliveries() if d["channel"] == "email"]
    assert [(a["outcome"], a["error"]) for a in email["attempts"]] == [("retry", "timed out after 1 s")]
    assert datetime.fromisoformat(email["next_attempt_at"]) == harness.clock.now + timedelta(seconds=5)


async def _email_retrying(harness: Harness) -> bool:
    return (await statuses(harness, "o-1")).get("email") == "pending"


@pytest.mark.parametrize("harness", [{"delivery_concurrency": 4}], indirect=True)
async def test_the_service_loop_records_every_attempt_as_it_finishes(harness: Harness, receiver: Receiver) -> None:
    """Attempts finish while a turn is writing: each is still recorded in a later turn, so
    nothing waits for its lease to run out and nothing is sent twice."""
    for n in range(6):
        await harness.subscribe(receiver.url_for(f"/c-{n}"), customer_id=f"c-{n}", email=None)
    async with worker_running(harness):
        for n in range(60):
            order = received(f"o-{n}", customer_id=f"c-{n % 6}", email=None, at=harness.clock.now)
            await harness.apply(order)

        async def all_delivered() -> bool:
            rows = await harness.deliveries()
            return len(rows) == 60 and {d["status"] for d in rows} == {"delivered"}

        await eventually(all_delivered, timeout=20)
    assert len(receiver.requests) == 60
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 60
    assert all(len(d["attempts"]) == 1 for d in await harness.deliveries())
