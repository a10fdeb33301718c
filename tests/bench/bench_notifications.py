"""Notifications latency: from an event's occurred_at to its webhook being accepted.

python -m tests.bench bench_notifications

A Tansu broker, the notifications service under uvicorn in its own process (SQLite,
ENVIRONMENT=dev so plain-http loopback receivers are allowed), a real HTTP receiver on
loopback that verifies every Standard Webhooks signature, webhook-only preferences for
every customer, and order events produced at a steady rate: per order, order.received
at once, then order.allocated (no notice), order.shipped and order.delivered a little
later, each stamped occurred_at when it is produced. Three webhooks per order.

BENCH_RATES (orders/s, default "100,200"), BENCH_SECONDS (default 30), BENCH_CUSTOMERS
(default 200). The issue's aim: p99 under 1 s at 100 orders/s. Isolates notifications;
the whole-stack figure is measured elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from aiokafka import AIOKafkaProducer
from fulfil.broker import EmbeddedBroker, die_with_parent, free_port
from fulfil.codec import encode
from fulfil.events import (
    Address,
    AllocatedLine,
    Contact,
    Customer,
    DeliveredLine,
    LineQuantity,
    OrderAllocated,
    OrderDelivered,
    OrderedLine,
    OrderEvent,
    OrderReceived,
    OrderShipped,
)
from fulfil.testing import create_topics, settings_for
from standardwebhooks import Webhook

RATES = [int(r) for r in os.environ.get("BENCH_RATES", "100,200").split(",")]
SECONDS = float(os.environ.get("BENCH_SECONDS", "30"))
CUSTOMERS = int(os.environ.get("BENCH_CUSTOMERS", "200"))
DRAIN_SECONDS = 60.0

LATER_EVENTS: tuple[tuple[float, str], ...] = (
    (0.2, "order.allocated"),
    (0.5, "order.shipped"),
    (1.0, "order.delivered"),
)
"""(seconds after order.received, event type) for the rest of each order's life, compressed."""
NOTICES_PER_ORDER = 3  # received, shipped, delivered; allocated is not a customer notice


# -- the receiver ------------------------------------------------------------------------------


@dataclass
class WebhookReceiver:
    """A minimal HTTP/1.1 keep-alive server: verifies each webhook, records its latency."""

    secrets: dict[str, str] = field(default_factory=dict)
    """customer id (the request path) -> signing secret."""
    latencies: list[float] = field(default_factory=list)
    webhook_ids: set[str] = field(default_factory=set)
    duplicates: int = 0
    bad_signatures: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _connections: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.close()
        await asyncio.sleep(0.1)  # let each connection's handler see the close and end

    def url(self, customer_id: str) -> str:
        return f"http://127.0.0.1:{self.port}/{customer_id}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                accepted_at = time.time()
                self._accept(path.lstrip("/"), headers, body, accepted_at)
                writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        self._connections.discard(writer)
        writer.close()

    def _accept(self, customer_id: str, headers: dict[str, str], body: bytes, accepted_at: float) -> None:
        webhook_id = headers.get("webhook-id", "")
        if webhook_id in self.webhook_ids:
            self.duplicates += 1
            return
        self.webhook_ids.add(webhook_id)
        try:
            payload = Webhook(self.secrets[customer_id]).verify(body, headers)
        except Exception:
            self.bad_signatures += 1
            return
        occurred_at = datetime.fromisoformat(payload["timestamp"]).timestamp()
        self.latencies.append(accepted_at - occurred_at)


# -- the service under test ------------------------------------------------------------------


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path


