"""Real parts for the notifications tests: an HTTP receiver and a canary on loopback,
an aiosmtpd server, a settable clock, and order events with real data."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller
from fulfil.codec import Envelope, new_event_id
from fulfil.events import (
    Address,
    Contact,
    Customer,
    CustomerTier,
    DelayStage,
    DeliveredLine,
    LineQuantity,
    Locale,
    OrderBackordered,
    OrderCancelled,
    OrderDelayed,
    OrderDelivered,
    OrderedLine,
    OrderEvent,
    OrderReceived,
    OrderShipped,
    ServiceLevel,
)

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A real HTTP server on loopback that records every request and answers from a script."""

    requests: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    """Status codes to answer in turn; the last one repeats (200 when empty)."""
    headers: dict[str, str] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    """Seconds to wait before answering, by request path (a slow receiver)."""
    answered: list[str] = field(default_factory=list)
    """Paths of the requests answered so far, in order."""
    port: int = 0

    @property
    def url(self) -> str:
        return self.url_for("/hooks")

    def url_for(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def next_status(self) -> int:
        if not self.statuses:
            return 200
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]


def run_receiver(receiver: Receiver) -> Iterator[Receiver]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            body = self.rfile.read(length)
            receiver.requests.append(Received(self.path, dict(self.headers.items()), body))
            time.sleep(receiver.delays.get(self.path, 0.0))
            self.send_response(receiver.next_status())
            for name, value in receiver.headers.items():
                self.send_header(name, value)
            self.send_header("content-length", "0")
            self.end_headers()
            receiver.answered.append(self.path)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


CANARY_HOSTS = ("127.0.0.1", "127.0.0.2", "::1")
"""Where the canary listens: IPv4 loopback, another loopback address, IPv6 loopback. Every
loopback spelling (localhost, 0.0.0.0, ::ffff:127.0.0.1, 127.0.0.2, [::1]) reaches one of them."""


class Canary:
    """A listener that must never be reached: counts every connection it accepts, on one
    port at every address of ``CANARY_HOSTS``."""

    def __init__(self) -> None:
        self.connections = 0
        self.servers: list[asyncio.Server] = []
        self.port = 0

    async def start(self) -> None:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        for _ in range(20):  # another process may take the port on one of the addresses: try another
            await self.stop()
            first = await asyncio.start_server(accepted, CANARY_HOSTS[0], 0)
            self.servers = [first]
            self.port = first.sockets[0].getsockname()[1]
            try:
                for host in CANARY_HOSTS[1:]:
                    self.servers.append(await asyncio.start_server(accepted, host, self.port))
            except OSError:
                continue
            return
        raise RuntimeError("no port free on every canary address")

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self.servers = []


class Mailbox:
    """What a real aiosmtpd server received."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 OK"


def run_smtp(mailbox: Mailbox) -> Iterator[str]:
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield f"smtp://127.0.0.1:{port}"
    finally:
        controller.stop()


def bodies(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None
    assert html is not None
    return str(text.get_content()), str(html.get_content())


# -- orders with real data -------------------------------------------------------------------


def received(
    order_id: str = "o-1",
    *,
    customer_id: str = "c-1",
    email: str | None = "li.wei@example.cn",
    locale: Locale = Locale.ZH_CN,
    service_level: ServiceLevel = ServiceLevel.STANDARD,
    at: datetime = T0,
) -> OrderReceived:
    return OrderReceived(
        order_id=order_id,
        occurred_at=at,
        client="shop-cn",
        external_ref=f"PO-{order_id.upper()}",
        customer=Customer(id=customer_id, tier=CustomerTier.CORE, locale=locale, contact=Contact(email=email)),
        lines=(
            OrderedLine(line_no=1, sku="TEA-001", qty=3, substitutes=("TEA-002",)),
            OrderedLine(line_no=2, sku="CUP-010", qty=2),
        ),
        ship_to=Address(name="Li Wei", line1="1 Nanjing Rd", city="Shanghai", postal_code="200001", country="CN"),
        placed_at=at - timedelta(minutes=2),
        requested_delivery_date=date(2025, 3, 10),
        service_level=service_level,
    )


def every_notice(order_id: str = "o-1", at: datetime = T0) -> list[OrderEvent]:
    """One event of each kind the customer hears about, in order."""
    return [
        received(order_id, at=at),
        OrderBackordered(
            order_id=order_id,
            occurred_at=at + timedelta(minutes=1),
            lines=(LineQuantity(line_no=1, sku="TEA-001", qty=2),),
            expected_restock_date=date(2025, 3, 8),
            reason="out_of_stock",
        ),
        OrderShipped(
            order_id=order_id,
            occurred_at=at + timedelta(hours=3),
            shipment_id="s-1",
            warehouse_id="wh-sh",
            carrier="SF Express",
            tracking_number="SF1234567890",
            lines=(LineQuantity(line_no=2, sku="CUP-010", qty=2),),
            ship_by=at + timedelta(hours=4),
            promised_delivery_at=at + timedelta(days=2),
        ),
        OrderDelayed(
            order_id=order_id,
            occurred_at=at + timedelta(days=1),
            shipment_id="s-1",
            stage=DelayStage.TRANSIT,
            reason="weather",
            new_estimate=at + timedelta(days=3),
        ),
        OrderDelivered(
            order_id=order_id,
            occurred_at=at + timedelta(days=3),
            shipment_id="s-1",
            lines=(DeliveredLine(line_no=2, sku="CUP-010", qty_delivered=2, qty_damaged=1),),
            delivered_at=at + timedelta(days=3),
        ),
        OrderCancelled(order_id=order_id, occurred_at=at + timedelta(days=4), reason="customer_request"),
    ]


def envelope(event: OrderEvent, ce_id: str | None = None) -> Envelope:
    return Envelope(
        id=ce_id or new_event_id(),
        source="/test",
        type=event.type,
        time=event.occurred_at,
        subject=event.order_id,
        data=event,
    )


def notifications_settings(bootstrap: str, database_url: str, topic: str, **overrides: Any) -> Any:
    """The service's own Settings, pointing at the test broker and database."""
    from fulfil.testing import settings_for
    from notifications.config import Settings

    base = settings_for(bootstrap, database_url, topic=topic, service_name="notifications")
    # A group per test: a previous test's member leaving must not stall this one's rebalance.
    return Settings(
        **{**base.model_dump(), "consumer_group": f"notifications-{topic}", "delivery_poll_seconds": 0.05, **overrides}
    )
