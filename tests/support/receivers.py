"""Real receivers for what the stack sends out: a loopback HTTP server for customers'
webhooks and an aiosmtpd server for their email. Both record everything, duplicates
included, so tests can count."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller
from fulfil.broker import free_port
from standardwebhooks import Webhook


@dataclass(frozen=True)
class ReceivedWebhook:
    path: str
    headers: dict[str, str]
    """Lower-case names."""
    body: bytes
    received_at: datetime

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def customer_id(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def verified(self, secret: str) -> dict[str, Any]:
        """The payload, once the Standard Webhooks signature checks out (raises otherwise)."""
        payload: dict[str, Any] = Webhook(secret).verify(self.body, self.headers)
        return payload


class WebhookReceiver:
    """Customers' webhook endpoints at ``/hooks/<customer id>`` on 127.0.0.1, answering 204."""

    def __init__(self) -> None:
        self.received: list[ReceivedWebhook] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.received.append(
                        ReceivedWebhook(
                            path=self.path,
                            headers={name.lower(): value for name, value in self.headers.items()},
                            body=body,
                            received_at=datetime.now(UTC),
                        )
                    )
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url_for(self, customer_id: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/{customer_id}"

    def snapshot(self) -> list[ReceivedWebhook]:
        with self._lock:
            return list(self.received)

    def ids(self) -> Counter[str]:
        """How often each webhook-id arrived."""
        return Counter(hook.webhook_id for hook in self.snapshot())


@dataclass(frozen=True)
class ReceivedEmail:
    mail_from: str
    to: tuple[str, ...]
    subject: str
    message_id: str
    text: str
    received_at: datetime

    @property
    def delivery_id(self) -> str:
        """notifications sets Message-ID to ``<delivery id@fulfil.notifications>``."""
        return self.message_id.strip("<>").split("@", 1)[0]


class MailReceiver:
    """An aiosmtpd server on a free loopback port, keeping every message it accepts."""

    def __init__(self) -> None:
        self.received: list[ReceivedEmail] = []
        self._lock = threading.Lock()
        self.port = free_port()
        # server_hostname given: aiosmtpd would otherwise ask DNS for this machine's FQDN.
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, server_hostname="localhost")

    @property
    def smtp_url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def __enter__(self) -> MailReceiver:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """aiosmtpd calls this for each message."""
        content = envelope.original_content or envelope.content or b""
        message = message_from_bytes(content if isinstance(content, bytes) else content.encode(), policy=policy.default)
        assert isinstance(message, EmailMessage)
        body = message.get_body(preferencelist=("plain",))
        text = str(body.get_content()) if body is not None else ""  # type: ignore[union-attr]
        with self._lock:
            self.received.append(
                ReceivedEmail(
                    mail_from=str(envelope.mail_from or ""),
                    to=tuple(str(rcpt) for rcpt in envelope.rcpt_tos),
                    subject=str(message.get("Subject", "")),
                    message_id=str(message.get("Message-ID", "")),
                    text=text,
                    received_at=datetime.now(UTC),
                )
            )
        return "250 OK"

    def snapshot(self) -> list[ReceivedEmail]:
        with self._lock:
            return list(self.received)

    def ids(self) -> Counter[str]:
        """How often each delivery (by Message-ID) arrived."""
        return Counter(mail.delivery_id for mail in self.snapshot())