def spawn_notifications(bootstrap: str, topic: str, directory: str) -> Service:
    port = free_port()
    log_path = Path(directory) / f"notifications-{topic}.log"
    env = {
        **os.environ,
        "SERVICE_NAME": "notifications",
        "ENVIRONMENT": "dev",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPIC": topic,
        "KAFKA_DLQ_TOPIC": f"{topic}.dlq",
        "CONSUMER_GROUP": f"notifications-{topic}",
        "DATABASE_URL": f"sqlite+aiosqlite:///{directory}/notifications-{topic}.db",
        "LOG_LEVEL": "WARNING",
    }
    env.pop("SMTP_URL", None)
    command = [
        *(sys.executable, "-m", "uvicorn", "notifications.main:create_app", "--factory"),
        *("--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"),
    ]
    process = subprocess.Popen(
        command,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        preexec_fn=die_with_parent,
    )
    return Service(process, f"http://127.0.0.1:{port}", log_path)


async def start_notifications(bootstrap: str, topic: str, directory: str) -> Service:
    service = spawn_notifications(bootstrap, topic, directory)
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            if service.process.poll() is not None:
                raise RuntimeError(f"notifications exited:\n{service.log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{service.url}/readyz")).status_code == 200:
                    return service
            if time.monotonic() > deadline:
                raise TimeoutError("notifications not ready in 60 s")
            await asyncio.sleep(0.2)


def stop(service: Service) -> None:
    if service.process.poll() is None:
        service.process.send_signal(signal.SIGTERM)
        try:
            service.process.wait(15)
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()


async def subscribe_customers(service: Service, receiver: WebhookReceiver) -> None:
    """Webhook only: an explicit null email switches email off (the orders carry one)."""
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
        for n in range(CUSTOMERS):
            customer_id = f"c-{n}"
            response = await client.put(
                f"/v1/customers/{customer_id}/preferences",
                json={"webhook_url": receiver.url(customer_id), "email": None},
            )
            response.raise_for_status()
            receiver.secrets[customer_id] = response.json()["webhook_secret"]


# -- the orders --------------------------------------------------------------------------------


def order_event(kind: str, order_id: str, customer_id: str) -> OrderEvent:
    now = datetime.now(UTC)
    if kind == "order.received":
        return OrderReceived(
            order_id=order_id,
            occurred_at=now,
            client="bench-shop",
            external_ref=f"PO-{order_id}",
            customer=Customer(id=customer_id, contact=Contact(email=f"{customer_id}@example.com")),
            lines=(OrderedLine(line_no=1, sku="TEA-001", qty=2), OrderedLine(line_no=2, sku="CUP-010", qty=1)),
            ship_to=Address(name="Li Wei", line1="1 Nanjing Rd", city="Shanghai", postal_code="200001", country="CN"),
            placed_at=now,
        )
    lines = (LineQuantity(line_no=1, sku="TEA-001", qty=2), LineQuantity(line_no=2, sku="CUP-010", qty=1))
    if kind == "order.allocated":
        return OrderAllocated(
            order_id=order_id,
            occurred_at=now,
            allocations=tuple(
                AllocatedLine(line_no=line.line_no, sku=line.sku, qty=line.qty, warehouse_id="wh-sh") for line in lines
            ),
            complete=True,
            first_pass=True,
        )
    if kind == "order.shipped":
        return OrderShipped(
            order_id=order_id,
            occurred_at=now,
            shipment_id=f"s-{order_id}",
            warehouse_id="wh-sh",
            carrier="SF Express",
            tracking_number=f"SF{abs(hash(order_id)) % 10**10:010d}",
            lines=lines,
            ship_by=now + timedelta(hours=4),
            promised_delivery_at=now + timedelta(days=2),
        )
    return OrderDelivered(
        order_id=order_id,
        occurred_at=now,
        shipment_id=f"s-{order_id}",
        lines=tuple(DeliveredLine(line_no=line.line_no, sku=line.sku, qty_delivered=line.qty) for line in lines),
        delivered_at=now,
    )


async def produce_orders(bootstrap: str, topic: str, rate: int, seconds: float) -> tuple[int, float]:
    """Orders at a steady ``rate`` for ``seconds``, each followed by its later events; every
    event is stamped occurred_at as it is produced. Returns (orders, worst lateness in s)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1)
    await producer.start()
    started = time.monotonic()
    orders = int(rate * seconds)
    schedule: list[tuple[float, int, str]] = [(started + n / rate, n, "order.received") for n in range(orders)]
    heapq.heapify(schedule)
    pending: list[asyncio.Future[object]] = []
    worst_lateness = 0.0
    try:
        while schedule:
            due, n, kind = schedule[0]
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            now = time.monotonic()
            while schedule and schedule[0][0] <= now:
                due, n, kind = heapq.heappop(schedule)
                worst_lateness = max(worst_lateness, now - due)
                order_id = f"o-{n}"
                _, record = encode(order_event(kind, order_id, f"c-{n % CUSTOMERS}"), source="/bench")
                pending.append(await producer.send(topic, value=record.value, key=record.key, headers=record.headers))
                if kind == "order.received":
                    for after, later in LATER_EVENTS:
                        heapq.heappush(schedule, (due + after, n, later))
            if len(pending) > 1000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return orders, worst_lateness


# -- one run -----------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def run_rate(bootstrap: str, rate: int, directory: str) -> dict[str, float]:
    topic = f"bench-notifications-{uuid.uuid4().hex[:8]}"
    await create_topics(settings_for(bootstrap, "sqlite://", topic=topic))
    receiver = WebhookReceiver()
    await receiver.start()
    service = await start_notifications(bootstrap, topic, directory)
    try:
        await subscribe_customers(service, receiver)
        orders, lateness = await produce_orders(bootstrap, topic, rate, SECONDS)
        expected = orders * NOTICES_PER_ORDER
        await wait_until(lambda: len(receiver.latencies) + receiver.bad_signatures >= expected, DRAIN_SECONDS)
        await asyncio.sleep(1.0)  # anything sent twice shows up now
    finally:
        stop(service)
        await receiver.stop()
    # A webhook that never came counts as slower than any that did: percentiles are of all expected.
    values = sorted(receiver.latencies) + [float("inf")] * max(0, expected - len(receiver.latencies))
    result = {
        "rate": rate,
        "orders": orders,
        "expected": expected,
        "received": len(receiver.latencies),
        "duplicates": receiver.duplicates,
        "bad_signatures": receiver.bad_signatures,
        "p50": percentile(values, 0.50),
        "p90": percentile(values, 0.90),
        "p99": percentile(values, 0.99),
        "max": values[-1] if values else float("nan"),
        "mean": statistics.fmean(receiver.latencies) if receiver.latencies else float("nan"),
        "lateness": lateness,
    }
    print(
        f"  {rate:>4} orders/s for {SECONDS:g} s ({rate * (1 + len(LATER_EVENTS))} events/s, "
        f"{rate * NOTICES_PER_ORDER} webhooks/s): {result['received']}/{expected} webhooks, "
        f"{receiver.duplicates} duplicates, {receiver.bad_signatures} bad signatures"
    )
    print(
        f"       occurred_at -> accepted: p50 {ms(result['p50'])}, p90 {ms(result['p90'])}, "
        f"p99 {ms(result['p99'])}, max {ms(result['max'])}"
        f"   (producer at most {lateness * 1000:.0f} ms behind its schedule)"
    )
    return result


def ms(seconds: float) -> str:
    return f"> {DRAIN_SECONDS:g} s (not delivered)" if seconds == float("inf") else f"{seconds * 1000:.0f} ms"


async def wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


async def run() -> None:
    broker = EmbeddedBroker("127.0.0.1", free_port())
    broker.start()
    try:
        with tempfile.TemporaryDirectory() as directory:
            print(f"notifications under uvicorn, SQLite, {CUSTOMERS} webhook-only customers (aim: p99 < 1 s at 100/s)")
            results = [await run_rate(broker.bootstrap_servers, rate, directory) for rate in RATES]
    finally:
        broker.stop()
    for result in results:
        verdict = "ok" if result["p99"] < 1.0 and result["received"] == result["expected"] else "MISSED"
        print(f"  {int(result['rate']):>4} orders/s: p99 {ms(result['p99'])}  {verdict}")
